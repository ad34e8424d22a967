"""The log of training and launch scripts: stdlib logging, configured once per process by the script, with lines
from ranks other than 0 dropped.

Every rank runs the same code, so one copy of each line is enough; a line every rank must print (a failure naming
its rank) passes `extra={"all_ranks": True}`. Modules log through `logging.getLogger(__name__)`; the script calls
`setup_logging("pretrain")` once at start-up, before the process group exists, so the rank comes from the
launcher's environment (RANK from deepspeed and torchrun, SLURM_PROCID from srun; a plain process is rank 0).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import types

ROOT_LOGGER = "pipeline"


def launcher_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


class RankZeroFilter(logging.Filter):
    """Passes rank 0's records, and on other ranks only those marked `all_ranks`."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or getattr(record, "all_ranks", False)


class _TqdmAwareHandler(logging.StreamHandler):
    """Writes through `tqdm.write`, so a log line does not tear a progress bar drawn on the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never take the run down
            self.handleError(record)


def setup_logging(prefix: str, *, rank: int | None = None, level: int = logging.INFO,
                  names: tuple[str, ...] = (ROOT_LOGGER, "__main__")) -> None:
    """Send the `pipeline` loggers (and the calling script's) to stdout as `[prefix] message`, from rank 0 only.
    Calling it again replaces the handler (a test running two scripts in one process)."""
    handler = _TqdmAwareHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    handler.addFilter(RankZeroFilter(launcher_rank() if rank is None else rank))
    for name in names:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _TqdmAwareHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # not twice through a root handler another library installed


def enable_crash_traces() -> None:
    """faulthandler on stderr, so a process that dies in native code (a segfault in a DeepSpeed op being built or
    loaded) still prints where; run the script's main through `call_as_rank` so that dump names the rank."""
    faulthandler.enable()


def call_as_rank(rank: int, fn, *args):
    """fn(*args), called from a frame whose function is named `rank_<rank>`. faulthandler's dump of a native crash
    lists frames only (file, line, function name), so a frame with the rank in its name is how that dump, the one
    line a rank killed by a signal leaves, can say which rank died."""
    def call():
        return fn(*args)

    name = f"rank_{rank}"
    code = call.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, call.__globals__, name, None, call.__closure__)()
