#!/usr/bin/env python
"""Fine-tune an exported student (or the teacher) on a downstream task with transformers' Trainer and report its
metrics: text classification (single texts or pairs), regression, or extractive question answering (SQuAD).

    python launch/finetune.py --model runs/distil/student --data data/sst2/ --output runs/sst2
    python launch/finetune.py --model runs/distil/student --data 'hf:nyu-mll/glue#config=mrpc' \\
        --text-column sentence1 --text-pair-column sentence2 --metrics f1,accuracy --output runs/mrpc
    python launch/finetune.py --model runs/distil/student --data 'hf:nyu-mll/glue#config=stsb' --task regression \\
        --text-column sentence1 --text-pair-column sentence2 --output runs/stsb
    python launch/finetune.py --model runs/distil/student --data 'hf:stanfordnlp/imdb' --max-length 512 \\
        --output runs/imdb
    python launch/finetune.py --model runs/distil/student --task qa --data 'hf:rajpurkar/squad' \\
        --max-length 384 --batch-size 12 --lr 3e-5 --epochs 2 --output runs/squad
    deepspeed --num_gpus 8 launch/finetune.py --model runs/distil/student --data 'hf:stanfordnlp/imdb' \\
        --output runs/imdb --batch-size 256

--data: a CSV / TSV / JSON(L) / Parquet file, a folder of split files (train.*, validation.* or dev.*, test.*,
other splits by name), or hf:NAME[#config=C]. Without validation, a seeded --valid-fraction of train. Every
validation / test split with labels is scored; the first validation split picks the best epoch (--metric).
On GPUs DeepSpeed (--deepspeed, default ds_configs/zero2_bf16.json) in bf16; on CPU plain PyTorch.
Outputs in --output: the best model and tokenizer (transformers.pipeline loads them), report.json,
tensorboard/. Exit status: 0 done, 2 bad data, settings or model, 1 failure.
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
    p.add_argument("--task", choices=("auto", "classification", "regression", "qa"), default="auto",
                   help="auto: regression for fractional labels, else classification")
    p.add_argument("--text-column", default=None, help="default: text (qa: question)")
    p.add_argument("--text-pair-column", default=None, help="second text of a pair task (qa: default context)")
    p.add_argument("--label-column", default=None, help="default: label (qa: answers)")
    p.add_argument("--test", default=None, help="separate test source (same formats as --data)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="held out of train when there is no validation")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: accuracy, f1, macro_f1, mcc (classification), pearson, spearman "
                        "(regression); default accuracy,macro_f1 / pearson,spearman; qa: exact_match,f1")
    p.add_argument("--metric", default=None, help="best-epoch and early-stopping metric (default: first of --metrics)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32, help="global: examples per step over all ranks")
    p.add_argument("--eval-batch-size", type=int, default=None, help="per device (default 2 x train's)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default 128; qa: 384)")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping (0: never)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--deepspeed", default="auto",
                   help="DeepSpeed JSON (ZeRO 0-2); auto: ds_configs/zero2_bf16.json on GPUs, none on CPU; none")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep <output>/checkpoints")
    p.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (log lines only)")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--doc-stride", type=int, default=128, help="qa: overlap between windows of a long context")
    p.add_argument("--n-best", type=int, default=20, help="qa: start/end candidates per window")
    p.add_argument("--max-answer-length", type=int, default=30, help="qa: longest answer in tokens")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def config_from_args(args):
    from pipeline.evaluation.finetune import FinetuneConfig

    qa = args.task == "qa"
    return FinetuneConfig(
        model=args.model, data=args.data, output=args.output, task=args.task,
        text_column=args.text_column or ("question" if qa else "text"),
        text_pair_column=args.text_pair_column or ("context" if qa else None),
        label_column=args.label_column or ("answers" if qa else "label"), test=args.test,
        valid_fraction=args.valid_fraction,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else None,
        metric=args.metric, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, max_length=args.max_length or (384 if qa else 128),
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, patience=args.patience, seed=args.seed,
        deepspeed=None if args.deepspeed.lower() == "none" else args.deepspeed,
        tensorboard=not args.no_tensorboard, keep_checkpoints=args.keep_checkpoints,
        progress_every_s=args.progress_every, tqdm=False if args.no_progress else None,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        doc_stride=args.doc_stride, n_best=args.n_best, max_answer_length=args.max_answer_length)


def main(argv=None) -> int:
    args = parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is expected here, not news
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # weight loading / saving bars: noise in a log file
    import datasets
    datasets.disable_progress_bars()
    from pipeline.evaluation.data import DataError
    from pipeline.evaluation.finetune import FinetuneError, finetune, report_tables

    try:
        report = finetune(config_from_args(args))
    except (DataError, FinetuneError) as e:
        if main_process:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if main_process:
        print(report_tables(report))
        print(f"\nsaved model, tokenizer and report.json to {args.output} ({report['timing']['total_s']:.1f}s, "
              f"{report['engine']['ranks']} rank(s) on {report['engine']['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
