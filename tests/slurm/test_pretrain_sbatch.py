"""slurm/pretrain.sbatch and slurm/submit_all.sh with stub `srun`/`scontrol`/`sbatch`, for what the single-node
cluster of the other tests (tests/slurm/conftest.py) cannot show: a multi-node allocation's hostfile and srun step,
and the sbatch command lines that submit_all.sh composes for several nodes and sites' options."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

STUB_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
"""
STUB_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$STUB_LOG"
case "$1 $2" in
  "show hostnames") for i in 01 02 03 04; do echo "gpu$i"; done ;;
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


def test_four_nodes_hostfile_and_srun_step(tmp_path):
    """What one machine cannot show: a 4-node allocation. The hostfile lists every host of the node list with the
    GPUs SLURM allocated per node, the head node is the first, and srun starts one task per node."""
    bin_dir, log = _stubs(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "777",
                "SLURM_JOB_NAME": "big", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_GPUS_PER_NODE": "h100:8",
                "SLURM_CPUS_PER_TASK": "64", "SLURM_SUBMIT_DIR": str(ROOT), "LOG_DIR": str(tmp_path / "logs"),
                "RUN_DIR": str(tmp_path / "run"), "PYTHON": sys.executable})
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sbatch"), "optimizer.lr=3e-4"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_dir = tmp_path / "logs" / "big-777"
    assert (job_dir / "hostfile").read_text() == "".join(f"gpu{i} slots=8\n" for i in ("01", "02", "03", "04"))
    assert "4 node(s) x 8 ranks, head gpu01:20777" in proc.stderr
    (srun,) = [line for line in log.read_text().splitlines() if line.startswith("srun ")]
    assert srun.startswith("srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 ")
    assert f"--node {job_dir}/hostfile --config distilbert_base" in srun and srun.endswith("optimizer.lr=3e-4")


def test_no_ranks_is_refused(tmp_path):
    bin_dir, log = _stubs(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "5",
           "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "0", "LOG_DIR": str(tmp_path / "logs"),
           "RUN_DIR": str(tmp_path / "run"), "SLURM_SUBMIT_DIR": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "GPUS_PER_NODE=0: give the number of ranks per node" in proc.stderr
    assert not log.exists()  # nothing started


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
