#!/usr/bin/env python
"""Masked-LM evaluation of one or more checkpoints on a prepared dataset's validation split, with fixed masks
(the same sequences and masks for every model and every run, the trainer's held-out evaluation).

    python launch/evaluate.py --data runs/quickstart/data --teacher runs/quickstart/teacher/student \
        runs/quickstart/distil/student bert-base-uncased ... --output eval.json

Prints a table (loss, perplexity, accuracy on masked tokens, top-1 agreement with --teacher) and writes JSON.
Exit status: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="Hugging Face masked-LM checkpoints (folders or hub names)")
    p.add_argument("--data", required=True, help="prepared dataset folder (launch/prepare_data.py --output)")
    p.add_argument("--split", default="valid")
    p.add_argument("--teacher", default=None, help="reference model for top-1 agreement (and evaluated too)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--mode", default="packed", choices=["packed", "document"])
    p.add_argument("--n-samples", type=int, default=512, help="validation sequences (capped at the split's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    from pipeline.data.prepared import DatasetError
    from pipeline.evaluation.mlm_eval import evaluate_models
    from pipeline.models import ModelLoadError
    from pipeline.tokenization import TokenizerLoadError

    try:
        t0 = time.time()
        rows = evaluate_models(args.models, data=args.data, split=args.split, teacher=args.teacher,
                               seq_len=args.seq_len, mode=args.mode, n_samples=args.n_samples,
                               batch_size=args.batch_size)
    except (DatasetError, TokenizerLoadError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = ("mlm_loss", "perplexity", "mlm_acc", "agreement")
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':{width}s}  " + "  ".join(f"{c:>10s}" for c in cols))
    for r in rows:
        print(f"{r['model']:{width}s}  " + "  ".join(
            f"{r[c]:10.4f}" if r.get(c) is not None else f"{'-':>10s}" for c in cols))
    print(f"({rows[0]['masked_tokens']} masked tokens in {rows[0]['sequences']} sequences of {args.seq_len}; "
          f"{time.time() - t0:.1f} s)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"data": os.path.abspath(args.data), "split": args.split, "seq_len": args.seq_len,
                       "mode": args.mode, "teacher": args.teacher, "results": rows}, f, indent=1)
        print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
