"""Preemption and a dead rank, for real: 2 CPU ranks under the `deepspeed` launcher.

- SIGUSR1 to ONE rank mid-run: all ranks agree at the next step boundary, checkpoint together, rank 0 requeues the
  (stub) SLURM job, every rank exits 0; the resumed run ends with exactly the parameters of an uninterrupted run.
- SIGKILL of one rank: the job exits non-zero within a bound (no hang until the collective timeout); a restart
  resumes from the last complete checkpoint and ends with exactly the uninterrupted run's parameters.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from pipeline.training.faults import rank_processes
from tests.training.conftest import FAST, ROOT, free_port, metrics, pretrain

pytestmark = pytest.mark.integration
COMMON = ["train.max_steps=16", "student.dropout=0.1", "eval.n_samples=0", "checkpoint.export_hf=false"]


def _params(run_dir, step):
    from pipeline.training.checkpoint import fp32_state_dict
    return fp32_state_dict(os.path.join(run_dir, "checkpoints", f"step{step:08d}"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_teacher, sample_data):
    run = tmp_path_factory.mktemp("faults") / "whole"
    pretrain(run, tiny_teacher, sample_data, *COMMON, "checkpoint.every_steps=0")
    return _params(run, 16)


def _start(run_dir, teacher, data, extra_env=None, *overrides):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **(extra_env or {})}
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), str(ROOT / "launch" / "pretrain.py"), "--config", "tiny_cpu", "--deepspeed_config",
           str(ROOT / "ds_configs" / "zero2_fp32.json"), f"teacher.name_or_path={teacher}", f"data.path={data}",
           f"run_dir={run_dir}", *FAST, *COMMON, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _ranks(proc) -> dict[int, psutil.Process]:
    return rank_processes(proc.pid)


def _wait_for_step(run_dir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        try:
            if max(metrics(run_dir), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigusr1_to_one_rank_checkpoints_requeues_and_resumes_exactly(tmp_path, tiny_teacher, sample_data,
                                                                        uninterrupted):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = _start(run, tiny_teacher, sample_data, env, "checkpoint.every_steps=0")
    _wait_for_step(run, 2, proc)
    ranks = _ranks(proc)
    assert sorted(ranks) == [0, 1]
    ranks[1].send_signal(signal.SIGUSR1)  # only rank 1: rank 0 must learn of it through the agreement
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert "stop requested" in out and "SLURM job 4242 requeued" in out, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    done = sorted(d for d in os.listdir(run / "checkpoints") if os.path.exists(run / "checkpoints" / d / "complete.json"))
    assert len(done) == 1 and 2 <= int(done[0][4:]) < 16, done
    assert not (run / "student").exists()  # not finished: no final export
    # the requeued job: same command, resumes from the checkpoint, ends exactly where the uninterrupted run did
    res = pretrain(run, tiny_teacher, sample_data, *COMMON, "checkpoint.every_steps=0")
    assert f"resumed from {run / 'checkpoints' / done[0]}" in res.stdout
    _assert_same(_params(run, 16), uninterrupted)


def test_killed_rank_stops_the_job_quickly_and_restart_resumes(tmp_path, tiny_teacher, sample_data, uninterrupted):
    run = tmp_path / "run"
    proc = _start(run, tiny_teacher, sample_data, None, "checkpoint.every_steps=1")
    _wait_for_step(run, 3, proc)
    victim = _ranks(proc)[1]
    t_kill = time.time()
    victim.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    elapsed = time.time() - t_kill
    assert proc.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop after a rank died"
    # the launcher names the dead rank and the cause (killed by signal 9)
    assert "--local_rank=1" in out and "exits with return code = -9" in out, out[-3000:]
    for p in psutil.process_iter(["cmdline"]):  # no orphaned rank left behind
        cmd = p.info["cmdline"] or []
        assert not (any(str(run) in c for c in cmd) and any(c.endswith("pretrain.py") for c in cmd)), cmd
    res = pretrain(run, tiny_teacher, sample_data, *COMMON, "checkpoint.every_steps=1")
    assert "resumed from" in res.stdout
    _assert_same(_params(run, 16), uninterrupted)


def test_checkpoint_failing_halfway_leaves_resume_on_the_previous_one(tmp_path, tiny_teacher, sample_data):
    run = tmp_path / "run"
    args = ["train.max_steps=6", "eval.n_samples=0", "checkpoint.every_steps=2", "checkpoint.export_hf=false"]
    env = {**os.environ, "DISTIL_INJECT_SAVE_FAILURE": "4:1"}  # rank 1 fails after DeepSpeed wrote its files
    proc = pretrain(run, tiny_teacher, sample_data, *args, check=False, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "checkpoint of step 4 not written (rank 1: " in out and "no space left on device" in out
    assert "step00000002 is untouched" in out
    assert not os.path.exists(run / "checkpoints" / "step00000004")  # the half-written folder is removed
    res = pretrain(run, tiny_teacher, sample_data, *args)
    assert f"resumed from {run / 'checkpoints' / 'step00000002'}: step 2" in res.stdout
    assert os.path.exists(run / "checkpoints" / "step00000006" / "complete.json")


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss_on_one_rank_is_handled_together(tmp_path, tiny_teacher, sample_data, policy):
    run = tmp_path / policy
    args = ["train.max_steps=5", "eval.n_samples=0", "checkpoint.every_steps=0", "checkpoint.export_hf=false",
            f"train.nonfinite={policy}"]
    env = {**os.environ, "DISTIL_INJECT_NAN": "3:1"}  # rank 1's loss is NaN in step 3
    proc = pretrain(run, tiny_teacher, sample_data, *args, check=False, env=env)
    out = proc.stdout + proc.stderr
    if policy == "skip":
        assert proc.returncode == 0, out[-3000:]
        assert "non-finite loss at step 3: DeepSpeed skipped the update (1 skipped so far)" in out
        rows = metrics(run)
        assert rows[2]["train/skipped_steps"] == 0 and rows[5]["train/skipped_steps"] == 1
        assert rows[2]["train/lr"] == rows[3]["train/lr"]  # the schedule did not advance on the skipped step
        final = _params(run, 5)
    else:
        assert proc.returncode == 1, out[-3000:]
        assert "non-finite loss at step 3: stopped (train.nonfinite=stop)" in out
        assert "rank 0 failed" in out and "rank 1 failed" in out  # every rank stops, together
        final = _params(run, 3)
        assert not os.path.exists(run / "checkpoints" / "step00000004")
    assert all(torch.isfinite(v).all() for v in final.values())
