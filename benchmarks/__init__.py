"""Benchmark scripts and their shared harness (step_speed, machine); results in benchmarks/results/, pages in
docs/benchmarks/."""
