"""slurm/pretrain.sbatch submitted with the real `sbatch` to the local cluster (tests/slurm/conftest.py): 2 CPU ranks
through srun and DeepSpeed's launcher to a checkpoint and an exported student; a CPU partition; preemption by USR1
(`scancel --signal=USR1 --batch`, and the `--time` + `--signal=B:USR1@lead` timer) that checkpoints, requeues and
resumes under the same job id to the same final parameters as an uninterrupted job; `scancel` (TERM): a
checkpoint, then exit."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import complete_checkpoints, fp32_state_dict
from tests.training.conftest import FAST

pytestmark = pytest.mark.integration

# The cluster declares 16 CPUs and 8 count-only GPUs; DS_ACCELERATOR=cpu (job_env) makes every "GPU" a CPU rank.
SBATCH = ["--nodes=1", "--cpus-per-task=2", "--gpus-per-node=2", "--time=10:00"]


def overrides(teacher, data, *extra) -> list[str]:
    return [f"teacher.name_or_path={teacher}", f"data.path={data}", *FAST, "eval.n_samples=0",
            "checkpoint.every_steps=0", *extra]


def submit(cluster, tmp_path, name, args, *sbatch, env=None) -> tuple[str, Path, Path]:
    """sbatch slurm/pretrain.sbatch; returns (job id, the job's .out file, the run folder)."""
    run_dir = tmp_path / "runs" / name
    (tmp_path / "logs").mkdir(exist_ok=True)  # sbatch opens --output in a folder that must exist
    env = {"RECIPE": "tiny_cpu", "DS_CONFIG": "ds_configs/zero2_fp32.json", "LOG_DIR": str(tmp_path / "logs"),
           "RUN_DIR": str(run_dir), **(env or {})}
    job = cluster.sbatch(f"--job-name={name}", f"--output={tmp_path}/logs/%x-%j.out", *SBATCH, *sbatch,
                         "slurm/pretrain.sbatch", *args, env=env)
    return job, tmp_path / "logs" / f"{name}-{job}.out", run_dir


def steps(run_dir: Path) -> list[int]:
    return [int(Path(p).name.removeprefix("step")) for p in complete_checkpoints(str(run_dir / "checkpoints"))]


def show(out: Path, cluster=None) -> str:
    text = out.read_text(errors="replace")[-8000:] if out.exists() else f"(no {out})"
    return text + ("\n" + cluster.log_tail() if cluster else "")


def assert_same_parameters(a: str, b: str) -> None:
    pa, pb = fp32_state_dict(a), fp32_state_dict(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} differs"


def test_two_cpu_ranks_to_a_checkpoint_and_exported_student(cluster, tmp_path, tiny_teacher, sample_data):
    job, out, run_dir = submit(cluster, tmp_path, "d2", overrides(tiny_teacher, sample_data, "train.max_steps=2"),
                               "--gpus-per-node=2")
    (record,) = cluster.wait(job, timeout=300)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", show(out, cluster)
    text = out.read_text()
    assert "1 node(s) x 2 ranks" in text and "training step exited with status 0" in text, text
    assert steps(run_dir) == [2]
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    assert (tmp_path / "logs" / f"d2-{job}" / "hostfile").read_text() == "localhost slots=2\n"
    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 2


def test_cpu_partition_runs_cpu_ranks(cluster, tmp_path, tiny_teacher, sample_data):
    """No GPU in the allocation (--gpus-per-node=0): one CPU rank per node, not zero ranks and exit 0."""
    job, out, run_dir = submit(cluster, tmp_path, "cpu", overrides(tiny_teacher, sample_data, "train.max_steps=1",
                                                                   "checkpoint.export_hf=false"),
                               "--gpus-per-node=0", env={"DS_ACCELERATOR": ""})
    (record,) = cluster.wait(job, timeout=300)
    assert record["JobState"] == "COMPLETED", show(out, cluster)
    text = out.read_text()
    assert "no GPU allocated: 1 CPU rank(s) per node (DS_ACCELERATOR=cpu" in text, text
    assert steps(run_dir) == [1]
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 1


def restarts(cluster, job) -> int:
    return int(cluster.job(job).get("Restarts", 0))


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_parameters(cluster, tmp_path, tiny_teacher, sample_data):
    """`scancel --signal=USR1 --batch`: once while the ranks are still starting (the signal must not be lost), once
    mid-run. Each time: a checkpoint, `scontrol requeue`, the same job id starts again (SLURM_RESTART_COUNT 1, 2) and
    resumes; the final parameters equal those of an uninterrupted job."""
    total = 40
    args = overrides(tiny_teacher, sample_data, f"train.max_steps={total}", "checkpoint.export_hf=false",
                     "student.dropout=0.1")
    ref, ref_out, ref_dir = submit(cluster, tmp_path, "ref", args)
    job, out, run_dir = submit(cluster, tmp_path, "pre", args)

    # 1. while starting: as soon as the batch script has begun
    cluster.wait_for_text(out, r"restart 0: 1 node", job)
    t0 = time.time()
    cluster.cmd("scancel", "--signal=USR1", "--batch", job)
    cluster.wait_for_text(out, r"SLURM job \d+ requeued", job)
    stopped = re.search(r"stop requested \(SIGUSR1\) at step (\d+)", out.read_text())
    assert stopped, show(out, cluster)
    cluster.record_timing("usr1_at_start_to_requeue_s", time.time() - t0)
    first = int(stopped.group(1))
    assert steps(run_dir) == [first] and first < total

    # 2. mid-run, in the requeued job (same id, restart 1), after it resumed and trained a few steps
    cluster.wait_for_text(out, r"restart 1: 1 node", job, timeout=120)
    cluster.wait_for_text(out, rf"resumed from .*step{first:08d}: step {first},", job)
    cluster.wait_for_text(out, rf"step {first + 3}/{total}", job)
    t0 = time.time()
    cluster.cmd("scancel", "--signal=USR1", "--batch", job)
    cluster.wait_for_text(out, r"(?s)restart 1:.*SLURM job \d+ requeued", job)
    cluster.record_timing("usr1_mid_run_to_requeue_s", time.time() - t0)
    second = int(re.findall(r"stop requested \(SIGUSR1\) at step (\d+)", out.read_text())[-1])
    assert first + 3 <= second < total, show(out)
    cluster.wait_for_text(out, r"(?s)restart 1:.*training step exited with status", job)
    cluster.record_timing("usr1_mid_run_to_step_end_s", time.time() - t0)

    (record,) = cluster.wait(job, timeout=300)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "2", show(out, cluster)
    assert steps(run_dir)[-1] == total
    text = out.read_text()
    assert "restart 2: 1 node" in text and f"resumed from {run_dir}/checkpoints/step{second:08d}" in text, text
    (ref_record,) = cluster.wait(ref, timeout=300)
    assert ref_record["JobState"] == "COMPLETED", show(ref_out, cluster)
    assert_same_parameters(f"{run_dir}/checkpoints/step{total:08d}", f"{ref_dir}/checkpoints/step{total:08d}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = sorted(r["throughput/step_time_s"] for r in rows if "throughput/step_time_s" in r)
    cluster.record_timing("step_time_median_s", step_times[len(step_times) // 2])
    cluster.record_timing("checkpoint_s", max(float(x) for x in re.findall(r"checkpoint \S+ \(([\d.]+) s\)", text)))
    # jobcomp/filetxt has one record per end of the job: two requeues, then the completion
    ends = [r["JobState"] for r in cluster.jobcomp() if r.get("JobId") == job]
    assert ends[-1] == "COMPLETED" and len(ends) == 3, ends


def test_scancel_term_checkpoints_then_exits(cluster, tmp_path, tiny_teacher, sample_data):
    """`scancel <job>`: SIGTERM to every process of the job, DataLoader workers included. The ranks checkpoint at
    the next step boundary and exit; the job stays cancelled (no requeue)."""
    job, out, run_dir = submit(cluster, tmp_path, "term", overrides(
        tiny_teacher, sample_data, "train.max_steps=400", "checkpoint.export_hf=false", "data.num_workers=2"))
    cluster.wait_for_text(out, r"step 3/400", job)
    t0 = time.time()
    cluster.cmd("scancel", job)
    (record,) = cluster.wait(job, timeout=120)
    cluster.record_timing("term_to_job_end_s", time.time() - t0)
    text = out.read_text()
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", show(out, cluster)
    stopped = re.search(r"stop requested \(SIGTERM\) at step (\d+)", text)
    assert stopped, show(out, cluster)
    assert steps(run_dir) == [int(stopped.group(1))], show(out)
    assert "requeued" not in text and "DataLoader worker" not in text, text


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, tiny_teacher, sample_data):
    """The real timer: `--time=2 --signal=B:USR1@60` makes SLURM send USR1 to the batch shell about a minute before
    the limit (slurmctld checks time limits periodically, so it may come somewhat earlier or later). The job
    checkpoints and requeues itself before the limit (never TIMEOUT), and the same job id resumes from that
    checkpoint. (That a resumed run ends with the same parameters as an uninterrupted one is the USR1 test's.)"""
    job, out, run_dir = submit(cluster, tmp_path, "timer", overrides(
        tiny_teacher, sample_data, "train.max_steps=100000", "checkpoint.export_hf=false"),
        "--time=2", "--signal=B:USR1@60")
    cluster.wait_for_text(out, r"SLURM job \d+ requeued", job, timeout=300)
    signalled = re.search(r"\[pretrain.sbatch (\S+ \S+) \S+\] SIGUSR1 received", out.read_text())
    assert signalled, show(out, cluster)
    cluster.wait_for_text(out, r"restart 1: 1 node", job, timeout=120)
    ckpt = steps(run_dir)
    assert len(ckpt) == 1 and ckpt[0] >= 1, ckpt
    cluster.wait_for_text(out, rf"resumed from .*step{ckpt[0]:08d}: step {ckpt[0]},", job, timeout=240)
    record = cluster.job(job)
    assert record["Restarts"] == "1" and record["JobState"] == "RUNNING", record
    assert "TIMEOUT" not in [r.get("JobState") for r in cluster.jobcomp() if r.get("JobId") == job]
    # how long before the limit the signal came: the first run's start (the batch script's first line, within a
    # second of SLURM's StartTime) + 120 s - the time the batch shell logged the signal
    import datetime
    first = re.search(r"\[pretrain.sbatch (\S+ \S+) \S+\] job \d+ \(timer\) restart 0", out.read_text())
    start, at = (datetime.datetime.fromisoformat(m.group(1)) for m in (first, signalled))
    lead = (start + datetime.timedelta(seconds=120) - at).total_seconds()
    cluster.record_timing("timer_signal_before_limit_s", lead)
    assert lead >= 55, f"USR1@60 came only {lead} s before the limit"
    cluster.cmd("scancel", job)
