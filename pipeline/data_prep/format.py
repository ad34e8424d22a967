"""The prepared-dataset format on disk (docs/data_format.md describes it for users).

    OUT/plan.json                 inputs, settings, tokenizer identity and the work units (written first)
    OUT/train/000042.bin          token ids of unit 42's training documents, back to back (uint16/uint32 LE)
    OUT/train/000042.idx          int64 LE document offsets into .bin: n_docs + 1 values, starting at 0
    OUT/valid/000042.{bin,idx}    the same for the validation documents
    OUT/counts/000042.npy         int64 token counts per vocabulary id, training documents of unit 42
    OUT/units/000042.json         unit 42's record: files, sizes, sha256, counts, stats (written last)
    OUT/token_counts.npy          summed counts (written by join)
    OUT/bad_records.jsonl         skipped records with file and line (written by join)
    OUT/manifest.json             the dataset: written last and atomically by join

A unit is complete when its record exists and its files match the record's sizes and checksums. Every
file is written under a temporary name, fsynced, and renamed: a killed job leaves temporary files (removed
on the next run) and never a file under its final name with partial content.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype("<i8")
SPLITS = ("train", "valid")
TMP_MARK = ".tmp-"


def unit_name(unit_id: int) -> str:
    return f"{unit_id:06d}"


def unit_paths(unit_id: int) -> dict:
    """Paths of a unit's files, relative to the dataset folder."""
    n = unit_name(unit_id)
    paths = {"record": f"units/{n}.json", "counts": f"counts/{n}.npy"}
    for s in SPLITS:
        paths[f"{s}_bin"] = f"{s}/{n}.bin"
        paths[f"{s}_idx"] = f"{s}/{n}.idx"
    return paths


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + TMP_MARK)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(d)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class _HashingFile:
    """A file written under a temporary name with a running sha256; `commit()` fsyncs and renames."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.tmp = f"{path}{TMP_MARK}{os.getpid()}"
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.nbytes = 0

    def write(self, b) -> None:
        self.f.write(b)
        self.h.update(b)
        self.nbytes += len(b) if isinstance(b, (bytes, bytearray)) else memoryview(b).nbytes

    def commit(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.nbytes, "sha256": self.h.hexdigest()}

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class ShardWriter:
    """Streams one split of one unit: token ids to .bin, document offsets to .idx."""

    def __init__(self, root: str, bin_rel: str, idx_rel: str, dtype: np.dtype):
        self.bin_rel, self.idx_rel = bin_rel, idx_rel
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.bin = _HashingFile(os.path.join(root, bin_rel))
        self.idx = _HashingFile(os.path.join(root, idx_rel))
        self.idx.write(np.zeros(1, INDEX_DTYPE).tobytes())
        self.n_docs = 0
        self.n_tokens = 0

    def add(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `flat_ids` all their ids back to back, `lengths` the id count of each."""
        if not len(lengths):
            return
        self.bin.write(np.ascontiguousarray(flat_ids, dtype=self.dtype).tobytes())
        offsets = np.cumsum(lengths, dtype=INDEX_DTYPE) + self.n_tokens
        self.idx.write(offsets.astype(INDEX_DTYPE, copy=False).tobytes())
        self.n_docs += len(lengths)
        self.n_tokens += int(offsets[-1] - self.n_tokens)

    def commit(self) -> dict:
        b = self.bin.commit()
        i = self.idx.commit()
        return {"bin": self.bin_rel, "idx": self.idx_rel, "docs": self.n_docs, "tokens": self.n_tokens,
                "bin_bytes": b["bytes"], "bin_sha256": b["sha256"],
                "idx_bytes": i["bytes"], "idx_sha256": i["sha256"]}

    def abort(self) -> None:
        self.bin.abort()
        self.idx.abort()


def check_files(root: str, record: dict, full: bool) -> list[str]:
    """Problems with a unit's files against its record: missing, wrong size, or (full) wrong sha256."""
    problems = []
    files = []
    for s in SPLITS:
        sp = record["splits"][s]
        files += [(sp["bin"], sp["bin_bytes"], sp["bin_sha256"]), (sp["idx"], sp["idx_bytes"], sp["idx_sha256"])]
    files.append((record["counts"]["file"], record["counts"]["bytes"], record["counts"]["sha256"]))
    for rel, size, digest in files:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            problems.append(f"{rel}: missing")
            continue
        actual = os.path.getsize(path)
        if actual != size:
            problems.append(f"{rel}: {actual} bytes, expected {size} (truncated or overwritten)")
        elif full and sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 mismatch (corrupted)")
    return problems


def remove_stale_tmp(root: str, unit_ids) -> int:
    """Delete the temporary files that killed writers of these units left behind; returns how many. Reads
    each of the dataset's unit folders once, whatever the number of units."""
    names = {unit_name(u) for u in unit_ids}
    removed = 0
    for sub in sorted({os.path.dirname(rel) for rel in unit_paths(0).values()}):
        d = os.path.join(root, sub)
        try:
            entries = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in entries:
            if TMP_MARK in name and name.split(".", 1)[0] in names:
                try:
                    os.unlink(os.path.join(d, name))
                    removed += 1
                except OSError:
                    pass
    return removed
