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
import dataclasses
import json
import logging
import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.data.prepared import DatasetError  # noqa: E402
from pipeline.data.validate import inspect, validate  # noqa: E402
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, array_task_from_env, join, prepare  # noqa: E402
from pipeline.data_prep.sources import PlanError  # noqa: E402
from pipeline.resources import SAMPLE_CORPUS  # noqa: E402
from pipeline.settings import ConfigError  # noqa: E402
from pipeline.tokenization import TokenizerLoadError  # noqa: E402

COMMANDS = ("prepare", "join", "validate", "inspect")
SHORT = {"inputs": ["-i"], "output": ["-o"], "workers": ["-j"]}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per PrepareConfig field, its help the field's doc line: --text-mode, --no-join, ..."""
    hints = typing.get_type_hints(PrepareConfig)
    for f in dataclasses.fields(PrepareConfig):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata["doc"]
        if f.name in ("command", "array_task", "array_count"):
            if f.name != "command":  # None: from the SLURM_ARRAY_* variables
                p.add_argument(flag, type=int, default=None, help=help_)
        elif f.name == "inputs":
            p.add_argument("--input", *SHORT[f.name], dest="inputs", action="append", default=[],
                           help=help_ + " (repeatable); default: the embedded English sample")
        elif hints[f.name] is bool:
            p.add_argument(f"--no-{f.name}" if f.default else flag, dest=f.name, action="store_false" if f.default
                           else "store_true", help=help_)
        else:
            hint = hints[f.name]
            kind = int if hint is int else float if float in (hint, *typing.get_args(hint)) else str
            p.add_argument(flag, *SHORT.get(f.name, ()), type=kind, default=f.default,
                           choices=f.metadata.get("choices"),
                           help=help_ if f.default is None else f"{help_} (default: %(default)s)")


def parse(argv):
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    add_config_flags(sub.add_parser("prepare", help="tokenize inputs into a dataset folder (the default command)"))
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
    log = logging.getLogger("pipeline.data_prep.prepare")
    try:
        if args.command == "prepare":
            task = array_task_from_env() or (0, 1)
            settings = {k: v for k, v in vars(args).items() if k != "command"}
            settings["array_task"] = task[0] if args.array_task is None else args.array_task
            settings["array_count"] = task[1] if args.array_count is None else args.array_count
            settings["inputs"] = args.inputs or [str(SAMPLE_CORPUS / "articles.jsonl.gz"),
                                                 str(SAMPLE_CORPUS / "howto.txt.zst")]
            cfg = PrepareConfig(**settings, command=[os.path.basename(sys.executable), "launch/prepare_data.py", *argv])
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
    except (ConfigError, PlanError, TokenizerLoadError) as e:
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
