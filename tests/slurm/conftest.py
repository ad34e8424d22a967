"""A real single-node SLURM cluster for the tests (slurm/local_cluster.sh): munged, slurmctld and slurmd on
localhost with their configuration in a temporary folder, started once per session and stopped after the tests.

Where SLURM cannot start (not installed and not installable, not root, no munge), every test that needs it is
skipped with the reason; DISTIL_REQUIRE_SLURM=1 (CI) turns that skip into a failure.

No slurmdbd runs, so `sacct` has no data: job states come from `scontrol show job` (finished jobs are kept for
MinJobAge) and the jobcomp/filetxt record in the cluster folder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.training import conftest as training_fixtures

# The trainer tests' session fixtures (tests/training/conftest.py is not a parent of this folder).
tiny_teacher = training_fixtures.tiny_teacher
sample_data = training_fixtures.sample_data

CLUSTER_SCRIPT = ROOT / "slurm" / "local_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
_FIELD = re.compile(r"(\w+(?:/\w+)?)=(.*?)(?= \w+(?:/\w+)?=|$)")


def parse_job_lines(text: str) -> list[dict]:
    """`scontrol show job -o` output (one line per job, `Key=Value` fields) as dicts."""
    return [dict(_FIELD.findall(line.strip())) for line in text.splitlines() if line.strip()]


@dataclass
class Cluster:
    dir: Path
    env: dict  # what a job needs: SLURM_CONF, the venv, offline Hugging Face, CPU DeepSpeed
    timings: dict = field(default_factory=dict)

    def cmd(self, *args, env=None, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(map(str, args)), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, cwd=str(ROOT))
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def sbatch(self, *args, env=None) -> str:
        """Submit from the repository root (the scripts cd to SLURM_SUBMIT_DIR); returns the job id."""
        return self.cmd("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """Every record `scontrol show job` has for this id (an array: one per task)."""
        proc = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        return parse_job_lines(proc.stdout) if proc.returncode == 0 else []

    def job(self, job_id: str) -> dict:
        records = self.jobs(job_id)
        assert len(records) == 1, f"job {job_id}: {records}"
        return records[0]

    def wait(self, job_id: str, timeout: float = 300, until=None) -> list[dict]:
        """Wait until every record of the job is final (or pending on a dependency that can never be met), or
        `until(records)` is true; returns the records."""
        deadline = time.time() + timeout
        records = []
        while time.time() < deadline:
            records = self.jobs(job_id)
            if until is not None:
                if until(records):
                    return records
            elif records and all(r["JobState"] in FINAL_STATES or r.get("Reason") == "DependencyNeverSatisfied"
                                 for r in records):
                return records
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not done after {timeout} s: "
                             f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}\n"
                             f"{self.log_tail()}")

    def wait_for_text(self, path: Path, pattern: str, job_id: str, timeout: float = 240) -> float:
        """Wait until the file matches the regex (returns the time), failing early when the job ended."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.exists() and re.search(pattern, path.read_text(errors="replace")):
                return time.time()
            records = self.jobs(job_id)
            if records and all(r["JobState"] in FINAL_STATES for r in records):
                break
            time.sleep(0.2)
        text = path.read_text(errors="replace")[-6000:] if path.exists() else "(no file)"
        raise AssertionError(f"{pattern!r} not in {path} (job {job_id}: {self.jobs(job_id)})\n{text}")

    def jobcomp(self) -> list[dict]:
        """The jobcomp/filetxt records: one per job end, requeues included."""
        path = self.dir / "jobcomp.txt"
        return parse_job_lines(path.read_text()) if path.exists() else []

    def log_tail(self, n: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.dir / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def record_timing(self, name: str, seconds: float) -> None:
        """Signal-to-exit measurements; written to $DISTIL_SLURM_TIMINGS (JSON) at the end of the session."""
        self.timings.setdefault(name, []).append(round(seconds, 2))


def _skip_or_fail(reason: str):
    if os.environ.get("DISTIL_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required here (DISTIL_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(f"no local SLURM cluster: {reason}")


def job_env(extra: dict | None = None) -> dict:
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    # DeepSpeed's CPU all-reduce op: the cache the other tests use, built once (the scripts default to a fresh one)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                        f"py{sys.version_info.major}{sys.version_info.minor}_cpu"))
    for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[k]  # tests run inside a SLURM job must not pass its variables on
    return {**env, **(extra or {})}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if sys.platform != "linux":
        _skip_or_fail("the local cluster needs Linux")
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(folder)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        _skip_or_fail(f"`slurm/local_cluster.sh start` exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    cluster = Cluster(folder, job_env({"SLURM_CONF": str(folder / "slurm.conf")}))
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
        if cluster.timings and os.environ.get("DISTIL_SLURM_TIMINGS"):
            Path(os.environ["DISTIL_SLURM_TIMINGS"]).write_text(json.dumps(cluster.timings, indent=1) + "\n")


@pytest.fixture
def cluster(slurm_cluster):
    """The session's cluster; the jobs a test leaves behind are cancelled after it."""
    before = {r["JobId"] for r in parse_job_lines(slurm_cluster.cmd("scontrol", "show", "job", "-o",
                                                                    check=False).stdout) if "JobId" in r}
    yield slurm_cluster
    now = parse_job_lines(slurm_cluster.cmd("scontrol", "show", "job", "-o", check=False).stdout)
    left = [r["JobId"] for r in now if r.get("JobId") not in before and r.get("JobState") not in FINAL_STATES]
    if left:
        slurm_cluster.cmd("scancel", *left, check=False)
        for job_id in left:
            slurm_cluster.wait(job_id, timeout=90)
