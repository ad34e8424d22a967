"""The one atomic-write helper (pipeline/fileio.py) and the shard writer built on it (pipeline/shards.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.fileio import TMP_MARK, atomic_write, file_digest
from pipeline.shards import ShardWriter


def test_atomic_write_replaces_whole_files_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "sub" / "f.json"
    with atomic_write(str(path), "w") as f:
        f.write("first\n")
    assert path.read_text() == "first\n"
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as f:
            f.write("half of the second")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "first\n"  # the old file, whole
    assert os.listdir(path.parent) == ["f.json"]  # no temporary left behind
    with atomic_write(str(path)) as f:
        f.write(b"second")
    assert path.read_bytes() == b"second"


def test_atomic_write_exclusive_creates_once(tmp_path):
    path = tmp_path / "plan.json"
    with atomic_write(str(path), "w", exclusive=True) as f:
        f.write("one")
    with pytest.raises(FileExistsError):
        with atomic_write(str(path), "w", exclusive=True) as f:
            f.write("two")
    assert path.read_text() == "one" and os.listdir(tmp_path) == ["plan.json"]


def test_shard_writer_commit_records_sizes_and_checksums_and_abort_leaves_nothing(tmp_path):
    w = ShardWriter(str(tmp_path), "train/000001.bin", "train/000001.idx", np.uint16)
    w.add(np.array([5, 6, 7, 8], np.uint16), np.array([3, 1]))
    rec = w.commit()
    assert (rec["docs"], rec["tokens"]) == (2, 4)
    for kind in ("bin", "idx"):
        p = tmp_path / rec[kind]
        assert p.stat().st_size == rec[f"{kind}_bytes"] and file_digest(str(p))["sha256"] == rec[f"{kind}_sha256"]
    assert np.fromfile(tmp_path / rec["idx"], "<i8").tolist() == [0, 3, 4]
    w = ShardWriter(str(tmp_path), "valid/000001.bin", "valid/000001.idx", np.uint16)
    w.add(np.array([1], np.uint16), np.array([1]))
    w.abort()
    assert not (tmp_path / "valid").exists() or os.listdir(tmp_path / "valid") == []
    assert not any(TMP_MARK in name for _, _, names in os.walk(tmp_path) for name in names)
