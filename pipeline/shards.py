"""The prepared-dataset format on disk: the contract between its writer (pipeline/data_prep/) and its reader
(pipeline/data/prepared.py). docs/data_format.md describes it for users.

    OUT/plan.json                 inputs, settings, tokenizer identity and the work units (written first)
    OUT/train/000042.bin          token ids of unit 42's training documents, back to back (uint16/uint32 LE)
    OUT/train/000042.idx          int64 LE document offsets into .bin: n_docs + 1 values, starting at 0
    OUT/valid/000042.{bin,idx}    the same for the validation documents
    OUT/counts/000042.npy         int64 token counts per vocabulary id, training documents of unit 42
    OUT/units/000042.json         unit 42's record: files, sizes, sha256, counts, stats (written last)
    OUT/token_counts.npy          summed counts (written by join)
    OUT/bad_records.jsonl         skipped records with file and line (written by join)
    OUT/manifest.json             the dataset: written last and atomically by join

A unit is complete when its record exists and its files match the record's sizes and checksums. Every file is
written with `atomic_write`: a killed job leaves temporary files (removed on the next run), never a file under
its final name with partial content.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from pipeline.fileio import TMP_MARK, HashingWriter, atomic_write, file_digest

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype("<i8")
SPLITS = ("train", "valid")

__all__ = ["FORMAT_VERSION", "INDEX_DTYPE", "SPLITS", "TMP_MARK", "ShardWriter", "check_file", "check_files",
           "remove_stale_tmp", "unit_name", "unit_paths"]


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


class ShardWriter:
    """Streams one split of one unit: token ids to .bin, document offsets to .idx, each with a running sha256.
    `commit()` puts both files in place and returns their record; `abort()` leaves nothing behind."""

    def __init__(self, root: str, bin_rel: str, idx_rel: str, dtype: np.dtype):
        self.bin_rel, self.idx_rel = bin_rel, idx_rel
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._files = contextlib.ExitStack()
        self.bin = HashingWriter(self._files.enter_context(atomic_write(os.path.join(root, bin_rel))))
        self.idx = HashingWriter(self._files.enter_context(atomic_write(os.path.join(root, idx_rel))))
        self.idx.write(np.zeros(1, INDEX_DTYPE).tobytes())
        self.n_docs = 0
        self.n_tokens = 0

    def add(self, flat_ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `flat_ids` all their ids back to back, `lengths` the id count of each."""
        if not len(lengths):
            return
        self.bin.write(np.ascontiguousarray(flat_ids, dtype=self.dtype))
        offsets = np.cumsum(lengths, dtype=INDEX_DTYPE) + self.n_tokens
        self.idx.write(offsets)
        self.n_docs += len(lengths)
        self.n_tokens = int(offsets[-1])

    def commit(self) -> dict:
        self._files.close()
        return {"bin": self.bin_rel, "idx": self.idx_rel, "docs": self.n_docs, "tokens": self.n_tokens,
                "bin_bytes": self.bin.nbytes, "bin_sha256": self.bin.digest()["sha256"],
                "idx_bytes": self.idx.nbytes, "idx_sha256": self.idx.digest()["sha256"]}

    def abort(self) -> None:
        error = RuntimeError("shard writer aborted")
        self._files.__exit__(type(error), error, None)  # atomic_write removes its temporary file on an error


def check_file(root: str, rel: str, size: int, sha256: str, full: bool) -> str | None:
    """What is wrong with one recorded file (missing, wrong size, or (full) wrong sha256), or None."""
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        return f"{rel}: missing"
    if os.path.getsize(path) != size:
        return f"{rel}: {os.path.getsize(path)} bytes, expected {size} (truncated or replaced)"
    if full and file_digest(path)["sha256"] != sha256:
        return f"{rel}: checksum mismatch (corrupted)"
    return None


def check_files(root: str, record: dict, full: bool) -> list[str]:
    """Problems with a unit's files against its record (`check_file` of each)."""
    files = [(split[kind], split[f"{kind}_bytes"], split[f"{kind}_sha256"])
             for split in (record["splits"][s] for s in SPLITS) for kind in ("bin", "idx")]
    files.append((record["counts"]["file"], record["counts"]["bytes"], record["counts"]["sha256"]))
    return [p for rel, size, digest in files if (p := check_file(root, rel, size, digest, full))]


def remove_stale_tmp(root: str, unit_ids) -> int:
    """Delete the temporary files that killed writers of these units left behind; returns how many. Reads each
    of the dataset's unit folders once, whatever the number of units."""
    names = {unit_name(u) for u in unit_ids}
    removed = 0
    for sub in sorted({os.path.dirname(rel) for rel in unit_paths(0).values()}):
        try:
            entries = os.listdir(os.path.join(root, sub))
        except FileNotFoundError:
            continue
        for name in entries:
            if TMP_MARK in name and name.split(".", 1)[0] in names:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, sub, name))
                    removed += 1
    return removed
