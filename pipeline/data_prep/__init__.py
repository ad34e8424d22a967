"""Stage 1: tokenize a corpus into checksummed, memory-mapped shards (see docs/data_prep.md)."""
