"""The data-preparation array and the whole `submit_all.sh` chain, submitted with the real `sbatch` to the local
cluster (tests/slurm/conftest.py): array tasks + join + validate, byte-identical to a one-process run; a task that
fails, is requeued with slurm/requeue_prepare.sh, and the chain (join, pretrain, export + evaluate under /bin/sh)
completing to eval.json."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from pipeline.data_prep.prepare import PrepareConfig, prepare
from tests.data_prep.test_slurm_array import clean_docs, snapshot, write_text_and_jsonl
from tests.training.conftest import FAST

pytestmark = pytest.mark.integration

UNIT_MB = 0.03


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_texts) -> list[str]:
    d = tmp_path_factory.mktemp("corpus")
    return write_text_and_jsonl(d, clean_docs(sample_texts))


def prepare_args(corpus, wordpiece_dir) -> list[str]:
    args = ["--tokenizer", wordpiece_dir, "--unit-mb", str(UNIT_MB), "--valid-fraction", "0.1"]
    for path in corpus:
        args += ["--input", path]
    return args


def without_venv_on_path(env: dict) -> dict:
    """PATH without this interpreter's folder: the jobs must find the venv through VENV, as the docs say."""
    venv_bin = os.path.dirname(sys.executable)
    path = ":".join(p for p in env["PATH"].split(":") if p and os.path.realpath(p) != os.path.realpath(venv_bin))
    return {**env, "PATH": path}


def fake_venv(tmp_path: Path, fail_marker: Path) -> Path:
    """A virtual environment folder whose `python` runs this interpreter, except in array task 1 while
    `fail_marker` does not exist: a task that fails (as on a bad node), to be requeued once it is fixed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"""#!/bin/sh
if [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ] && [ ! -e '{fail_marker}' ]; then
  echo "array task 1: simulated failure (no {fail_marker})" >&2
  exit 3
fi
exec '{sys.executable}' "$@"
""")
    py.chmod(0o755)
    os.symlink(os.path.join(os.path.dirname(sys.executable), "deepspeed"), venv / "bin" / "deepspeed")
    return venv


def test_prepare_array_join_validate_matches_one_process(cluster, tmp_path, corpus, wordpiece_dir):
    ref = tmp_path / "ref"
    prepare(PrepareConfig(inputs=corpus, output=str(ref), tokenizer=wordpiece_dir, unit_mb=UNIT_MB,
                          valid_fraction=0.1, progress=False))
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = without_venv_on_path({**cluster.env, "VENV": os.path.dirname(os.path.dirname(sys.executable)),
                                "LOG_DIR": str(logs)})
    proc = cluster.cmd("bash", "slurm/submit_prepare.sh", "--array", "0-1",
                       "--sbatch-args", "--cpus-per-task=1 --time=10:00", "--",
                       *prepare_args(corpus, wordpiece_dir), "--output", out, env=env)
    array, join = re.search(r"submitted array (\d+) .* join/validate (\d+)", proc.stdout).groups()
    records = cluster.wait(join, timeout=300)
    tasks = cluster.jobs(array)
    detail = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.out")))
    assert sorted(r["JobState"] for r in tasks) == ["COMPLETED", "COMPLETED"], detail
    assert records[0]["JobState"] == "COMPLETED", detail
    # the join's options: the user's --cpus-per-task wins over the default 4; its log is named by its job id
    assert records[0]["NumCPUs"] == "1"
    join_log = logs / f"prepare-join-{join}.out"
    assert join_log.exists(), sorted(p.name for p in logs.iterdir())
    assert "is valid" in join_log.read_text(), detail
    assert sorted(p.name for p in logs.glob("prepare-data-*.out")) == [f"prepare-data-{array}_0.out",
                                                                       f"prepare-data-{array}_1.out"]
    assert snapshot(out) == snapshot(ref)


def test_submit_all_chain_recovers_a_failed_task_and_writes_eval_json(cluster, tmp_path, corpus, wordpiece_dir,
                                                                      tiny_teacher):
    """VENV=... slurm/submit_all.sh: array task 1 fails; the join waits (DependencyNeverSatisfied); after the
    cause is fixed, slurm/requeue_prepare.sh reruns the task and the chain goes on: join + validate, pretrain on 2
    CPU ranks, export + evaluate (a --wrap job, run by /bin/sh) -> eval.json."""
    marker = tmp_path / "fixed"
    data, run_dir, logs = tmp_path / "data", tmp_path / "run", tmp_path / "logs"
    env = without_venv_on_path({
        **cluster.env, "VENV": str(fake_venv(tmp_path, marker)), "LOG_DIR": str(logs), "JOB_NAME": "chain",
        "RECIPE": "tiny_cpu", "DS_CONFIG": "ds_configs/zero2_fp32.json",
        "PREPARE_SBATCH_ARGS": "--cpus-per-task=1 --time=10:00",
        "PRETRAIN_SBATCH_ARGS": "--gpus-per-node=2 --cpus-per-task=2 --time=10:00",
        "EXPORT_SBATCH_ARGS": "--cpus-per-task=1"})
    proc = cluster.cmd("bash", "slurm/submit_all.sh", "--data", data, "--run-dir", run_dir, "--nodes", "1",
                       "--array", "0-1", "--prepare-args", " ".join(prepare_args(corpus, wordpiece_dir)),
                       "--eval-args", "--n-samples 16 --batch-size 8", "--",
                       f"teacher.name_or_path={tiny_teacher}", *FAST, "eval.n_samples=0", "train.max_steps=2",
                       env=env)
    ids = re.search(r"jobs: (\d+) (\d+) (\d+) (\d+)", proc.stdout)
    assert ids, proc.stdout + proc.stderr
    array, join, train, export = ids.groups()

    # task 1 fails; SLURM never releases the join by itself
    cluster.wait(join, timeout=300, until=lambda r: r and r[0].get("Reason") == "DependencyNeverSatisfied")
    states = {r["ArrayTaskId"]: r["JobState"] for r in cluster.jobs(array)}
    assert states == {"0": "COMPLETED", "1": "FAILED"}, states
    assert "simulated failure" in (logs / f"prepare-data-{array}_1.out").read_text()

    marker.touch()
    fix = cluster.cmd("bash", "slurm/requeue_prepare.sh", array, "1")
    assert f"requeued {array}_1" in fix.stdout and f"job {join} now waits on afterok:{array}_0:{array}_1" \
        in fix.stdout, fix.stdout

    (record,) = cluster.wait(export, timeout=600)
    detail = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.out")))
    assert record["JobState"] == "COMPLETED", detail + cluster.log_tail()
    for job in (join, train):
        assert cluster.job(job)["JobState"] == "COMPLETED"
    assert (data / "manifest.json").exists() and (run_dir / "student").is_dir()
    results = json.loads((run_dir / "export" / "eval.json").read_text())
    assert results, results
    text = json.dumps(results)
    assert str(run_dir / "export") in text and tiny_teacher in text, text
