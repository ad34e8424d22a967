#!/usr/bin/env python
"""Tokenize a corpus into checksummed, memory-mapped shards (docs/data_prep.md).

    python launch/prepare_data.py                                   # the embedded English sample
    python launch/prepare_data.py --input 'wiki/*.jsonl.zst' --input hf:bookcorpus \
        --tokenizer bert-base-uncased --output data/wikibooks --workers 32
    python launch/prepare_data.py join data/wikibooks               # after a SLURM array (slurm/prepare_data.sbatch)
    python launch/prepare_data.py validate data/wikibooks
    python launch/prepare_data.py inspect data/wikibooks --samples 3

Exit codes: 0 done, 1 validation found problems or units failed, 2 bad arguments or inputs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Data preparation does no linear algebra. numpy's BLAS thread pool would only make this process multi-threaded,
# and prepare() forks its workers only from a single-threaded process (pipeline/data_prep/prepare.py _pool_context).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from pipeline.data.prepared import DatasetError  # noqa: E402
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, array_task_from_env, join, prepare  # noqa: E402
from pipeline.data_prep.sources import PlanError  # noqa: E402
from pipeline.data_prep.tokenizer import TokenizerLoadError  # noqa: E402
from pipeline.data_prep.validate import inspect, validate  # noqa: E402
from pipeline.resources import SAMPLE_CORPUS  # noqa: E402

COMMANDS = ("prepare", "join", "validate", "inspect")


def parse(argv):
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    d = PrepareConfig(inputs=[], output="")
    pr = sub.add_parser("prepare", help="tokenize inputs into a dataset folder (the default command)")
    pr.add_argument("--input", "-i", action="append", default=[],
                    help="file, folder, glob, hf:NAME or disk:FOLDER, with #key=value options (repeatable); "
                         "default: the embedded English sample")
    pr.add_argument("--output", "-o", default="runs/sample/data", help="dataset folder (default: %(default)s)")
    pr.add_argument("--tokenizer", default=d.tokenizer,
                    help="HF tokenizer name or folder, or a SentencePiece .model (default: the teacher's, %(default)s)")
    pr.add_argument("--workers", "-j", type=int, default=d.workers, help="processes (default: %(default)s)")
    pr.add_argument("--text-field", default=d.text_field, help="field holding the text in JSON/Parquet/datasets")
    pr.add_argument("--text-mode", choices=("paragraphs", "lines"), default=d.text_mode,
                    help="plain text: documents separated by blank lines, or one per line")
    pr.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    pr.add_argument("--split-seed", default=d.split_seed)
    pr.add_argument("--unit-mb", type=float, default=None, help="input MiB per shard (default: auto)")
    pr.add_argument("--max-doc-chars", type=int, default=d.max_doc_chars)
    pr.add_argument("--max-record-mb", type=int, default=d.max_record_mb)
    pr.add_argument("--on-bad-file", choices=("error", "skip"), default=d.on_bad_file)
    pr.add_argument("--verify-existing", choices=("full", "size"), default=d.verify_existing,
                    help="how completed units are checked on resume")
    pr.add_argument("--array-task", type=int, default=None, help="task index (default: SLURM_ARRAY_TASK_ID)")
    pr.add_argument("--array-count", type=int, default=None, help="task count (default: SLURM_ARRAY_TASK_COUNT)")
    pr.add_argument("--overwrite", action="store_true", help="delete a dataset already in --output")
    pr.add_argument("--no-join", action="store_true", help="do not write manifest.json at the end")
    pr.add_argument("--no-progress", action="store_true")
    j = sub.add_parser("join", help="write manifest.json once all units (array tasks) are done")
    j.add_argument("output")
    v = sub.add_parser("validate", help="verify checksums, indexes, token ids and counts")
    v.add_argument("output")
    v.add_argument("--fast", action="store_true", help="sizes and indexes only, no checksums")
    i = sub.add_parser("inspect", help="totals, length histogram and random documents decoded to text")
    i.add_argument("output")
    i.add_argument("--samples", type=int, default=3)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--tokenizer", default=None, help="decode with this tokenizer (default: the recorded one)")
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["prepare", *argv]
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("pipeline.data_prep")
    try:
        if args.command == "prepare":
            task = array_task_from_env()
            array_task = args.array_task if args.array_task is not None else (task[0] if task else 0)
            array_count = args.array_count if args.array_count is not None else (task[1] if task else 1)
            inputs = args.input or [str(SAMPLE_CORPUS / 'articles.jsonl.gz'), str(SAMPLE_CORPUS / 'howto.txt.zst')]
            cfg = PrepareConfig(
                inputs=inputs, output=args.output, tokenizer=args.tokenizer, workers=args.workers,
                text_field=args.text_field, text_mode=args.text_mode, valid_fraction=args.valid_fraction,
                split_seed=args.split_seed, unit_mb=args.unit_mb, max_doc_chars=args.max_doc_chars,
                max_record_mb=args.max_record_mb, on_bad_file=args.on_bad_file,
                verify_existing=args.verify_existing, array_task=array_task, array_count=array_count,
                overwrite=args.overwrite, join=not args.no_join, progress=not args.no_progress,
                command=[os.path.basename(sys.executable), "launch/prepare_data.py", *argv])
            prepare(cfg)
        elif args.command == "join":
            m = join(args.output, command=["launch/prepare_data.py", *argv])
            t = m["totals"]
            log.info("joined %d units: train %s documents / %s tokens, valid %s / %s -> %s",
                     len(m["shards"]["train"]), f"{t['train']['documents']:,}", f"{t['train']['tokens']:,}",
                     f"{t['valid']['documents']:,}", f"{t['valid']['tokens']:,}",
                     os.path.join(args.output, "manifest.json"))
        elif args.command == "validate":
            problems = validate(args.output, full=not args.fast)
            if problems:
                for p in problems:
                    log.error("%s", p)
                log.error("%s: %d problem(s)", args.output, len(problems))
                return 1
            with open(os.path.join(args.output, "manifest.json")) as f:
                t = json.load(f)["totals"]
            log.info("%s is valid (%s checks): train %s documents / %s tokens, valid %s / %s", args.output,
                     "size and index" if args.fast else "all checksums, indexes, ids and counts",
                     f"{t['train']['documents']:,}", f"{t['train']['tokens']:,}", f"{t['valid']['documents']:,}",
                     f"{t['valid']['tokens']:,}")
        elif args.command == "inspect":
            print(inspect(args.output, samples=args.samples, seed=args.seed, tokenizer=args.tokenizer))
    except (PlanError, TokenizerLoadError) as e:
        log.error("%s", e)
        return 2
    except (PrepareError, DatasetError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; completed units are kept: re-run the same command to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
