"""The CPU start-up guards: a stale torch-extensions build lock is found (it would make every rank wait forever)."""
from __future__ import annotations

import os
import time

from pipeline.training.distributed import stale_build_lock


def test_a_stale_build_lock_is_found_and_a_fresh_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert stale_build_lock() is None
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert stale_build_lock() is None  # a build may be running now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert stale_build_lock() == str(lock)
    assert stale_build_lock(op="another_op") is None
