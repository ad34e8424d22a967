#!/usr/bin/env python
"""Distil a student from a teacher (or pretrain it with MLM alone) with DeepSpeed.

    deepspeed launch/pretrain.py --config distilbert_base --deepspeed_config ds_configs/zero2_bf16.json \
        data.path=/scratch/wikibooks run_dir=/scratch/runs/distil
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/pretrain.py --config tiny_cpu ...   # 2 CPU ranks (gloo)
    torchrun --nproc_per_node 8 launch/pretrain.py ...                                    # also works
    python launch/pretrain.py --help-config                                              # every key, documented

Exit status: 0 done, 2 bad configuration or input, 1 failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML path or shipped recipe name (pipeline/recipes/)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON (ZeRO stage, precision); default ds_configs/zero2_bf16.json on GPU, "
                        "ds_configs/zero2_fp32.json on CPU")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint of run_dir), none, or a "
                                                    "checkpoint folder")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    p.add_argument("--help-config", action="store_true", help="list every recipe key with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=3e-4 batch.micro_size=8")
    return p.parse_args(argv)


def report_error(e: BaseException, dist) -> None:
    """One line on stderr, no traceback. An error every rank raised alike (`shared`: agreed through a collective)
    is printed by rank 0 alone; any other by each rank that has it, naming the rank, since only that rank knows."""
    if dist is None or dist.world_size == 1 or dist.is_main:
        print(f"error: {e}", file=sys.stderr, flush=True)
    elif not getattr(e, "shared", False):
        print(f"error (rank {dist.rank}): {e}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    # First of all, before torch is imported: SLURM's USR1 (time limit, preemption) or TERM (scancel) may come while
    # the rank starts up. Until now the rank ignores them (pretrain.sbatch starts the launcher with both ignored);
    # from here on they set a flag that the trainer reads at its first step boundary.
    from pipeline.training.faults import StopFlags
    stop_flags = StopFlags()
    from pipeline.logs import call_as_rank, enable_crash_traces, launcher_rank, setup_logging

    enable_crash_traces()
    setup_logging("pretrain")
    return call_as_rank(launcher_rank(), _main, argv, stop_flags)


def _main(argv, stop_flags) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from pipeline.training.config import ConfigError, describe_fields, load_config

    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    if not args.config:
        print("error: --config is required (a recipe path or a shipped name, e.g. --config tiny_cpu)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls, per rank
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-file loading bars from every rank drown the log
    hf_logging.set_verbosity_error()
    from pipeline.data.prepared import DatasetError
    from pipeline.models import ModelLoadError
    from pipeline.tokenization import TokenizerLoadError
    from pipeline.training import distributed
    from pipeline.training.checkpoint import CheckpointDamaged, CheckpointError
    from pipeline.training.ds_config import DS_CONFIG_DIR, load_ds_config
    from pipeline.training.trainer import run

    dist = None
    try:
        cfg = load_config(args.config, args.overrides)  # before the process group: errors come out once per rank
        dist = distributed.init_distributed()
        ds_path = args.deepspeed_config or os.path.join(DS_CONFIG_DIR, "zero2_bf16.json" if dist.on_gpu
                                                        else "zero2_fp32.json")
        run(cfg, load_ds_config(ds_path), dist, resume=args.resume, ds_source=ds_path, command=sys.argv,
            stop_flags=stop_flags)
        return 0
    except (ConfigError, DatasetError, TokenizerLoadError, ModelLoadError, FileNotFoundError, CheckpointDamaged) as e:
        report_error(e, dist)
        return 2
    except CheckpointError as e:  # a failed save: the path and the OS error, on one line; the previous one stays
        report_error(e, dist)
        return 1
    except Exception as e:  # name the rank and the cause; the launcher then stops the other ranks
        from pipeline.training.faults import report_rank_failure
        report_rank_failure(dist.rank if dist else int(os.environ.get("RANK", 0)), e)
        return 1
    finally:
        distributed.destroy()
        stop_flags.restore()


if __name__ == "__main__":
    sys.exit(main())
