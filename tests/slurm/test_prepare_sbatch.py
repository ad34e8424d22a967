"""slurm/prepare_data.sbatch and slurm/submit_prepare.sh: syntax, lint, and a real run through a stub `sbatch`
that executes each array task with the SLURM_* variables SLURM would set, then the dependent join job."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys


from pipeline.data.prepared import PreparedDataset
from tests.conftest import ROOT, write_text_docs


# Runs the submitted script in the foreground: every task of --array=A-B in turn with SLURM_ARRAY_* set,
# as SLURM would; prints a job id like `sbatch --parsable`; logs its arguments.
STUB_SBATCH = r"""#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$STUB_LOG"
array=""; script=""; args=()
while [ $# -gt 0 ]; do
  case $1 in
    --array=*) array=${1#--array=}; shift ;;
    --parsable) shift ;;
    --*) shift ;;
    *) script=$1; shift; args=("$@"); break ;;
  esac
done
n=$(( $(wc -l < "$STUB_LOG") + 1000 ))
if [ -n "$array" ]; then
  lo=${array%-*}; hi=${array#*-}
  for i in $(seq "$lo" "$hi"); do
    SLURM_JOB_ID=$n SLURM_ARRAY_JOB_ID=$n SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_MIN=$lo SLURM_ARRAY_TASK_MAX=$hi \
      SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) SLURM_CPUS_PER_TASK=1 SLURM_SUBMIT_DIR="$PWD" \
      bash "$script" "${args[@]}" >> "$STUB_LOG.out" 2>&1
  done
else
  SLURM_JOB_ID=$n SLURM_SUBMIT_DIR="$PWD" bash "$script" "${args[@]}" >> "$STUB_LOG.out" 2>&1
fi
echo "$n"
"""


def test_submit_prepare_runs_array_then_join(tmp_path, sample_texts, wordpiece_dir):
    corpus = write_text_docs(tmp_path / "corpus.txt", sample_texts[:120], mode="lines")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "sbatch"
    stub.write_text(STUB_SBATCH)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "prepared"
    log = tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "STUB_LOG": str(log), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "submit_prepare.sh"), "--array", "0-2", "--",
         "--input", str(corpus), "--output", str(out), "--tokenizer", wordpiece_dir, "--unit-mb", "0.02", "--text-mode", "lines"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    task_log = (tmp_path / "sbatch.log.out").read_text() if (tmp_path / "sbatch.log.out").exists() else ""
    assert proc.returncode == 0, proc.stderr + task_log
    calls = log.read_text().splitlines()
    assert "--array=0-2" in calls[0] and "--dependency=afterok:" in calls[1] and " join " in f" {calls[1]} "
    # each task ran its share, the join wrote the manifest and validate passed
    assert task_log.count("prepare-data: array task") == 3
    assert "is valid" in task_log
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]["train"]) >= 3
    ds = PreparedDataset(str(out), tokenizer=wordpiece_dir, verify="full")
    assert ds.n_docs + PreparedDataset(str(out), "valid").n_docs == 120
