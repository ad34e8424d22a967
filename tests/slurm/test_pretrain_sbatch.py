"""slurm/pretrain.sbatch and slurm/submit_all.sh: syntax, lint, a real 2-rank CPU run of the batch script through
stub `srun`/`scontrol` (the real `deepspeed` launcher, --hostfile/--no_ssh/--node_rank as on a cluster), SIGUSR1 sent
to the batch shell reaching the trainer (checkpoint, requeue, exit 0), and the dependency chain of submit_all.sh."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.training.checkpoint import complete_checkpoints
from tests.conftest import ROOT
from tests.training import conftest as training_fixtures
from tests.training.conftest import FAST

# The trainer tests' session fixtures (tests/training/conftest.py is not a parent of this folder).
tiny_teacher = training_fixtures.tiny_teacher
sample_data = training_fixtures.sample_data


# srun on one node: drop the options and exec the command with what srun sets for task 0 (exec keeps the pid,
# so a signal to "srun" reaches the task, as srun's forwarding does).
STUB_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_ID=0
exec "$@"
"""
STUB_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) echo "requeue $2" >> "$STUB_LOG.requeue" ;;
  *) echo "stub scontrol: unsupported $*" >&2; exit 1 ;;
esac
"""
# sbatch --parsable: print an incrementing job id, log the arguments, run nothing.
STUB_SBATCH = r"""#!/usr/bin/env bash
echo "sbatch $*" >> "$STUB_LOG"
echo $(( $(grep -c '^sbatch ' "$STUB_LOG") + 100 ))
"""


def _stubs(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("sbatch", STUB_SBATCH)):
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir, tmp_path / "stub.log"


def _job_env(tmp_path, job_id: int, name: str) -> tuple[dict, Path]:
    bin_dir, log = _stubs(tmp_path)
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{venv_bin}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": name, "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "2",
           "GPUS_PER_NODE": "2", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DEEPSPEED": os.path.join(venv_bin, "deepspeed"), "PYTHON": sys.executable,
           "RECIPE": "tiny_cpu", "DS_CONFIG": "ds_configs/zero2_fp32.json", "RANK_LOGS": "1",
           "LOG_DIR": str(tmp_path / "logs"), "RUN_DIR": str(tmp_path / "runs" / name),
           "MASTER_PORT": str(training_fixtures.free_port())}
    env.pop("SLURM_RESTART_COUNT", None)
    # The script's default is a fresh folder per job; here, the cache the other tests use (the shm op built once).
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                        f"py{sys.version_info.major}{sys.version_info.minor}_cpu"))
    return env, log


def _overrides(teacher, data, *extra):
    return [f"teacher.name_or_path={teacher}", f"data.path={data}", *FAST, *extra]


def _complete(run_dir: Path) -> list[Path]:
    return [Path(p) for p in complete_checkpoints(str(run_dir / "checkpoints"))]


@pytest.mark.integration
def test_pretrain_sbatch_runs_two_cpu_ranks(tmp_path, tiny_teacher, sample_data):
    env, log = _job_env(tmp_path, 4242, "distil-test")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sbatch"),
                           *_overrides(tiny_teacher, sample_data, "train.max_steps=2", "eval.n_samples=0")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    job_dir = tmp_path / "logs" / "distil-test-4242"
    rank_logs = sorted((job_dir / "restart0").glob("*rank*.log"))
    detail = proc.stderr[-4000:] + "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in rank_logs)
    assert proc.returncode == 0, detail
    # the hostfile from `scontrol show hostnames`, and the deepspeed launcher as on a cluster
    assert (job_dir / "hostfile").read_text() == "localhost slots=2\n"
    calls = log.read_text()
    assert "scontrol show hostnames localhost" in calls
    srun = next(line for line in calls.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and f"--node {job_dir}/hostfile" in srun and "--resume auto" in srun
    run_dir = tmp_path / "runs" / "distil-test"
    assert [p.name for p in _complete(run_dir)] == ["step00000002"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2  # 1 node x 2 slots from the hostfile
    # per-job, per-rank logs (deepspeed --enable_each_rank_log), rank 0's has the training lines
    assert len(rank_logs) == 2, [p.name for p in rank_logs]
    assert "step 2/2" in "".join(p.read_text() for p in rank_logs), detail
    assert "training step exited with status 0" in proc.stderr
    assert not Path(f"{log}.requeue").exists()  # finished: nothing to requeue


@pytest.mark.integration
def test_usr1_to_batch_shell_checkpoints_requeues_and_exits_0(tmp_path, tiny_teacher, sample_data):
    """SLURM's `--signal=B:USR1@lead` signals only the batch shell: it must reach the trainer through srun and the
    per-node wrapper, past DeepSpeed's launchers (which do not handle USR1) without killing them."""
    env, log = _job_env(tmp_path, 4343, "distil-sig")
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "pretrain.sbatch"),
                             *_overrides(tiny_teacher, sample_data, "train.max_steps=400", "eval.n_samples=0",
                                         "checkpoint.export_hf=false")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    rank_dir = tmp_path / "logs" / "distil-sig-4343" / "restart0"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            text = "".join(p.read_text() for p in rank_dir.glob("*rank*.log")) if rank_dir.exists() else ""
            if re.search(r"step 2/400", text):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        os.kill(proc.pid, signal.SIGUSR1)  # to the batch shell only, as `B:` does
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rank_text = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(rank_dir.glob("*rank*.log")))
    assert proc.returncode == 0, out[-4000:] + rank_text
    assert "SIGUSR1 received" in out and "SIGUSR1 -> training processes" in out
    assert "stop requested" in rank_text
    (ckpt,) = _complete(tmp_path / "runs" / "distil-sig")[-1:]
    step = int(ckpt.name.removeprefix("step"))
    assert 2 <= step < 400
    assert Path(f"{log}.requeue").read_text() == "requeue 4343\n"


def _submit_all(tmp_path, *args, extra_env=None):
    bin_dir, log = _stubs(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), **(extra_env or {})}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "submit_all.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, log


SUBMIT_ARGS = ["--data", "/scratch/wikibooks", "--run-dir", "/scratch/runs/d", "--nodes", "4", "--array", "0-7",
               "--prepare-args", "--input /data/wiki --tokenizer bert-base-uncased", "--", "optimizer.lr=3e-4",
               "batch.micro_size=32"]


def test_submit_all_chains_four_jobs(tmp_path):
    proc, log = _submit_all(tmp_path, *SUBMIT_ARGS, extra_env={"SBATCH_ARGS": "--account=proj"})
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 4, calls
    prep, join, train, export = calls
    assert "--array=0-7" in prep and "slurm/prepare_data.sbatch" in prep and "--output /scratch/wikibooks" in prep
    assert "--input /data/wiki" in prep and "--account=proj" in prep
    assert "--dependency=afterok:101" in join and "slurm/prepare_data.sbatch join /scratch/wikibooks" in join
    assert "--dependency=afterok:102" in train and "slurm/pretrain.sbatch" in train and "--nodes=4" in train
    assert train.endswith("optimizer.lr=3e-4 batch.micro_size=32")
    assert "--export=ALL,DATA=/scratch/wikibooks,RUN_DIR=/scratch/runs/d" in train
    assert "--dependency=afterok:103" in export and "slurm/export_eval.sbatch" not in export
    assert "launch/export.py" in export and "launch/evaluate.py" in export
    assert all("--parsable" in c for c in calls)
    assert "104" in proc.stdout


def test_submit_all_dry_run_and_skip_prepare(tmp_path):
    proc, log = _submit_all(tmp_path, "--dry-run", *SUBMIT_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert not log.exists()  # nothing submitted
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 4 and "--dependency=afterok:" in lines[3]
    # an already prepared dataset: pretrain first, export after it
    proc, log = _submit_all(tmp_path / "again", "--skip-prepare", "--data", "/scratch/wikibooks", "--run-dir", "/r")
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "--dependency" not in calls[0] and "--dependency=afterok:101" in calls[1]


def test_submit_all_refuses_missing_data(tmp_path):
    proc, log = _submit_all(tmp_path, "--run-dir", "/r")
    assert proc.returncode == 2 and "--data" in proc.stderr
    assert not log.exists()
