"""Preemption and failures: a signal only sets a flag; the ranks agree at a step boundary and act together.

SLURM sends SIGUSR1 (`--signal=USR1@<lead>`) before the time limit or a preemption, and SIGTERM when it cancels.
Doing I/O inside a signal handler, or letting one rank stop while the others wait in a collective, hangs or
corrupts; so the handler sets a flag, and at the next step boundary one all-reduce tells every rank whether any rank
was signalled. Then all save a checkpoint together, and rank 0 requeues the job (on USR1) or everyone exits (TERM).

`launch/pretrain.py` installs the handlers first thing, before torch is imported: a signal that arrives while a rank
is still starting is then kept, and the rank stops at its first step boundary. This module imports torch and psutil
only inside the functions that need them, for that reason.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback


class StopFlags:
    """Set by signal handlers on this rank, or by a stop file; reduced across ranks with `agree`.

    The stop file (DISTIL_STOP_FILE, written by slurm/pretrain.sbatch when its batch shell gets USR1) counts as a
    SIGUSR1. The batch shell passes the signal on this way rather than through srun, which would signal every
    process of the step, helpers like a compiler or `scontrol` included. Only rank 0 looks (one stat per step, on
    the batch shell's node, so no shared-file-system delay); `agree` tells the others."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM), stop_file: str | None = None):
        self.received: str | None = None
        self.requeue = False
        self.stop_file = stop_file if stop_file is not None else os.environ.get("DISTIL_STOP_FILE") or None
        if os.environ.get("RANK", "0") != "0":
            self.stop_file = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):  # async-signal context: set the flag, nothing else
        self.received = signal.Signals(signum).name

    def _check_stop_file(self) -> None:
        if self.received is None and self.stop_file and os.path.exists(self.stop_file):
            self.received = "SIGUSR1"

    def agree(self, device, nonfinite=None) -> tuple[bool, bool]:
        """(stop, nonfinite): whether any rank was signalled, and whether any rank saw a non-finite loss this step
        (one all-reduce of three numbers). Afterwards `requeue` says whether the job should go back in the queue:
        SIGUSR1 (time limit, preemption) yes; SIGTERM (scancel: the user wants it gone) no."""
        import torch

        from pipeline.training.distributed import all_reduce_sum

        self._check_stop_file()
        t = torch.tensor([1.0 if self.received == "SIGUSR1" else 0.0,
                          1.0 if self.received and self.received != "SIGUSR1" else 0.0, 0.0], device=device)
        if nonfinite is not None:
            t[2] = nonfinite.to(t.dtype)
        usr1, other, bad = all_reduce_sum(t).tolist()  # host sync: once per step, the cost of acting together
        self.requeue = usr1 > 0 and other == 0
        return usr1 + other > 0, bad > 0

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def requeue_slurm_job(log) -> bool:
    """Rank 0 only: put this SLURM job back in the queue (it then resumes from the checkpoint just written)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("DISTIL_REQUEUE", "1") != "1":
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"warning: could not requeue SLURM job {job}: {e}; resubmit it (it resumes with --resume auto)")
        return False
    if proc.returncode != 0:
        log(f"warning: scontrol requeue {job} failed ({proc.stderr.strip()}); resubmit the job to resume")
        return False
    log(f"SLURM job {job} requeued")
    return True


def report_rank_failure(rank: int, exc: BaseException) -> None:
    """One line naming the rank and the cause on stderr (every rank: the failing one may not be rank 0), then the
    traceback; the launcher then stops the other ranks."""
    print(f"[pretrain] rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    traceback.print_exc(file=sys.stderr)


class NonFiniteLoss(RuntimeError):
    """A non-finite loss under train.nonfinite=stop, or one DeepSpeed did not skip."""


def inject_nan(step: int, micro: int, rank: int) -> bool:
    """Fault injection for tests: DISTIL_INJECT_NAN=<step>:<rank> makes that rank's first micro-batch of that
    (1-based) step produce a NaN loss."""
    return micro == 0 and os.environ.get("DISTIL_INJECT_NAN") == f"{step}:{rank}"


def rank_processes(launcher_pid: int) -> dict:
    """The training processes under a `deepspeed`/launch.py launcher, by local rank: the processes whose command line
    has `--local_rank=N` and whose parent's does not (DataLoader workers are forked children with the same command
    line). For delivering signals to the ranks themselves: the launcher dies on SIGUSR1."""
    import psutil

    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd, parent = child.cmdline(), child.parent().cmdline()
        except (psutil.Error, AttributeError):
            continue
        ranks = [c.split("=", 1)[1] for c in cmd if c.startswith("--local_rank=")]
        if ranks and not any(c.startswith("--local_rank=") for c in parent):
            found[int(ranks[0])] = child
    return found
