"""Data preparation: text -> tokenized, checksummed, memory-mappable shards (see docs/data_prep.md).

`prepare()` plans the inputs into units (sources.py), runs the units of this task on `workers` processes,
and, when it is the only task, joins the unit records into `manifest.json`. In a SLURM array, task i of n
runs units i, i+n, i+2n, ...; `join()` runs once all tasks are done.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline import shards as fmt
from pipeline.fileio import atomic_write
from pipeline.settings import check, doc

from .cleaning import CleanConfig, clean, decode
from .sources import BadFileError, PieceStats, Source, describe_location, group_units, iter_piece, parse_spec, \
    plan_pieces
from .tokenizer import Encoder, PrepTokenizer, flat_ids, load_prep_tokenizer, single_threaded

log = logging.getLogger(__name__)

MAX_LIVE_WARNINGS = 20
MAX_BAD_RECORDS_PER_UNIT = 100
BATCH_DOCS, BATCH_CHARS = 1024, 1 << 20  # a batch goes to the tokenizer once it has this many documents or chars


class PrepareError(RuntimeError):
    """Preparation failed; the message says which units or inputs and why."""


@dataclass
class PrepareConfig:
    """Settings of one preparation run (`launch/prepare_data.py --help` lists them). Fields marked (plan) are
    part of the dataset's identity: a re-run into the same output folder must use the same values."""

    inputs: list = doc("input specs: file, folder, glob, hf:NAME or disk:FOLDER, with #key=value options "
                       "(see sources.py)", default_factory=list)
    output: str = doc("dataset folder", "runs/sample/data")
    tokenizer: str = doc("(plan) Hugging Face name or folder, or a SentencePiece .model file", "bert-base-uncased")
    workers: int = doc("processes; 1 lets the tokenizer use its own threads on all cores", 1)
    text_field: str = doc("(plan) default field of JSON / Parquet / dataset records", "text")
    text_mode: str = doc("(plan) plain text: documents separated by blank lines, or one per line", "paragraphs",
                         choices=("paragraphs", "lines"))
    valid_fraction: float = doc("(plan) share of documents in the validation split", 0.005)
    split_seed: str = doc("(plan) salt of the document hash that assigns splits", "distil")
    unit_mb: float | None = doc("(plan) input MiB per unit/shard; default: auto (corpus/64, 1..64 MiB)", None)
    max_doc_chars: int = doc("(plan) longer documents are cut into pieces at whitespace", 1_000_000)
    max_record_mb: int = doc("(plan) JSON records longer than this are skipped", 64)
    max_junk_fraction: float = doc("(plan) documents with more junk characters are dropped as binary", 0.1)
    on_bad_file: str = doc("an unreadable file stops the run (error), or is left out and counted (skip)", "error",
                           choices=("error", "skip"))
    verify_existing: str = doc("how completed units are checked on resume: full (sha256) or size", "full",
                               choices=("full", "size"))
    array_task: int = doc("this task's index in a SLURM array (default: from SLURM_ARRAY_TASK_ID)", 0)
    array_count: int = doc("tasks in the array (default: from the SLURM_ARRAY_* variables)", 1)
    overwrite: bool = doc("delete an existing dataset in the output folder first", False)
    join: bool = doc("write manifest.json at the end (single task only)", True)
    progress: bool = doc("show a progress bar", True)
    command: list = doc("the command line recorded in the plan", default_factory=lambda: list(sys.argv))

    def problems(self) -> list[str]:
        p = []
        if not self.inputs:
            p.append("inputs: give at least one --input")
        if self.workers < 1:
            p.append(f"workers: must be >= 1, got {self.workers}")
        if not 0 <= self.valid_fraction < 1:
            p.append(f"valid_fraction: must be in [0, 1), got {self.valid_fraction}")
        if not 0 <= self.array_task < max(self.array_count, 1):
            p.append(f"array_task: must be in [0, {self.array_count}), got {self.array_task}")
        if self.overwrite and self.array_count > 1:
            p.append("overwrite: not allowed in an array (tasks would delete each other's work); clear the "
                     "folder before submitting")
        if self.unit_mb is not None and self.unit_mb <= 0:
            p.append(f"unit_mb: must be > 0, got {self.unit_mb}")
        if self.max_doc_chars < 1000:
            p.append(f"max_doc_chars: must be >= 1000, got {self.max_doc_chars}")
        return p


# ---------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------

def _plan_settings(cfg: PrepareConfig, unit_bytes: int) -> dict:
    return {"text_field": cfg.text_field, "text_mode": cfg.text_mode, "valid_fraction": cfg.valid_fraction,
            "split_seed": cfg.split_seed, "unit_bytes": unit_bytes, "max_doc_chars": cfg.max_doc_chars,
            "max_record_bytes": cfg.max_record_mb << 20, "max_junk_fraction": cfg.max_junk_fraction,
            "on_bad_file": cfg.on_bad_file}


def make_plan(cfg: PrepareConfig, tok: PrepTokenizer) -> dict:
    sources = [parse_spec(s, i, cfg.text_field, cfg.text_mode) for i, s in enumerate(cfg.inputs)]
    unit_bytes = None if cfg.unit_mb is None else max(1, int(cfg.unit_mb * (1 << 20)))
    pieces, notes, unit_bytes = plan_pieces(sources, unit_bytes)
    for n in notes:
        log.warning(n)
    units = group_units(pieces, unit_bytes)
    files = {}
    for p in pieces:
        if p["format"] not in ("hf",) and os.path.exists(p["path"]) and p["path"] not in files:
            st = os.stat(p["path"])
            files[p["path"]] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns} if os.path.isfile(p["path"]) \
                else {"folder": True}
    info = tok.info()
    ident = {"format_version": fmt.FORMAT_VERSION, "settings": _plan_settings(cfg, unit_bytes),
             "tokenizer": {"fingerprint": info.fingerprint, "vocab_size": info.vocab_size},
             "sources": [s.to_json() for s in sources], "files": files, "units": units}
    plan_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"plan_id": plan_id, **ident, "tokenizer": info.to_json(), "dtype": tok.dtype.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": cfg.command}


def _diff_plans(a: dict, b: dict) -> list[str]:
    keys = []
    for k in ("settings", "sources", "files", "units"):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict):
                keys += [f"{k}.{kk}" for kk in sorted(set(a[k]) | set(b.get(k) or {})) if a[k].get(kk) != b[k].get(kk)]
            else:
                keys.append(k)
    if a["tokenizer"]["fingerprint"] != b["tokenizer"]["fingerprint"]:
        keys.append("tokenizer (another vocabulary or normalisation)")
    return keys[:10]


def ensure_plan(out: str, plan: dict, overwrite: bool) -> None:
    """Create OUT/plan.json, or check that the one there (another task's, or an earlier run's) is the same
    plan. Creation is atomic and exclusive, so concurrent array tasks agree on one file."""
    path = os.path.join(out, "plan.json")
    if overwrite and os.path.isdir(out):
        for name in ("plan.json", "manifest.json", "token_counts.npy", "bad_records.jsonl",
                     "units", "counts", *fmt.SPLITS):
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    try:
        with atomic_write(path, "w", exclusive=True) as f:
            json.dump(plan, f, indent=1)
        return
    except FileExistsError:
        pass
    with open(path) as f:
        existing = json.load(f)
    if existing.get("plan_id") != plan["plan_id"]:
        raise PrepareError(
            f"{out} holds a dataset planned from other inputs or settings (differs in: "
            f"{', '.join(_diff_plans(existing, plan)) or 'plan id'}). Re-run with the same arguments to resume, "
            f"pass --overwrite to start over, or choose another --output.")


# ---------------------------------------------------------------------------------------------------------
# One unit (runs in a worker process)
# ---------------------------------------------------------------------------------------------------------

class _Worker:
    """Per-process state: the plan and the encoder, and a way to send messages to the main process."""

    def __init__(self, out: str, plan: dict, encoder: Encoder, verify: str, send):
        self.out = out
        self.plan = plan
        self.encoder = encoder
        self.sources = [Source(**s) for s in plan["sources"]]
        self.verify = verify
        self.send = send  # send(kind, payload): "progress" or "warning"

    def run(self, unit: dict) -> dict:
        """Tokenize a unit, or take it as done when its record and files check out (resume)."""
        paths = fmt.unit_paths(unit["id"])
        record_path = os.path.join(self.out, paths["record"])
        if os.path.exists(record_path):
            try:
                with open(record_path) as f:
                    rec = json.load(f)
                problems = [] if rec.get("plan_id") == self.plan["plan_id"] else ["made by another plan"]
                problems = problems or fmt.check_files(self.out, rec, full=self.verify == "full")
            except (ValueError, KeyError) as e:
                problems = [f"unreadable record ({e})"]
            if not problems:
                rec["resumed"] = True
                return rec
            self.send("warning", f"unit {unit['id']}: redoing, its files failed verification: {'; '.join(problems)}")
            os.unlink(record_path)  # the record must never outlive the files it vouches for
        skipped: dict = {}
        while True:
            try:
                rec = _UnitRun(self, unit, paths, skipped).run()
                break
            except BadFileError as e:
                if self.plan["settings"]["on_bad_file"] != "skip" or e.path in skipped:
                    raise
                skipped[e.path] = e.reason
                self.send("warning", f"skipping unreadable file {e.path}: {e.reason} (unit {unit['id']} redone "
                                     f"without it)")
        with atomic_write(record_path, "w") as f:
            json.dump(rec, f, indent=1)
        return rec


class _UnitRun:
    """One attempt at a unit: reads its pieces, cleans the documents, tokenizes them a batch at a time and
    streams them into the shard writers; `run()` returns the unit's record."""

    def __init__(self, worker: _Worker, unit: dict, paths: dict, skipped: dict):
        self.w, self.unit, self.paths, self.skipped = worker, unit, paths, skipped
        st = worker.plan["settings"]
        self.clean_cfg = CleanConfig(max_doc_chars=st["max_doc_chars"], max_junk_fraction=st["max_junk_fraction"])
        self.valid_threshold = int(st["valid_fraction"] * 2 ** 64)
        self.split_hash = functools.partial(hashlib.blake2b, digest_size=8,
                                            key=hashlib.sha256(st["split_seed"].encode()).digest()[:16])
        self.dtype = np.dtype(worker.plan["dtype"])
        self.vocab_size = worker.plan["tokenizer"]["vocab_size"]
        self.counts = np.zeros(self.vocab_size, np.int64)
        self.dropped, self.repaired, self.bad_counts = Counter(), Counter(), Counter()
        self.bad_records: list = []
        self.docs_read = 0
        self.tokenizer_s = 0.0  # time in the tokenizer, ids included (the rest of `seconds` is our own work)
        self.texts: list[str] = []  # the batch for the tokenizer
        self.chars = 0

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.writers = {s: fmt.ShardWriter(self.w.out, self.paths[f"{s}_bin"], self.paths[f"{s}_idx"], self.dtype)
                        for s in fmt.SPLITS}
        try:
            piece_lines = [self.read_piece(i, piece) for i, piece in enumerate(self.unit["pieces"])]
            self.flush()
            splits = {s: w.commit() for s, w in self.writers.items()}
        except BaseException:
            for w in self.writers.values():
                w.abort()
            raise
        buf = io.BytesIO()
        np.save(buf, self.counts)
        with atomic_write(os.path.join(self.w.out, self.paths["counts"])) as f:
            f.write(buf.getvalue())
        return {
            "unit": self.unit["id"], "plan_id": self.w.plan["plan_id"], "splits": splits,
            "counts": {"file": self.paths["counts"], "bytes": len(buf.getvalue()),
                       "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
            "stats": {"documents_read": self.docs_read, "dropped": dict(self.dropped),
                      "repaired": dict(self.repaired), "bad_records": dict(self.bad_counts)},
            "piece_lines": piece_lines, "bad_records": self.bad_records,
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped.items()],
            "seconds": round(time.perf_counter() - t0, 3), "tokenizer_seconds": round(self.tokenizer_s, 3),
            "host": socket.gethostname(),
        }

    def read_piece(self, index: int, piece: dict) -> int | None:
        """Every document of one piece into the batches; returns the lines that start in the piece (None when
        its file is skipped)."""
        if piece["path"] in self.skipped:
            return None
        stats = PieceStats()
        st = self.w.plan["settings"]

        def bad(reason: str, loc: int, detail: str) -> None:
            self.bad_counts[reason] += 1
            if len(self.bad_records) < MAX_BAD_RECORDS_PER_UNIT:
                self.bad_records.append({"piece": index, "loc": loc, "reason": reason, "detail": detail[:200]})
            self.w.send("warning", f"{describe_location(piece, loc)}: skipped record ({reason}: {detail[:120]})")

        source = self.w.sources[piece["source"]]
        for payload, loc, flag in iter_piece(piece, source, st["max_doc_chars"], st["max_record_bytes"], stats, bad):
            self.docs_read += 1
            self.add(payload, loc, flag, bad)
        return stats.lines

    def add(self, payload: str | bytes, loc: int, flag: bool, bad) -> None:
        """One document as read (text bytes: flag = cut from a longer one; JSON text: flag = UTF-8 repaired)."""
        if isinstance(payload, bytes):
            text, utf8_repaired = decode(payload)
            was_cut = flag
        else:
            text, utf8_repaired, was_cut = payload, flag, False
        pieces, reason, repairs = clean(text, self.clean_cfg, utf8_repaired)
        self.repaired.update(repairs + ["split_long"] * was_cut)
        if reason:
            self.dropped[reason] += 1
            if reason == "binary":
                bad(reason, loc, "document is mostly invalid UTF-8 or control characters")
            return
        self.texts += pieces
        self.chars += sum(map(len, pieces))
        if len(self.texts) >= BATCH_DOCS or self.chars >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        """Tokenize the batch (one call of the tokenizer), assign each document's split, write and count."""
        texts, chars = self.texts, self.chars
        if not texts:
            return
        self.texts, self.chars = [], 0
        t0 = time.perf_counter()
        flat, lengths = flat_ids(self.w.encoder(texts), self.dtype)
        self.tokenizer_s += time.perf_counter() - t0
        valid = self.valid_mask(texts)
        if not lengths.all():  # text that tokenizes to nothing (e.g. only unknown whitespace)
            self.dropped["no_tokens"] += int((lengths == 0).sum())
            valid, lengths = valid[lengths > 0], lengths[lengths > 0]
        n_docs, n_tokens = len(lengths), len(flat)
        if valid.any():
            token_valid = np.repeat(valid, lengths)
            self.writers["valid"].add(flat[token_valid], lengths[valid])
            flat, lengths = flat[~token_valid], lengths[~valid]
        self.writers["train"].add(flat, lengths)
        self.counts += np.bincount(flat, minlength=self.vocab_size)[: self.vocab_size]
        self.w.send("progress", (n_docs, n_tokens, chars))

    def valid_mask(self, texts: list[str]) -> np.ndarray:
        """Which documents go to the validation split: those whose keyed hash, blake2b(UTF-8 text,
        digest_size=8, key=sha256(split_seed)[:16]) read as a little-endian integer, is below the threshold."""
        if self.valid_threshold >= 1 << 64:
            return np.ones(len(texts), bool)
        digests = b"".join(self.split_hash(t.encode("utf-8", "surrogatepass")).digest() for t in texts)
        return np.frombuffer(digests, "<u8") < np.uint64(self.valid_threshold)


# ---------------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------------
# Workers are spawned (fresh interpreters), never forked, on every platform. Forking copies whatever locks the
# parent's other threads hold at that moment, and the parent is not always single-threaded: loading a
# tokenizer through transformers imports torch, a fast tokenizer may have started its Rust thread pool, and
# prepare() can be called from a notebook or a test process. A spawned worker imports numpy, tokenizers and
# this package (no transformers, no torch: it gets the tokenizer's encoder, pickled) and costs a fraction of
# a second once per run. The encoder travels pickled and is rebuilt on the worker's first unit, inside the
# unit's error handling: a Pool initializer that raised would be restarted by multiprocessing forever.

_SETUP: tuple | None = None  # (out, plan, pickled encoder, verify, messages), from the pool initializer
_WORKER: _Worker | None = None


class _WorkerSetupError(RuntimeError):
    """A pool worker could not rebuild the tokenizer: every unit would fail the same way."""


def _init_worker(*setup) -> None:
    global _SETUP
    single_threaded()
    _SETUP = setup


def _worker() -> _Worker:
    global _WORKER
    if _WORKER is None:
        out, plan, encoder, verify, messages = _SETUP
        try:
            encoder = pickle.loads(encoder)
        except Exception as e:
            raise _WorkerSetupError(f"{type(e).__name__}: {e}") from None
        _WORKER = _Worker(out, plan, encoder, verify, lambda kind, payload: messages.put((kind, payload)))
    return _WORKER


def _run_unit(unit: dict, worker: _Worker | None = None):
    """unit -> (unit id, record or None, error or None); errors are reported, so that other units go on."""
    try:
        return unit["id"], (worker or _worker()).run(unit), None
    except _WorkerSetupError as e:
        return unit["id"], None, e
    except (BadFileError, OSError, PrepareError) as e:
        return unit["id"], None, f"{type(e).__name__}: {e}"
    except Exception as e:
        import traceback

        return unit["id"], None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


def _run_pool(cfg: PrepareConfig, out: str, plan: dict, tok: PrepTokenizer, units: list, progress):
    """Yields each unit's result as it finishes, on `cfg.workers` spawned processes."""
    ctx = mp.get_context("spawn")
    # Messages (progress, warnings) are written straight to a pipe (no feeder thread in the workers), so every
    # message of a unit is there before the unit's result: once all results are in, the pipe holds the rest.
    messages = ctx.SimpleQueue()

    def drain() -> None:
        while not messages.empty():
            progress.message(*messages.get())

    setup = (out, plan, pickle.dumps(tok.encoder, protocol=pickle.HIGHEST_PROTOCOL), cfg.verify_existing, messages)
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=setup) as pool:
        # biggest units first: the tail of the run is then made of small units (better balance)
        pending = pool.imap_unordered(_run_unit, sorted(units, key=lambda u: -u["est_bytes"]))
        for _ in units:
            while True:
                try:
                    result = pending.next(timeout=0.2)
                    break
                except mp.TimeoutError:
                    drain()
            drain()
            if isinstance(result[2], _WorkerSetupError):  # leaving the `with` terminates the pool
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
    tok = load_prep_tokenizer(cfg.tokenizer, threads=cfg.workers == 1)
    plan, units = _plan_task(cfg, tok, out)
    progress = _Progress(len(units), cfg.progress)
    if cfg.workers == 1:
        worker = _Worker(out, plan, tok.encoder, cfg.verify_existing, progress.message)
        results = (_run_unit(u, worker) for u in units)
    else:
        results = _run_pool(cfg, out, plan, tok, units, progress)
    records, failures = {}, {}
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
    summary = _task_summary(records, wall)
    _log_summary(summary, "task" if cfg.array_count > 1 else "prepared")
    if cfg.array_count == 1 and cfg.join:
        manifest = join(out, wall_seconds=wall)
        log.info("dataset written: %s", os.path.join(out, "manifest.json"))
        return manifest
    if cfg.array_count > 1:
        log.info("array task %d/%d done; run `python launch/prepare_data.py join %s` once all tasks have finished",
                 cfg.array_task, cfg.array_count, out)
    return summary


def _task_summary(records: dict, wall: float) -> dict:
    dropped, repaired, bad = Counter(), Counter(), Counter()
    docs = tokens = read = 0
    resumed = skipped_files = 0
    split_totals = {s: {"documents": 0, "tokens": 0} for s in fmt.SPLITS}
    for rec in records.values():
        st = rec["stats"]
        dropped.update(st["dropped"])
        repaired.update(st["repaired"])
        bad.update(st["bad_records"])
        read += st["documents_read"]
        skipped_files += len(rec.get("skipped_files", []))
        resumed += bool(rec.get("resumed"))
        for s in fmt.SPLITS:
            split_totals[s]["documents"] += rec["splits"][s]["docs"]
            split_totals[s]["tokens"] += rec["splits"][s]["tokens"]
    docs = sum(v["documents"] for v in split_totals.values())
    tokens = sum(v["tokens"] for v in split_totals.values())
    return {"units": len(records), "units_resumed": resumed, "documents_read": read, "documents": docs,
            "tokens": tokens, "splits": split_totals, "dropped": dict(dropped), "repaired": dict(repaired),
            "bad_records": dict(bad), "skipped_files": skipped_files, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / max(wall, 1e-9)), "documents_per_s": round(docs / max(wall, 1e-9))}


def _log_summary(s: dict, what: str) -> None:
    log.info("%s %s documents (train %s, valid %s) and %s tokens from %s units (%s resumed) in %.1f s: "
             "%s docs/s, %s tok/s", what, f"{s['documents']:,}", f"{s['splits']['train']['documents']:,}",
             f"{s['splits']['valid']['documents']:,}", f"{s['tokens']:,}", s["units"], s["units_resumed"],
             s["seconds"], f"{s['documents_per_s']:,}", f"{s['tokens_per_s']:,}")
    log.info("dropped %s; repaired %s; bad records %s; skipped files %d",
             _fmt_counts(s["dropped"]), _fmt_counts(s["repaired"]), _fmt_counts(s["bad_records"]), s["skipped_files"])


def _fmt_counts(c: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(c.items())) if c else "none"


# ---------------------------------------------------------------------------------------------------------
# Join
# ---------------------------------------------------------------------------------------------------------

def join(out: str, wall_seconds: float | None = None, command: list | None = None) -> dict:
    """Check every unit of the plan is complete, sum the token counts, resolve bad-record line numbers and
    write manifest.json (last, atomically). Shard files stay where they are: nothing is copied."""
    out = os.path.abspath(out)
    plan_path = os.path.join(out, "plan.json")
    if not os.path.exists(plan_path):
        raise PrepareError(f"{out} has no plan.json: run prepare first")
    with open(plan_path) as f:
        plan = json.load(f)
    records, problems = [], []
    for unit in plan["units"]:
        rel = fmt.unit_paths(unit["id"])["record"]
        path = os.path.join(out, rel)
        if not os.path.exists(path):
            problems.append(f"unit {unit['id']}: not done ({rel} missing)")
            continue
        with open(path) as f:
            rec = json.load(f)
        if rec.get("plan_id") != plan["plan_id"]:
            problems.append(f"unit {unit['id']}: made by another plan ({rec.get('plan_id')} != {plan['plan_id']})")
            continue
        problems += [f"unit {unit['id']}: {p}" for p in fmt.check_files(out, rec, full=False)]
        records.append(rec)
    if problems:
        head = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise PrepareError(f"cannot join {out}: {len(problems)} unit(s) incomplete. Re-run the preparation (or the "
                           "failed array tasks) with the same arguments; completed units are skipped.\n  - "
                           + "\n  - ".join(head))

    # temporary files of an earlier join that was killed while writing (validate reports them)
    for name in os.listdir(out):
        if name.startswith(tuple(f"{n}{fmt.TMP_MARK}" for n in ("manifest.json", "token_counts.npy",
                                                                  "bad_records.jsonl"))):
            try:
                os.unlink(os.path.join(out, name))
            except OSError:
                pass

    counts = np.zeros(plan["tokenizer"]["vocab_size"], np.int64)
    for rec in records:
        counts += np.load(os.path.join(out, rec["counts"]["file"]))
    buf = io.BytesIO()
    np.save(buf, counts)
    with atomic_write(os.path.join(out, "token_counts.npy")) as f:
        f.write(buf.getvalue())

    # Absolute line numbers: the pieces of a file are consecutive in plan order, each record knows how many
    # lines started in its pieces, so a prefix sum gives each piece's first line.
    line_offset, running = {}, {}
    rec_by_unit = {r["unit"]: r for r in records}
    for unit in plan["units"]:
        for pi, piece in enumerate(unit["pieces"]):
            key = (piece["path"], piece.get("start"))
            line_offset[key] = running.get(piece["path"], 0)
            n = rec_by_unit[unit["id"]]["piece_lines"][pi]
            running[piece["path"]] = running.get(piece["path"], 0) + (n or 0)
    bad_lines = []
    for unit in plan["units"]:
        rec = rec_by_unit[unit["id"]]
        for b in rec["bad_records"]:
            piece = unit["pieces"][b["piece"]]
            where = describe_location(piece, b["loc"], line_offset.get((piece["path"], piece.get("start"))))
            bad_lines.append(json.dumps({"where": where, "reason": b["reason"], "detail": b["detail"]}))
        for s in rec.get("skipped_files", []):
            bad_lines.append(json.dumps({"where": s["path"], "reason": "skipped_file", "detail": s["reason"]}))
    with atomic_write(os.path.join(out, "bad_records.jsonl"), "w") as f:
        f.writelines(line + "\n" for line in bad_lines)

    summary = _task_summary({r["unit"]: r for r in records}, wall_seconds or 0.0)
    summary.pop("units_resumed")
    if wall_seconds is None:
        for k in ("seconds", "tokens_per_s", "documents_per_s"):
            summary.pop(k)
    summary["worker_seconds"] = round(sum(r["seconds"] for r in records), 2)
    summary["tokenizer_seconds"] = round(sum(r.get("tokenizer_seconds", 0.0) for r in records), 2)
    shards = {s: [{"unit": r["unit"], **{k: v for k, v in r["splits"][s].items()}} for r in records]
              for s in fmt.SPLITS}
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "plan_id": plan["plan_id"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": plan["dtype"],
        "index_dtype": "int64",
        "tokenizer": plan["tokenizer"],
        "split": {"method": "blake2b-64 of the document text keyed by split_seed < valid_fraction * 2^64",
                  "valid_fraction": plan["settings"]["valid_fraction"], "split_seed": plan["settings"]["split_seed"]},
        "settings": plan["settings"],
        "sources": plan["sources"],
        "command": plan["command"],
        "join_command": command or list(sys.argv),
        "totals": summary["splits"],
        "shards": shards,
        "token_counts": {"file": "token_counts.npy", "split": "train", "bytes": len(buf.getvalue()),
                         "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
        "bad_records": {"file": "bad_records.jsonl", "count": len(bad_lines)},
        "stats": summary,
    }
    with atomic_write(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def array_task_from_env(env=os.environ) -> tuple[int, int] | None:
    """(task index, task count) of a SLURM array job, counted from the array's first index; None outside one."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    elif "SLURM_ARRAY_TASK_MAX" in env:
        count = int(env["SLURM_ARRAY_TASK_MAX"]) - lo + 1
    else:
        raise PrepareError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX")
    step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
    if step != 1:
        raise PrepareError(f"array step {step} is not supported: submit --array=0-{count - 1} (step 1)")
    return task - lo, count


__all__ = ["PrepareConfig", "PrepareError", "prepare", "join", "array_task_from_env"]
