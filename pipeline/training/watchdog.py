"""Stall watchdog: a rank that makes no training progress for `train.stall_timeout_s` ends the job.

A rank stuck in I/O, a deadlocked collective, or a stopped process holds every other rank in its next collective.
Collective timeouts do not cover this in general: DeepSpeed's CPU all-reduce spins on shared memory with no
timeout at all, and NCCL's only fires when its async error handling is on. So each rank runs a small thread that
(1) every few seconds writes a heartbeat file, <run_dir>/heartbeats/rank00000.json (host, pid, last step, time),
and (2) when its own main loop has not reported progress for the timeout, prints one line naming itself, its host,
its last step and the peers whose heartbeats went silent (a stopped or hung process stops writing them), saves the
stacks of its threads next to the heartbeat, and exits the process with status 1. The launcher (deepspeed, torchrun,
srun) then stops the other ranks, and SLURM can requeue the job, which resumes from the last checkpoint.

A thread, not a signal alarm: the main thread may be blocked inside C code (a collective) where a Python signal
handler never runs. `os._exit`, not `sys.exit`: the main thread is stuck and would never unwind.

    watchdog = StallWatchdog(timeout_s=300, rank=r, run_dir=run_dir).start()
    ... watchdog.beat(step) after every optimiser step ...
    watchdog.stop()
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time

EXIT_STALLED = 1


def heartbeat_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "heartbeats")


def poll_interval(timeout_s: float) -> float:
    """Seconds between checks and heartbeat writes: a quarter of the timeout, at most 5 s."""
    return max(0.05, min(5.0, timeout_s / 4))


class StallWatchdog:
    def __init__(self, timeout_s: float, rank: int, run_dir: str | None, *, exit=os._exit, clock=time.monotonic):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s, self.rank = float(timeout_s), rank
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.dir = heartbeat_dir(run_dir) if run_dir else None
        self.poll_s = poll_interval(self.timeout_s)
        self._exit, self._clock = exit, clock
        self.last_step: int | None = None
        self._last_progress = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: str | None = None

    # -- called by the training loop --------------------------------------------------------------------------
    def start(self, step: int | None = None) -> "StallWatchdog":
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)
        self.beat(step)
        self._write_heartbeat(0.0)
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int | None = None) -> None:
        """Progress: the loop is alive (two attribute writes; cheap enough for every step)."""
        if step is not None:
            self.last_step = step
        self._last_progress = self._clock()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 1)

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = self._clock() - self._last_progress
            self._write_heartbeat(idle)
            if idle > self.timeout_s:
                self._fire(idle)
                return

    def _heartbeat_path(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank{rank:05d}.json")

    def _write_heartbeat(self, idle: float) -> None:
        if not self.dir:
            return
        path = self._heartbeat_path(self.rank)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump({"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.last_step,
                           "idle_s": round(idle, 1), "time": time.time()}, f)
            os.replace(path + ".tmp", path)
        except OSError:  # a heartbeat is a diagnostic; a full or read-only disk must not stop training
            pass

    def silent_peers(self) -> list[str]:
        """Peers whose heartbeat is older than two poll intervals (their process is stopped, hung or gone), and
        peers that are themselves idle, as short descriptions."""
        if not self.dir or not os.path.isdir(self.dir):
            return []
        now, found = time.time(), []
        for name in sorted(os.listdir(self.dir)):
            if not (name.startswith("rank") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    hb = json.load(f)
            except (OSError, ValueError):
                continue
            if hb.get("rank") == self.rank:
                continue
            age = now - hb.get("time", 0)
            if age > 2 * self.poll_s + 1:
                found.append(f"rank {hb['rank']} on {hb['host']} (pid {hb['pid']}) silent for {age:.0f} s (its last "
                             f"heartbeat: step {hb['step']}): stopped, hung or dead")
        return found

    def _fire(self, idle: float) -> None:
        self.fired = (f"[pretrain] stall: rank {self.rank} on {self.host} (pid {self.pid}) made no progress for "
                      f"{idle:.0f} s after step {self.last_step} (train.stall_timeout_s={self.timeout_s:g})")
        peers = self.silent_peers()
        self.fired += ("; " + "; ".join(peers)) if peers else "; every peer's heartbeat is fresh (a collective or " \
                                                                 "I/O on this rank is stuck)"
        stacks = self._dump_stacks()
        self.fired += (f"; stacks in {stacks}" if stacks else "") + ". Exiting so the job can be requeued; it " \
                                                                    "resumes with --resume auto"
        # straight to stderr, on every rank: the process ends right after, whatever logging is configured to do
        print(self.fired, file=sys.stderr, flush=True)
        self._exit(EXIT_STALLED)

    def _dump_stacks(self) -> str | None:
        if not self.dir:
            return None
        path = os.path.join(self.dir, f"rank{self.rank:05d}.stacks.txt")
        try:
            with open(path, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            return None
        return path
