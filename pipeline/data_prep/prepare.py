"""Data preparation: text -> tokenized, checksummed, memory-mappable shards (see docs/data_prep.md).

`prepare()` plans the inputs into units (plan.py, sources.py), runs the units of this task (unit.py) on `workers`
processes, and, when it is the only task, joins the unit records into `manifest.json` (join.py). In a SLURM
array, task i of n runs units i, i+n, i+2n, ...; `join()` runs once all tasks are done.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import sys
import time

from pipeline import shards as fmt
from pipeline.settings import check
from pipeline.tokenization import single_threaded

from .config import PrepareConfig, PrepareError, array_task_from_env
from .join import join, log_summary, task_summary
from .plan import ensure_plan, make_plan
from .readers import BadFileError
from .tokenizer import PrepTokenizer, load_prep_tokenizer
from .unit import UnitWorker

log = logging.getLogger(__name__)

MAX_LIVE_WARNINGS = 20

__all__ = ["PrepareConfig", "PrepareError", "array_task_from_env", "join", "make_plan", "prepare"]


# ---------------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------------
# Workers are spawned (fresh interpreters), never forked, on every platform. Forking copies whatever locks the
# parent's other threads hold at that moment, and the parent is not always single-threaded: loading a
# tokenizer through transformers imports torch, a fast tokenizer may have started its Rust thread pool, and
# prepare() can be called from a notebook or a test process. A spawned worker imports numpy, tokenizers and
# this package (no transformers, no torch: it gets the tokenizer's encoder, pickled). The pool starts before
# the tokenizer is loaded, so that the workers start while this process loads it and plans. Each task carries
# the pickled setup (output folder, plan, encoder); a worker unpickles it once, on its first unit, inside the
# unit's error handling: a Pool initializer that raised would be restarted by multiprocessing forever.

_MESSAGES = None  # this worker's queue to the main process, from the pool initializer
_WORKER: UnitWorker | None = None


class _WorkerSetupError(RuntimeError):
    """A pool worker could not rebuild the tokenizer: every unit would fail the same way."""


def _init_worker(messages) -> None:
    global _MESSAGES
    single_threaded()
    _MESSAGES = messages


def _run_unit(task: tuple):
    """(unit, pickled setup) -> (unit id, record or None, error or None), in a pool worker."""
    global _WORKER
    unit, setup = task
    if _WORKER is None:
        try:
            out, plan, encoder, verify = pickle.loads(setup)
        except Exception as e:
            return unit["id"], None, _WorkerSetupError(f"{type(e).__name__}: {e}")
        _WORKER = UnitWorker(out, plan, encoder, verify, lambda kind, payload: _MESSAGES.put((kind, payload)))
    return _run_unit_on(_WORKER, unit)


def _run_unit_on(worker: UnitWorker, unit: dict):
    """(unit id, record or None, error or None): errors are reported, so that other units go on."""
    try:
        return unit["id"], worker.run(unit), None
    except (BadFileError, OSError, PrepareError) as e:
        return unit["id"], None, f"{type(e).__name__}: {e}"
    except Exception as e:
        import traceback

        return unit["id"], None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


def _pool_results(pool, messages, cfg: PrepareConfig, out: str, plan: dict, tok: PrepTokenizer, units: list,
                  progress):
    """Yields each unit's result as it finishes on the pool's workers, passing on their messages."""

    def drain() -> None:
        while not messages.empty():
            progress.message(*messages.get())

    setup = pickle.dumps((out, plan, tok.encoder, cfg.verify_existing), protocol=pickle.HIGHEST_PROTOCOL)
    # biggest units first: the tail of the run is then made of small units (better balance)
    pending = pool.imap_unordered(_run_unit, [(u, setup) for u in sorted(units, key=lambda u: -u["est_bytes"])])
    for _ in units:
        while True:
            try:
                result = pending.next(timeout=0.2)
                break
            except mp.TimeoutError:
                drain()
        drain()
        if isinstance(result[2], _WorkerSetupError):  # leaving the pool's `with` terminates it
            raise PrepareError(f"a worker process could not rebuild the tokenizer {cfg.tokenizer!r} "
                               f"({result[2]}); completed units are kept, re-run to resume")
        yield result
    drain()


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total_units: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_units, unit="unit", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5)
        self.t0 = time.perf_counter()
        self.docs = self.tokens = 0
        self.warnings = 0
        self.tqdm = tqdm

    def message(self, kind: str, payload) -> None:
        if kind == "progress":
            self.docs += payload[0]
            self.tokens += payload[1]
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False)
        elif kind == "warning":
            self.warnings += 1
            if self.warnings <= MAX_LIVE_WARNINGS:
                self.tqdm.write(f"WARNING {payload}", file=sys.stderr)
            elif self.warnings == MAX_LIVE_WARNINGS + 1:
                self.tqdm.write("WARNING further warnings are counted in the summary and listed in "
                                "bad_records.jsonl", file=sys.stderr)


def _plan_task(cfg: PrepareConfig, tok: PrepTokenizer, out: str) -> tuple[dict, list]:
    """The plan (written to OUT/plan.json, or checked against the one there) and this task's units."""
    plan = make_plan(cfg, tok)
    ensure_plan(out, plan, cfg.overwrite)
    units = [u for u in plan["units"] if u["id"] % cfg.array_count == cfg.array_task]
    stale = fmt.remove_stale_tmp(out, [u["id"] for u in units])
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted earlier run", stale)
    log.info("planned %d units (%s MiB each) from %d input(s); this task runs %d of them on %d worker(s)",
             len(plan["units"]), plan["settings"]["unit_bytes"] >> 20, len(plan["sources"]), len(units), cfg.workers)
    return plan, units


def prepare(cfg: PrepareConfig) -> dict:
    """Run this task's part of the preparation; returns the manifest (single task) or a task summary."""
    check(cfg, "preparation settings")
    t0 = time.perf_counter()
    out = os.path.abspath(cfg.output)
    records, failures = {}, {}
    with contextlib.ExitStack() as stack:
        if cfg.workers > 1:
            ctx = mp.get_context("spawn")
            # Messages (progress, warnings) are written straight to a pipe (no feeder thread in the workers), so
            # every message of a unit is there before the unit's result: once all results are in, the pipe holds
            # the rest.
            messages = ctx.SimpleQueue()
            pool = stack.enter_context(ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(messages,)))
        tok = load_prep_tokenizer(cfg.tokenizer, threads=cfg.workers == 1)
        plan, units = _plan_task(cfg, tok, out)
        progress = _Progress(len(units), cfg.progress)
        if cfg.workers == 1:
            worker = UnitWorker(out, plan, tok.encoder, cfg.verify_existing, progress.message)
            results = (_run_unit_on(worker, u) for u in units)
        else:
            results = _pool_results(pool, messages, cfg, out, plan, tok, units, progress)
        for uid, rec, err in results:
            (failures.__setitem__(uid, err) if err else records.__setitem__(uid, rec))
            progress.bar.update(1)
        progress.bar.close()
    wall = time.perf_counter() - t0
    if failures:
        lines = [f"unit {uid}: {err}" for uid, err in sorted(failures.items())]
        raise PrepareError(f"{len(failures)} of {len(units)} units failed (completed units are kept; fix the "
                           f"inputs or pass --on-bad-file skip, then re-run the same command to resume):\n  "
                           + "\n  ".join(lines))
    summary = task_summary(records, wall)
    log_summary(summary, "task" if cfg.array_count > 1 else "prepared")
    if cfg.array_count == 1 and cfg.join:
        manifest = join(out, wall_seconds=wall)
        log.info("dataset written: %s", os.path.join(out, "manifest.json"))
        return manifest
    if cfg.array_count > 1:
        log.info("array task %d/%d done; run `python launch/prepare_data.py join %s` once all tasks have finished",
                 cfg.array_task, cfg.array_count, out)
    return summary
