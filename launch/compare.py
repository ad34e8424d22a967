#!/usr/bin/env python
"""Student vs teacher on this machine: parameters, disk size, inference latency and throughput, measured in one run.

    python launch/compare.py --teacher runs/quickstart/teacher/student --student runs/quickstart/distil/student \
        [--batch-sizes 1 8 32] [--seq-lens 128 512] [--repeats 5] [--output compare.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    from pipeline.evaluation.compare import compare

    try:
        r = compare({"teacher": args.teacher, "student": args.student}, batch_sizes=args.batch_sizes,
                    seq_lens=args.seq_lens, repeats=args.repeats)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t, s = r["models"]["teacher"], r["models"]["student"]
    print(f"device {r['device']} ({r['dtype']}, {r['threads']} threads)")
    print(f"parameters: teacher {t['parameters'] / 1e6:.1f}M, student {s['parameters'] / 1e6:.1f}M "
          f"({100 * (1 - s['parameters'] / t['parameters']):.0f}% fewer)")
    if t["disk_bytes"] and s["disk_bytes"]:
        print(f"disk: teacher {t['disk_bytes'] / 2 ** 20:.1f} MiB, student {s['disk_bytes'] / 2 ** 20:.1f} MiB")
    print(f"{'batch':>5s} {'seq':>5s} {'teacher ms':>11s} {'student ms':>11s} {'speedup':>8s} {'student seq/s':>14s}")
    for row in r["timings"]:
        print(f"{row['batch']:5d} {row['seq_len']:5d} {row['teacher']['latency_ms']:11.2f} "
              f"{row['student']['latency_ms']:11.2f} {row['student']['speedup_vs_teacher']:7.2f}x "
              f"{row['student']['sequences_per_s']:14.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
