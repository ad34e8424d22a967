#!/usr/bin/env python
"""Export the student of a training checkpoint as a standard Hugging Face model (with its tokenizer).

    python launch/export.py runs/distil/checkpoints/step00010000 out/student
    python launch/export.py runs/distil out/student          # the newest complete checkpoint of a run
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("output", help="folder to write (config.json, model.safetensors, tokenizer files)")
    args = p.parse_args(argv)
    from pipeline.training import checkpoint as ckpt_lib

    path = args.checkpoint
    if not os.path.exists(os.path.join(path, ckpt_lib.COMPLETE)):
        found = ckpt_lib.complete_checkpoints(os.path.join(path, "checkpoints"))
        if not found:
            print(f"error: {path} is neither a complete checkpoint nor a run folder with one", file=sys.stderr)
            return 2
        path = found[-1]
    out = ckpt_lib.export(path, args.output)
    print(f"exported {path} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
