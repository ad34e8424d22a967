"""The CPU start-up guards: a stale torch-extensions build lock is found (it would make every rank wait forever)."""
from __future__ import annotations

import os
import time

import pytest

from pipeline.training.distributed import stale_build_lock


@pytest.mark.parametrize("layout", ["TORCH_EXTENSIONS_DIR", "default root"])
def test_a_stale_build_lock_is_found_and_a_fresh_one_is_not(tmp_path, monkeypatch, layout):
    # torch builds in TORCH_EXTENSIONS_DIR/<op> when that is set, else in <default root>/py311_cpu/<op>
    if layout == "TORCH_EXTENSIONS_DIR":
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
        lock = tmp_path / "deepspeed_shm_comm" / "lock"
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path))
        lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    assert stale_build_lock() is None
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert stale_build_lock() is None  # a build may be running now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert stale_build_lock() == str(lock)
    assert stale_build_lock(op="another_op") is None
