"""The rank-0 log: one copy of each line from rank 0, lines marked all_ranks from every rank; a rank that dies in
native code names itself in faulthandler's dump."""
from __future__ import annotations

import logging
import subprocess
import sys

from pipeline.logs import call_as_rank, setup_logging
from tests.training.conftest import ROOT


def test_only_rank_zero_logs_unless_a_line_is_for_all_ranks(capsys):
    log = logging.getLogger("pipeline.training.somewhere")
    try:
        setup_logging("pretrain", rank=1)
        log.info("step 1")
        log.warning("stale lock on this node", extra={"all_ranks": True})
        setup_logging("pretrain", rank=0)  # replaces the handler: one line per record, not two
        log.info("step 2")
    finally:
        for name in ("pipeline", "__main__"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    assert capsys.readouterr().out.splitlines() == ["[pretrain] stale lock on this node", "[pretrain] step 2"]


def test_a_native_crash_names_the_rank():
    assert call_as_rank(3, lambda a, b: a + b, 1, 2) == 3
    code = ("import ctypes; from pipeline.logs import call_as_rank, enable_crash_traces; enable_crash_traces(); "
            "call_as_rank(5, ctypes.string_at, 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert proc.returncode != 0
    assert "Segmentation fault" in proc.stderr and " in rank_5" in proc.stderr, proc.stderr
