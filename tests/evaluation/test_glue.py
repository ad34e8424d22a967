"""The GLUE suite: task table, scores, medians over seeds, the paper-shaped table (pipeline/evaluation/glue.py),
and launch/glue.py end to end on two tiny GLUE-shaped tasks (a single-text and a regression pair task)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.evaluation import glue
from tests.evaluation.test_finetune import (ROOT, distil_student, score_rows, sentiment_rows,  # noqa: F401
                                            write_csv, write_jsonl)


def test_paper_rows_and_macro_score():
    # DistilBERT's printed score is the mean of its nine cells; BERT-base's printed 79.5 is not (79.7)
    for name, row in glue.PAPER.items():
        mean = sum(row[t] for t in glue.ORDER) / 9
        assert abs(mean - row["score"]) < (0.25 if name == "BERT-base" else 0.06), (name, mean)
    assert glue.parse_tasks("all") == list(glue.ORDER)
    assert glue.parse_tasks("sst2, STS-B,cola") == ["cola", "sst2", "stsb"]  # the paper's order
    with pytest.raises(glue.GlueError, match="unknown GLUE task"):
        glue.parse_tasks("sst2,squad")


def test_task_scores_and_median_over_seeds():
    mrpc, mnli = glue.TASKS["mrpc"], glue.TASKS["mnli"]
    assert glue.task_score(mrpc, {"validation": {"f1": 0.9, "accuracy": 0.8}}) == pytest.approx(85.0)
    assert glue.task_score(mnli, {"validation_matched": {"accuracy": 0.8},
                                  "validation_mismatched": {"accuracy": 0.82}}) == pytest.approx(81.0)
    with pytest.raises(glue.GlueError, match="no accuracy on validation_mismatched"):
        glue.task_score(mnli, {"validation_matched": {"accuracy": 0.8}})
    runs = [{"seed": s, "results": {"validation": {"f1": f, "accuracy": a}}, "seconds": 10.0}
            for s, f, a in [(1, 0.90, 0.80), (2, 0.70, 0.60), (3, 0.88, 0.86), (4, 0.50, 0.40), (5, 0.95, 0.91)]]
    summary = glue.summarize(mrpc, runs)
    assert summary["scores"] == pytest.approx([85.0, 65.0, 87.0, 45.0, 93.0])
    assert summary["score"] == pytest.approx(85.0)  # the median of 5, not the mean (75)
    assert summary["metrics"]["validation/f1"] == pytest.approx(88.0)
    assert summary["metrics"]["validation/accuracy"] == pytest.approx(80.0)
    assert summary["seconds"] == 50.0
    text = glue.table({"mrpc": summary}, "student")
    lines = text.splitlines()
    assert lines[0] == ("| model | score | CoLA | MNLI | MRPC | QNLI | QQP | RTE | SST-2 | STS-B | WNLI |")
    assert lines[3].startswith("| BERT-base (paper) | 79.5 | 56.3 | 86.7 | 88.6 |")
    assert lines[4].startswith("| DistilBERT (paper) | 77.0 | 51.3 | 82.2 | 87.5 |")
    assert lines[5] == "| student | 85.0 (1 of 9 tasks) | - | - | 85.0 | - | - | - | - | - | - |"
    assert glue.paper_ratio({"mrpc": summary}) == pytest.approx(85.0 / 88.6)


def run_glue(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "glue.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
    """SST-2 (single sentences, TSV like GLUE's files) and STS-B (sentence pairs, a 0-5 score) in GLUE's columns."""
    root = tmp_path_factory.mktemp("glue")
    (root / "sst2").mkdir()
    for name, n, seed in (("train", 160, 0), ("validation", 24, 1)):
        rows = [{"sentence": r["text"], "label": int(r["label"] == "positive")} for r in sentiment_rows(n, seed)]
        (root / "sst2" / f"{name}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    (root / "stsb").mkdir()
    for name, n, seed in (("train", 160, 0), ("validation", 24, 1)):
        rows = [{"sentence1": "a review", "sentence2": r["text"], "label": r["label"]} for r in score_rows(n, seed)]
        write_jsonl(root / "stsb" / f"{name}.jsonl", rows)
    return root


def test_runner_end_to_end_on_two_tiny_tasks(distil_student, glue_root, tmp_path):  # noqa: F811
    out = tmp_path / "glue"
    args = ["--model", distil_student, "--output", out, "--data-root", glue_root, "--tasks", "stsb,sst2",
            "--seeds", "0", "--lr", "3e-3", "--batch-size", "16", "--epochs", "5", "--max-length", "32",
            "--name", "tiny"]
    proc = run_glue(*args)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((out / "glue.json").read_text())
    assert result["tasks"] == ["sst2", "stsb"] and result["seeds"] == [0] and result["failed"] == 0
    sst2, stsb = result["summaries"]["sst2"], result["summaries"]["stsb"]
    assert sst2["score"] >= 90, sst2
    assert set(stsb["metrics"]) == {"validation/pearson", "validation/spearman"}
    assert stsb["score"] == pytest.approx((stsb["metrics"]["validation/pearson"]
                                           + stsb["metrics"]["validation/spearman"]) / 2)
    assert result["macro_score"] == pytest.approx((sst2["score"] + stsb["score"]) / 2)
    assert result["settings"]["lr"] == 3e-3 and result["paper"]["DistilBERT"]["score"] == 77.0
    ours = f"| tiny | {result['macro_score']:.1f} (2 of 9 tasks) | - | - | - | - | - | - | {sst2['score']:.1f} |"
    assert ours in proc.stdout and ours in (out / "glue.md").read_text()
    report = json.loads((out / "stsb" / "seed0" / "report.json").read_text())
    assert report["data"]["kind"] == "regression" and report["data"]["text_columns"] == ["sentence1", "sentence2"]
    assert not list((out / "sst2" / "seed0").glob("*.safetensors"))  # weights dropped unless --keep-models
    assert "[finetune] eval epoch" in (out / "sst2" / "seed0" / "finetune.log").read_text()
    # a second invocation reuses the finished runs
    again = run_glue(*args)
    assert again.returncode == 0 and again.stdout.count("reusing") == 2, again.stdout
    assert json.loads((out / "glue.json").read_text())["summaries"] == result["summaries"]


def test_runner_bad_input(distil_student, glue_root, tmp_path):  # noqa: F811
    proc = run_glue("--model", distil_student, "--output", tmp_path / "o", "--data-root", glue_root, "--tasks",
                    "sst2,rte")
    assert proc.returncode == 2 and f"{glue_root}: no folder for task(s) ['rte']" in proc.stderr
    proc = run_glue("--model", distil_student, "--output", tmp_path / "o", "--tasks", "sst2,squad")
    assert proc.returncode == 2 and "unknown GLUE task" in proc.stderr
    # a task whose data lack GLUE's columns: the run fails with exit 2 and the runner says which
    bad = tmp_path / "bad"
    (bad / "cola").mkdir(parents=True)
    write_csv(bad / "cola" / "train.csv", sentiment_rows(8, 0))
    proc = run_glue("--model", distil_student, "--output", tmp_path / "o2", "--data-root", bad, "--tasks", "cola",
                    "--seeds", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cola seed 1: failed (exit 2)" in proc.stdout and "column 'sentence': no such column" in proc.stdout


def test_sbatch_script_builds_the_runner_command(tmp_path):
    """slurm/glue.sbatch outside SLURM with a stand-in interpreter that prints what it was asked to run."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "MODEL": "/runs/export", "GLUE_TASKS": "sst2,mrpc", "SEEDS": "1,2",
           "GPUS": "4", "GLUE_DATA": "/data/glue"}
    env.pop("VENV", None)
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "glue.sbatch"), "--lr", "3e-5"], capture_output=True,
                          text=True, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()[2:]
    assert args == ["launch/glue.py", "--model", "/runs/export", "--output", "/runs/export/glue", "--tasks",
                    "sst2,mrpc", "--seeds", "1,2", "--gpus", "4", "--data-root", "/data/glue", "--lr", "3e-5"]
    env.pop("MODEL")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "glue.sbatch")], capture_output=True, text=True, env=env,
                          cwd=str(ROOT))
    assert proc.returncode != 0 and "set MODEL" in proc.stderr


@pytest.mark.parametrize("tasks", ["", "all"])
def test_submit_all_adds_the_suite_only_when_asked(tmp_path, tasks):
    env = {**os.environ, "GLUE_TASKS": tasks}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "submit_all.sh"), "--dry-run", "--skip-prepare", "--data",
                           "/d", "--run-dir", "/r"], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if tasks:
        assert ("sbatch --parsable --export=ALL,MODEL=/r/export --dependency=afterok:\\<export\\> "
                "slurm/glue.sbatch") in proc.stdout
        assert "jobs: <pretrain> <export> <glue>" in proc.stdout
    else:
        assert "glue" not in proc.stdout
