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
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from operator import methodcaller

import numpy as np

from . import format as fmt
from .cleaning import CleanConfig, clean, decode, ready_text, ready_texts
from .sources import BadFileError, DocBlock, PieceStats, Source, describe_location, group_units, iter_piece, \
    parse_spec, plan_pieces
from .tokenizer import TextTokenizer, load_prep_tokenizer, worker_tokenizer

log = logging.getLogger("pipeline.data_prep")

MAX_LIVE_WARNINGS = 20
MAX_BAD_RECORDS_PER_UNIT = 100
BATCH_DOCS, BATCH_CHARS = 1024, 1 << 20  # a batch goes to the tokenizer once it has this many documents or chars
_DIGEST = methodcaller("digest")


class PrepareError(RuntimeError):
    """Preparation failed; the message says which units or inputs and why."""


@dataclass
class PrepareConfig:
    """Settings of one preparation run. Fields marked (plan) are part of the dataset's identity: a re-run
    into the same output folder must use the same values."""

    inputs: list  # input specs (see sources.py)
    output: str  # dataset folder
    tokenizer: str = "bert-base-uncased"  # (plan) HF name or folder, or a SentencePiece .model file
    workers: int = 1  # processes; 1 lets the tokenizer use its own threads on all cores
    text_field: str = "text"  # (plan) default field of JSON / Parquet / dataset records
    text_mode: str = "paragraphs"  # (plan) plain text: "paragraphs" (blank-line separated) or "lines"
    valid_fraction: float = 0.005  # (plan) share of documents in the validation split
    split_seed: str = "distil"  # (plan) salt of the document hash that assigns splits
    unit_mb: float | None = None  # (plan) input bytes per unit/shard; None: auto (corpus/64, 1..64 MiB)
    max_doc_chars: int = 1_000_000  # (plan) longer documents are cut into pieces at whitespace
    max_record_mb: int = 64  # (plan) JSON records longer than this are skipped
    max_junk_fraction: float = 0.1  # (plan) documents with more junk characters are dropped as binary
    on_bad_file: str = "error"  # "error" stops on an unreadable file; "skip" leaves it out and counts it
    verify_existing: str = "full"  # resume check of completed units: "full" (sha256) or "size"
    array_task: int = 0  # this task's index in a SLURM array
    array_count: int = 1  # tasks in the array
    overwrite: bool = False  # delete an existing dataset in `output` first
    join: bool = True  # write manifest.json at the end (single task only)
    progress: bool = True
    command: list = field(default_factory=lambda: list(sys.argv))

    def problems(self) -> list[str]:
        p = []
        if not self.inputs:
            p.append("inputs: give at least one --input")
        if self.workers < 1:
            p.append(f"workers: must be >= 1, got {self.workers}")
        if not 0 <= self.valid_fraction < 1:
            p.append(f"valid_fraction: must be in [0, 1), got {self.valid_fraction}")
        if self.text_mode not in ("paragraphs", "lines"):
            p.append(f"text_mode: 'paragraphs' or 'lines', got {self.text_mode!r}")
        if self.on_bad_file not in ("error", "skip"):
            p.append(f"on_bad_file: 'error' or 'skip', got {self.on_bad_file!r}")
        if self.verify_existing not in ("full", "size"):
            p.append(f"verify_existing: 'full' or 'size', got {self.verify_existing!r}")
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


def make_plan(cfg: PrepareConfig, tok: TextTokenizer) -> dict:
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
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}{fmt.TMP_MARK}{os.getpid()}-{socket.gethostname()}"
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
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
    """Per-process state: the tokenizer and the plan, loaded once by the pool initializer."""

    def __init__(self, out: str, plan: dict, tokenizer, verify: str, messages):
        self.out = out
        self.plan = plan
        self.tok = tokenizer  # a TextTokenizer, or its encode-only twin in worker processes
        self.sources = [Source(**s) for s in plan["sources"]]
        st = plan["settings"]
        self.clean_cfg = CleanConfig(max_doc_chars=st["max_doc_chars"], max_junk_fraction=st["max_junk_fraction"])
        self.valid_threshold = int(st["valid_fraction"] * 2 ** 64)
        self.split_key = hashlib.sha256(st["split_seed"].encode()).digest()[:16]
        self._split_hasher = functools.partial(hashlib.blake2b, digest_size=8, key=self.split_key)
        self.verify = verify
        self.messages = messages  # queue to the main process, or a callable when running inline

    def send(self, kind: str, payload) -> None:
        if callable(self.messages):
            self.messages(kind, payload)
        else:
            self.messages.put((kind, payload))

    def valid_mask(self, blobs: list[bytes]) -> np.ndarray:
        """Which documents (given as UTF-8 bytes) go to the validation split: those whose keyed hash,
        blake2b(doc, digest_size=8, key=split_key) read as a little-endian integer, is below the threshold.
        Maps and one numpy comparison: no Python step per document."""
        if self.valid_threshold >= 1 << 64:
            return np.ones(len(blobs), bool)
        digests = b"".join(map(_DIGEST, map(self._split_hasher, blobs)))
        return np.frombuffer(digests, "<u8") < np.uint64(self.valid_threshold)

    def run(self, unit: dict) -> dict:
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
                rec = self._tokenize_unit(unit, paths, skipped)
                break
            except BadFileError as e:
                if self.plan["settings"]["on_bad_file"] != "skip" or e.path in skipped:
                    raise
                skipped[e.path] = e.reason
                self.send("warning", f"skipping unreadable file {e.path}: {e.reason} (unit {unit['id']} redone "
                                     f"without it)")
        fmt.atomic_write_json(record_path, rec)
        return rec

    def _tokenize_unit(self, unit: dict, paths: dict, skipped: dict) -> dict:
        t0 = time.perf_counter()
        tok = self.tok
        writers = {s: fmt.ShardWriter(self.out, paths[f"{s}_bin"], paths[f"{s}_idx"], tok.dtype) for s in fmt.SPLITS}
        counts = np.zeros(tok.vocab_size, np.int64)
        dropped, repaired, bad_counts = Counter(), Counter(), Counter()
        bad_records: list = []
        piece_lines: list = []
        docs_read = 0
        tokenizer_s = 0.0  # time in the tokenizer, ids included (the rest of `seconds` is our own work)
        batch: list[str] = []  # texts for the tokenizer
        blobs: list[bytes] = []  # their UTF-8 bytes, for the split hash
        batch_chars = 0

        def flush() -> None:
            nonlocal batch, blobs, batch_chars, tokenizer_s
            if not batch:
                return
            t_enc = time.perf_counter()
            flat, lengths = tok.encode_flat(batch)
            tokenizer_s += time.perf_counter() - t_enc
            valid = self.valid_mask(blobs)
            if not lengths.all():  # text that tokenizes to nothing (e.g. only unknown whitespace)
                dropped["no_tokens"] += int((lengths == 0).sum())
                keep = lengths > 0
                valid, lengths = valid[keep], lengths[keep]
            n_docs, n_tokens = len(lengths), len(flat)
            if valid.any():
                token_valid = np.repeat(valid, lengths)
                writers["valid"].add(flat[token_valid], lengths[valid])
                flat, lengths = flat[~token_valid], lengths[~valid]
            writers["train"].add(flat, lengths)
            counts[:] += np.bincount(flat, minlength=tok.vocab_size)[: tok.vocab_size]
            self.send("progress", (n_docs, n_tokens, batch_chars))
            batch, blobs, batch_chars = [], [], 0

        def flush_if_full() -> None:
            if len(batch) >= BATCH_DOCS or batch_chars >= BATCH_CHARS:
                flush()

        max_chars = self.clean_cfg.max_doc_chars

        def add(payload, loc, flag, bad) -> None:  # one document
            nonlocal batch_chars
            # fast path, most documents: text that needs no cleaning, not cut from a longer one (flag).
            # The calls it saves cost ~1 us per document, ~5% of the tokenizer's time on short documents.
            text = None if flag else ready_text(payload, max_chars)
            if text is not None:
                batch.append(text)
                blobs.append(payload if payload.__class__ is bytes else text.encode("utf-8", "surrogatepass"))
                batch_chars += len(text)
            else:
                if isinstance(payload, bytes):
                    text, utf8_repaired = decode(payload)
                    was_cut = flag
                else:
                    text, utf8_repaired, was_cut = payload, flag, False
                pieces, reason, repairs = clean(text, self.clean_cfg, utf8_repaired)
                if was_cut:
                    repairs.append("split_long")
                for r in repairs:
                    repaired[r] += 1
                if reason:
                    dropped[reason] += 1
                    if reason == "binary":
                        bad(reason, loc, "document is mostly invalid UTF-8 or control characters")
                    return
                batch.extend(pieces)
                blobs.extend(p.encode("utf-8", "surrogatepass") for p in pieces)
                batch_chars += sum(map(len, pieces))
            flush_if_full()
        try:
            for pi, piece in enumerate(unit["pieces"]):
                if piece["path"] in skipped:
                    piece_lines.append(None)
                    continue
                source = self.sources[piece["source"]]
                pstats = PieceStats()

                def bad(reason, loc, detail, piece=piece, pi=pi):
                    bad_counts[reason] += 1
                    if len(bad_records) < MAX_BAD_RECORDS_PER_UNIT:
                        bad_records.append({"piece": pi, "loc": loc, "reason": reason, "detail": detail[:200]})
                    self.send("warning", f"{describe_location(piece, loc)}: skipped record ({reason}: {detail[:120]})")

                max_record = self.plan["settings"]["max_record_bytes"]
                for payload, loc, flag in iter_piece(piece, source, max_chars, max_record, pstats, bad, blocks=True):
                    if payload.__class__ is not DocBlock:
                        docs_read += 1
                        add(payload, loc, flag, bad)
                        continue
                    # Whole documents of one read of a text file, a slice at a time: when all of a slice are
                    # ready (almost always), they join the batch together, with no Python step per document.
                    # Slices are decoded just before they are tokenized, while their bytes are still in cache.
                    docs = payload.docs
                    docs_read += len(docs)
                    for lo in range(0, len(docs), BATCH_DOCS):
                        part = docs[lo:lo + BATCH_DOCS]
                        texts = ready_texts(part, max_chars)
                        if texts is None:
                            for i, doc in enumerate(part, lo):
                                add(doc, payload.line_of(i), False, bad)
                            continue
                        batch.extend(texts)
                        blobs.extend(part)
                        batch_chars += sum(map(len, texts))
                        flush_if_full()
                piece_lines.append(pstats.lines)
            flush()
            splits = {s: w.commit() for s, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        buf = io.BytesIO()
        np.save(buf, counts)
        counts_path = os.path.join(self.out, paths["counts"])
        fmt.atomic_write_bytes(counts_path, buf.getvalue())
        return {
            "unit": unit["id"], "plan_id": self.plan["plan_id"], "splits": splits,
            "counts": {"file": paths["counts"], "bytes": len(buf.getvalue()),
                       "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
            "stats": {"documents_read": docs_read, "dropped": dict(dropped), "repaired": dict(repaired),
                      "bad_records": dict(bad_counts)},
            "piece_lines": piece_lines, "bad_records": bad_records,
            "skipped_files": [{"path": p, "reason": r} for p, r in skipped.items()],
            "seconds": round(time.perf_counter() - t0, 3), "tokenizer_seconds": round(tokenizer_s, 3),
            "host": socket.gethostname(),
        }


_WORKER: _Worker | None = None
_MESSAGES = None  # a pool worker's queue to the main process
_INHERITED = None  # what a forked pool worker got from the main process (see _init_worker)


def _init_worker(messages, inherited: tuple | None = None) -> None:
    """Pool initializer. Forked workers inherit (out, plan, tokenizer, verify) from the main process; spawned
    ones start before the main process has loaded the tokenizer and get what they need from a context file
    named in each task (see `prepare`). Nothing here can fail: an initializer that raises makes
    multiprocessing.Pool replace the process, forever (a hang)."""
    global _MESSAGES, _WORKER, _INHERITED
    _MESSAGES = messages
    _WORKER = None  # a forked worker must not inherit an earlier inline run's state
    _INHERITED = inherited


def _pool_context():
    """How the worker processes start. fork where it is safe: on Linux, from a process with one thread (read
    from /proc, so native threads count too: a tokenizer's Rayon pool, a monitor thread). No other thread can
    then hold a lock the children would inherit locked. A forked worker starts at once, with this process's
    modules already imported; a spawned one starts an interpreter and imports them again (on 2 cores the first
    unit started 0.1 s later, of a 0.35 s start). Everywhere else: spawn."""
    try:
        one_thread = len(os.listdir("/proc/self/task")) == 1
    except OSError:
        one_thread = False
    return mp.get_context("fork" if one_thread and sys.platform.startswith("linux") else "spawn")


class _WorkerSetupError(RuntimeError):
    """A pool worker could not build its tokenizer: every unit would fail the same way."""


def _worker(context_path: str | None) -> _Worker:
    """This process's _Worker, built on its first unit: from what it inherited, or from the context file
    written by `prepare`."""
    global _WORKER
    if _WORKER is None:
        try:
            if _INHERITED is not None:
                out, plan, tok, verify = _INHERITED
            else:
                with open(context_path, "rb") as f:
                    out, plan, tokenizer_spec, verify = pickle.load(f)
                tok = worker_tokenizer(tokenizer_spec, threads=False)
                if tokenizer_spec[0] == "load" and tok.info().fingerprint != plan["tokenizer"]["fingerprint"]:
                    raise PrepareError(f"tokenizer {tokenizer_spec[1]} loaded differently in a worker process")
        except Exception as e:
            raise _WorkerSetupError(f"{type(e).__name__}: {e}") from None
        _WORKER = _Worker(out, plan, tok, verify=verify, messages=_MESSAGES)
        _WORKER.send("ready", os.getpid())
    return _WORKER


def _run_unit(task: tuple):
    """(unit, context file or None inline) -> (unit id, record or None, error or None)."""
    unit, context_path = task
    try:
        return unit["id"], _worker(context_path).run(unit), None
    except _WorkerSetupError as e:
        return unit["id"], None, e
    except (BadFileError, OSError, PrepareError) as e:
        return unit["id"], None, f"{type(e).__name__}: {e}"
    except Exception as e:  # report, don't kill the pool: other units keep going and are resumable
        import traceback

        return unit["id"], None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total_units: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_units, unit="unit", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5)
        self.t0 = time.perf_counter()
        self.docs = self.tokens = self.chars = 0
        self.warnings = 0
        self.tqdm = tqdm

    def message(self, kind: str, payload) -> None:
        if kind == "progress":
            d, t, c = payload
            self.docs += d
            self.tokens += t
            self.chars += c
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False)
        elif kind == "warning":
            self.warnings += 1
            if self.warnings <= MAX_LIVE_WARNINGS:
                self.tqdm.write(f"WARNING {payload}", file=sys.stderr)
            elif self.warnings == MAX_LIVE_WARNINGS + 1:
                self.tqdm.write("WARNING further warnings are counted in the summary and listed in "
                                "bad_records.jsonl", file=sys.stderr)


def _plan_task(cfg: PrepareConfig, tok: TextTokenizer, out: str) -> tuple[dict, list]:
    """The plan (written to OUT/plan.json, or checked against the one there) and this task's units."""
    plan = make_plan(cfg, tok)
    ensure_plan(out, plan, cfg.overwrite)
    units = [u for u in plan["units"] if u["id"] % cfg.array_count == cfg.array_task]
    # what killed writers of this task's units left behind: one listing per folder for the whole task (per
    # unit, it was a listing of folders that grow with the unit count: quadratic in the corpus size)
    stale = fmt.remove_stale_tmp(out, [u["id"] for u in units])
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted earlier run", stale)
    log.info("planned %d units (%s MiB each) from %d input(s); this task runs %d of them on %d worker(s)",
             len(plan["units"]), plan["settings"]["unit_bytes"] >> 20, len(plan["sources"]), len(units), cfg.workers)
    return plan, units


def prepare(cfg: PrepareConfig) -> dict:
    """Run this task's part of the preparation; returns the manifest (single task) or a task summary."""
    problems = cfg.problems()
    if problems:
        raise PrepareError("invalid settings:\n  - " + "\n  - ".join(problems))
    t0 = time.perf_counter()
    out = os.path.abspath(cfg.output)
    records, failures = {}, {}
    if cfg.workers == 1:
        global _WORKER
        tok = load_prep_tokenizer(cfg.tokenizer, threads=True)
        plan, units = _plan_task(cfg, tok, out)
        progress = _Progress(len(units), cfg.progress)
        _WORKER = _Worker(out, plan, tok, verify=cfg.verify_existing, messages=progress.message)
        for u in units:
            uid, rec, err = _run_unit((u, None))
            (failures.__setitem__(uid, err) if err else records.__setitem__(uid, rec))
            progress.bar.update(1)
    else:
        ctx = _pool_context()  # fork only from a single-threaded process: see there
        inherited = None  # (out, plan, tokenizer, verify) for forked workers
        loaded = ctx.get_start_method() == "fork"
        if loaded:
            # Forked workers inherit the tokenizer and the plan: load them, then fork. No context file, and no
            # tokenizer rebuilt in every worker (the first unit starts ~0.1 s sooner).
            tok = load_prep_tokenizer(cfg.tokenizer, threads=False)
            plan, units = _plan_task(cfg, tok, out)
            ctx = _pool_context()  # loading must not have started a thread; if it did, spawn
            if ctx.get_start_method() == "fork":
                inherited = (out, plan, tok, cfg.verify_existing)
        # Messages (progress, warnings) are written straight to a pipe (no feeder thread in the workers), so
        # every message of a unit is there before the unit's result: once all results are in, reading what the
        # pipe holds gets them all, with no waiting.
        messages = ctx.SimpleQueue()
        context_fd = context_path = None
        if inherited is None:
            # Spawned workers: the pool starts first, its interpreters start and import while this process loads
            # the tokenizer (about 1 s, transformers' import) and plans. Their tokenizer and plan come from a
            # context file that each task names: written once, where a task carrying the serialised tokenizer
            # (0.5 MB for BERT) would send it again for every unit. It is deleted once every worker that can get
            # a unit has read it, so a run killed with SIGKILL later than that leaves nothing behind.
            context_fd, context_path = tempfile.mkstemp(prefix="prepare-worker-", suffix=".pkl")
        ready: set = set()

        def message(kind, payload) -> None:
            nonlocal context_path
            if kind != "ready":
                progress.message(kind, payload)
                return
            ready.add(payload)
            if context_path and len(ready) >= min(cfg.workers, len(units)):
                os.unlink(context_path)
                context_path = None

        def drain() -> None:
            while not messages.empty():
                message(*messages.get())

        try:
            with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(messages, inherited)) as pool:
                if not loaded:
                    tok = load_prep_tokenizer(cfg.tokenizer, threads=False)
                    plan, units = _plan_task(cfg, tok, out)
                if context_fd is not None:
                    with os.fdopen(context_fd, "wb") as f:
                        context_fd = None
                        pickle.dump((out, plan, tok.worker_spec(), cfg.verify_existing), f,
                                    protocol=pickle.HIGHEST_PROTOCOL)
                progress = _Progress(len(units), cfg.progress)
                # biggest units first: the tail of the run is then made of small units (better balance)
                order = sorted(units, key=lambda u: -u["est_bytes"])
                pending = pool.imap_unordered(_run_unit, [(u, context_path) for u in order])
                done = 0
                while done < len(units):
                    try:
                        uid, rec, err = pending.next(timeout=0.2)
                        if isinstance(err, _WorkerSetupError):  # leaving the `with` terminates the pool
                            raise PrepareError(f"a worker process could not build the tokenizer {cfg.tokenizer!r} "
                                               f"({err}); completed units are kept, re-run to resume") from None
                        (failures.__setitem__(uid, err) if err else records.__setitem__(uid, rec))
                        done += 1
                        progress.bar.update(1)
                    except mp.TimeoutError:
                        pass
                    drain()
                drain()
        finally:
            if context_fd is not None:
                os.close(context_fd)
            if context_path:
                os.unlink(context_path)
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
    fmt.atomic_write_bytes(os.path.join(out, "token_counts.npy"), buf.getvalue())

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
    fmt.atomic_write_bytes(os.path.join(out, "bad_records.jsonl"), "".join(l + "\n" for l in bad_lines).encode())

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
    fmt.atomic_write_json(os.path.join(out, "manifest.json"), manifest)
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


__all__ = ["PrepareConfig", "PrepareError", "prepare", "join", "array_task_from_env", "asdict"]
