#!/usr/bin/env python
"""Fine-tune an exported student (or the teacher) on sequence classification and report per-class metrics.

    python launch/finetune.py --model runs/distil/student --data data/sst2/ --output runs/sst2
    python launch/finetune.py --model runs/distil/student --data reviews.csv --test reviews_test.csv \\
        --output runs/reviews --epochs 5 --lr 5e-5
    python launch/finetune.py --model bert-base-uncased --data 'hf:stanfordnlp/imdb' --output runs/imdb
    deepspeed --num_gpus 8 launch/finetune.py --model runs/distil/student --data 'hf:stanfordnlp/imdb' \
        --output runs/imdb --batch-size 256 [--deepspeed-config ds_configs/zero2_fp32.json]

--engine auto (default) runs DeepSpeed on GPUs or under a launcher (deepspeed, torchrun, srun) and plain
PyTorch on a CPU-only machine; --batch-size is the global batch whatever the number of ranks.

--data: a CSV / JSON Lines / Parquet file, a folder with train.* [validation.*|valid.*|dev.*] [test.*], or
hf:NAME[#config=C]. Without validation, a seeded --valid-fraction of train; without test, the report is on
validation. Early stopping on validation accuracy (--metric macro_f1 to change). Outputs in --output: the best
model and tokenizer (loadable by transformers.pipeline("text-classification")), report.json, tensorboard/.
Exit status: 0 done, 2 bad data, settings or model, 1 failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder or name (masked LM or encoder)")
    p.add_argument("--data", required=True, help="file, folder of split files, or hf:NAME[#config=C]")
    p.add_argument("--output", required=True, help="folder for the model, report.json and TensorBoard logs")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="held out of train when there is no validation")
    p.add_argument("--test", default=None, help="separate test source (same formats as --data)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensorboard-dir", default=None, help="default <output>/tensorboard; '' to disable")
    p.add_argument("--metric", choices=("accuracy", "macro_f1"), default="accuracy",
                   help="validation metric for early stopping and the best epoch")
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--engine", choices=("auto", "torch", "deepspeed"), default="auto",
                   help="auto: DeepSpeed on GPUs or with several ranks, plain PyTorch otherwise")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON, ZeRO stage 0-2 and fp32 weights (default: ZeRO-1); batch fields are filled in")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is expected here, not news
    from pipeline.evaluation.classify_data import ClassifyDataError
    from pipeline.evaluation.finetune import FinetuneConfig, FinetuneError, finetune, report_tables

    cfg = FinetuneConfig(model=args.model, data=args.data, output=args.output, text_column=args.text_column,
                         label_column=args.label_column, valid_fraction=args.valid_fraction, test=args.test,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                         patience=args.patience, seed=args.seed, tensorboard_dir=args.tensorboard_dir,
                         metric=args.metric, warmup_fraction=args.warmup_fraction, device=args.device,
                         progress=not args.no_progress, engine=args.engine, deepspeed_config=args.deepspeed_config)
    try:
        report = finetune(cfg)
    except (ClassifyDataError, FinetuneError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(report_tables(report))
        print(f"\nsaved model, tokenizer and report.json to {args.output} ({report['timing']['total_s']:.1f}s, "
              f"{report['engine']} on {report['ranks']} rank(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
