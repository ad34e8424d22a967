"""A SLURM array: task i of n runs units i, i+n, ...; `join` then writes the manifest. The result is the
same bytes as a single-task run."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from pipeline import shards as fmt
from pipeline.data.prepared import DatasetError, PreparedDataset
from pipeline.data.validate import validate
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, array_task_from_env, prepare
from tests.conftest import ROOT, run_cli, write_text_docs

UNIT_MB = 0.03
SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
              "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_JOB_ID")


def clean_docs(texts: list[str]) -> list[str]:
    return ["\n".join(line for line in t.split("\n") if line.strip()) for t in texts]


def write_text_and_jsonl(d, docs: list[str]) -> list[str]:
    """docs[:120] as paragraphs in a.txt and docs[120:200] as JSON Lines in b.jsonl: an input of two formats."""
    write_text_docs(d / "a.txt", docs[:120])
    with open(d / "b.jsonl", "w") as f:
        for t in docs[120:200]:
            f.write(json.dumps({"text": t}) + "\n")
    return [str(d / "a.txt"), str(d / "b.jsonl")]


def snapshot(out) -> dict:
    files = {}
    for sub in ("train", "valid", "counts"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            with open(os.path.join(out, sub, name), "rb") as f:
                files[f"{sub}/{name}"] = f.read()
    for name in ("token_counts.npy", "bad_records.jsonl", "plan.json"):
        with open(os.path.join(out, name), "rb") as f:
            files[name] = f.read() if name != "plan.json" else json.loads(f.read())["plan_id"]
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    return {"files": files, **{k: m[k] for k in ("plan_id", "dtype", "tokenizer", "settings", "sources", "totals",
                                                 "shards", "token_counts", "bad_records")}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_texts) -> list[str]:
    d = tmp_path_factory.mktemp("array-in")
    docs = clean_docs(sample_texts)
    two_formats = write_text_and_jsonl(d, docs)
    for k in range(3):
        write_text_docs(d / f"small{k}.txt", docs[200 + 10 * k:210 + 10 * k], mode="lines")
    return [*two_formats, str(d / "small*.txt")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs, wordpiece_dir):
    out = tmp_path_factory.mktemp("array-ref") / "out"
    prepare(PrepareConfig(inputs=inputs, output=str(out), tokenizer=wordpiece_dir, unit_mb=UNIT_MB,
                          valid_fraction=0.1, progress=False))
    with open(out / "plan.json") as f:
        n_units = len(json.load(f)["units"])
    assert n_units >= 7  # several units per task
    return out, n_units


def task_args(inputs, out, wordpiece_dir) -> list[str]:
    args = ["--output", str(out), "--tokenizer", wordpiece_dir, "--unit-mb", str(UNIT_MB), "--valid-fraction",
            "0.1", "--workers", "1", "--no-progress"]
    for i in inputs:
        args += ["--input", i]
    return args


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in SLURM_VARS}


def test_array_of_three_concurrent_tasks_then_join(tmp_path, inputs, wordpiece_dir, reference):
    ref, n_units = reference
    out = tmp_path / "out"
    procs = []
    for task in range(3):
        env = {**clean_env(), "SLURM_ARRAY_JOB_ID": "777", "SLURM_ARRAY_TASK_ID": str(task),
               "SLURM_ARRAY_TASK_COUNT": "3"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "prepare_data.py"),
                                       *task_args(inputs, out, wordpiece_dir)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append((p.returncode, stderr))
    for task, (rc, stderr) in enumerate(results):
        assert rc == 0, stderr
        m = re.search(r"planned (\d+) units .* this task runs (\d+) of them", stderr)
        assert m and int(m.group(1)) == n_units and int(m.group(2)) == len(range(task, n_units, 3)), stderr
        assert f"array task {task}/3 done" in stderr and f"join {out}" in stderr

    # every unit done, but no dataset until join
    assert sorted(os.listdir(out / "units")) == [f"{u:06d}.json" for u in range(n_units)]
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetError, match=r"has not finished or not been joined; run `python "
                                           r"launch/prepare_data.py join"):
        PreparedDataset(out)

    # join refuses while units are missing, naming them
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    for u in (1, 5):
        os.unlink(broken / fmt.unit_paths(u)["record"])
    r = run_cli("join", broken, check=False)
    assert r.returncode == 1
    assert "2 unit(s) incomplete" in r.stderr
    assert "unit 1: not done (units/000001.json missing)" in r.stderr
    assert "unit 5: not done (units/000005.json missing)" in r.stderr
    assert not (broken / "manifest.json").exists()

    r = run_cli("join", out)
    assert f"joined {n_units} units" in r.stderr
    assert snapshot(out) == snapshot(ref)
    assert validate(str(out)) == []


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", ROOT / "launch" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_array_with_min_max_indices(tmp_path, inputs, wordpiece_dir, reference, monkeypatch):
    """--array=1-3: SLURM gives MIN/MAX (no COUNT); tasks are counted from MIN. Tasks run one after another
    here, through the CLI's main() in this process."""
    ref, n_units = reference
    cli = load_cli()
    out = tmp_path / "out"
    for k in SLURM_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "3")
    for task_id in (3, 1):  # any order
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
        assert cli.main(task_args(inputs, out, wordpiece_dir)) == 0
    done = sorted(int(n[:6]) for n in os.listdir(out / "units"))
    assert done == sorted(set(range(0, n_units, 3)) | set(range(2, n_units, 3)))
    assert not (out / "manifest.json").exists()

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert cli.main(["join", str(out)]) == 1  # task 2's units are missing

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert cli.main(task_args(inputs, out, wordpiece_dir)) == 0
    assert cli.main(["join", str(out)]) == 0
    assert snapshot(out) == snapshot(ref)


def test_array_task_with_other_settings_is_refused(tmp_path, inputs, wordpiece_dir):
    out = tmp_path / "out"
    base = dict(inputs=inputs, output=str(out), tokenizer=wordpiece_dir, unit_mb=UNIT_MB, valid_fraction=0.1,
                progress=False, array_count=2)
    prepare(PrepareConfig(**base, array_task=0))
    with pytest.raises(PrepareError, match=r"settings\.valid_fraction"):
        prepare(PrepareConfig(**{**base, "valid_fraction": 0.2}, array_task=1))
    problems = PrepareConfig(**base, array_task=2).problems()
    assert problems == ["array_task: must be in [0, 2), got 2"]
    assert any(p.startswith("overwrite: not allowed in an array")
               for p in PrepareConfig(**base, array_task=1, overwrite=True).problems())


def test_array_task_from_env():
    assert array_task_from_env({}) is None
    assert array_task_from_env({"SLURM_JOB_ID": "5"}) is None
    assert array_task_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert array_task_from_env({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"}) == (0, 1)
    # --array=4-7
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7"}
    assert array_task_from_env(env) == (1, 4)
    assert array_task_from_env({**env, "SLURM_ARRAY_TASK_COUNT": "4"}) == (1, 4)
    assert array_task_from_env({**env, "SLURM_ARRAY_TASK_STEP": "1"}) == (1, 4)
    assert array_task_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4",
                                "SLURM_ARRAY_TASK_MAX": "7"}) == (3, 4)
    with pytest.raises(PrepareError, match="neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX"):
        array_task_from_env({"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(PrepareError, match="array step 2 is not supported"):
        array_task_from_env({**env, "SLURM_ARRAY_TASK_STEP": "2"})
