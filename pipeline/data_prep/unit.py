"""One unit of work, in whichever process runs it: its pieces read, documents cleaned, tokenized a batch at a time,
split into train/valid by a hash of their text, and streamed into the unit's shards; the unit's record last."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import socket
import time
from collections import Counter

import numpy as np

from pipeline import shards as fmt
from pipeline.fileio import atomic_write
from pipeline.tokenization import Encoder

from .cleaning import CleanConfig, clean, decode
from .readers import BadFileError, PieceStats, describe_location, iter_piece
from .sources import Source
from .tokenizer import flat_ids

MAX_BAD_RECORDS_PER_UNIT = 100
BATCH_DOCS, BATCH_CHARS = 1024, 1 << 20  # a batch goes to the tokenizer once it has this many documents or chars


class UnitWorker:
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
                rec = UnitRun(self, unit, paths, skipped).run()
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


class UnitRun:
    """One attempt at a unit: reads its pieces, cleans the documents, tokenizes them a batch at a time and
    streams them into the shard writers; `run()` returns the unit's record."""

    def __init__(self, worker: UnitWorker, unit: dict, paths: dict, skipped: dict):
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
