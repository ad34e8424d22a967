"""The stall watchdog: a rank with no progress for train.stall_timeout_s names itself, its host, its last step and
the silent peers, and the job ends in bounded time. First the watchdog alone (real thread, real heartbeat files,
the exit replaced by a recorder), then a real 2-rank job with one rank stopped by SIGSTOP."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from pipeline.training.watchdog import EXIT_STALLED, StallWatchdog, heartbeat_dir, poll_interval
from tests.training.conftest import metrics
from tests.training.faulty_runs import kill_job, start_pretrain, wait_for


class _Exit:
    def __init__(self):
        self.codes = []

    def __call__(self, code):
        self.codes.append(code)


def test_fires_after_the_timeout_with_rank_host_and_last_step(tmp_path, capfd):
    exit_ = _Exit()
    wd = StallWatchdog(0.4, rank=3, run_dir=str(tmp_path), exit=exit_).start(step=7)
    try:
        for step in range(8, 12):  # progress: no alarm
            time.sleep(0.15)
            wd.beat(step)
        assert exit_.codes == []
        wait_for(lambda: exit_.codes, 5, "the watchdog to fire")
    finally:
        wd.stop()
    assert exit_.codes == [EXIT_STALLED]
    err = capfd.readouterr().err
    assert f"stall: rank 3 on {socket.gethostname()} (pid {os.getpid()}) made no progress" in err
    assert "after step 11 (train.stall_timeout_s=0.4)" in err
    stacks = tmp_path / "heartbeats" / "rank00003.stacks.txt"
    assert f"stacks in {stacks}" in err and "test_fires_after_the_timeout" in stacks.read_text()


def test_names_the_peer_whose_heartbeat_went_silent(tmp_path, capfd):
    hb = tmp_path / "heartbeats"
    hb.mkdir()
    (hb / "rank00001.json").write_text(json.dumps({"rank": 1, "host": "node7", "pid": 4242, "step": 41,
                                                   "time": time.time() - 60}))
    (hb / "rank00002.json").write_text(json.dumps({"rank": 2, "host": "node8", "pid": 99, "step": 42,
                                                   "time": time.time() + 600}))  # fresh: not named
    exit_ = _Exit()
    wd = StallWatchdog(0.3, rank=0, run_dir=str(tmp_path), exit=exit_).start(step=42)
    wait_for(lambda: exit_.codes, 5, "the watchdog to fire")
    wd.stop()
    err = capfd.readouterr().err
    assert "rank 1 on node7 (pid 4242) silent for 60 s (its last heartbeat: step 41): stopped, hung or dead" in err
    assert "node8" not in err
    own = json.loads((hb / "rank00000.json").read_text())
    assert own["rank"] == 0 and own["step"] == 42 and own["pid"] == os.getpid()


def test_stop_ends_the_thread_without_firing(tmp_path):
    exit_ = _Exit()
    wd = StallWatchdog(0.2, rank=0, run_dir=None, exit=exit_).start()
    wd.stop()
    time.sleep(0.4)
    assert exit_.codes == [] and not wd._thread.is_alive()
    assert poll_interval(300) == 5.0 and poll_interval(2) == 0.5


@pytest.mark.integration
def test_sigstop_one_of_two_ranks_ends_the_job_in_bounded_time(tmp_path, tiny_teacher, sample_data):
    """Bound: the timeout, one poll interval to notice, then the `deepspeed` launcher's grace before it SIGKILLs
    the stopped rank (30 s: a stopped process never acts on SIGTERM), plus slack for a loaded machine."""
    from pipeline.training.faults import rank_processes

    timeout_s = 10
    bound = timeout_s + poll_interval(timeout_s) + 30 + 20
    run = tmp_path / "run"
    job = start_pretrain(run, tiny_teacher, sample_data, "train.max_steps=2000", "checkpoint.every_steps=0",
                         "eval.n_samples=0", f"train.stall_timeout_s={timeout_s}")
    stopped = None
    try:
        wait_for(lambda: os.path.exists(run / "metrics.jsonl") and len(metrics(run)) >= 3, 240, "step 3", job)
        stopped = rank_processes(job.pid)[1]
        t0 = time.time()
        stopped.send_signal(signal.SIGSTOP)
        rc = job.wait(timeout=bound + 60)
        elapsed = time.time() - t0
    finally:
        if stopped is not None:
            try:
                stopped.send_signal(signal.SIGKILL)
            except Exception:
                pass
        kill_job(job)
    log = open(str(run) + ".log").read()
    assert rc != 0, log[-3000:]
    assert elapsed < bound, f"{elapsed:.0f} s from SIGSTOP to the end of the job (bound {bound:.0f} s)"
    lines = [line for line in log.splitlines() if "stall: rank 0 on" in line]
    assert len(lines) == 1, log[-3000:]
    assert "made no progress for" in lines[0] and f"(train.stall_timeout_s={timeout_s})" in lines[0]
    assert f"rank 1 on {socket.gethostname()} (pid {stopped.pid}) silent for" in lines[0]
    assert os.path.exists(os.path.join(heartbeat_dir(str(run)), "rank00000.stacks.txt"))
