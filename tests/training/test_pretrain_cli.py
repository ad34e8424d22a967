"""launch/pretrain.py refuses bad input before spending compute: clear messages, exit status 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import ROOT, metrics, pretrain


def _run(*args):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_every_config_problem_in_one_message():
    proc = _run("--config", "tiny_cpu", "optimizer.lr=-1", "batch.micro_size=0", "loss.kd_tokens=some")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    for key in ("run_dir: required", "data.path: required", "optimizer.lr: must be > 0", "batch.micro_size: must be",
                "loss.kd_tokens: all or masked", "teacher.name_or_path"):
        assert key in err, (key, err)
    assert "Traceback" not in err


def test_help_config_and_missing_recipe():
    proc = _run("--help-config")
    assert proc.returncode == 0 and "loss.temperature = 2.0" in proc.stdout
    proc = _run("--config", "nope")
    assert proc.returncode == 2 and "not a shipped recipe" in proc.stderr and "distilbert_base" in proc.stderr


def test_tokenizer_mismatch_is_refused(tmp_path, sample_data):
    """A teacher whose tokenizer is not the one the data was prepared with: ids would mean other words."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + ["the", "and", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    teacher = tmp_path / "other_teacher"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(teacher)
    BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(teacher)
    proc = pretrain(tmp_path / "run", teacher, sample_data, "train.max_steps=1", ranks=None, launcher="python",
                    check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "was prepared with tokenizer" in proc.stderr and "Prepare the data with the model's tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_teacher_without_mlm_head_is_refused(tmp_path, sample_data, wordpiece_dir):
    """all-MiniLM-L6-v2 is an encoder without an MLM head: as a teacher its soft targets would be noise."""
    proc = pretrain(tmp_path / "run", wordpiece_dir, sample_data, "train.max_steps=1", ranks=None, launcher="python",
                    check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "MLM head" in proc.stderr and "Traceback" not in proc.stderr


def test_no_teacher_baseline_takes_its_sizes_from_the_named_teacher(tmp_path, tiny_teacher, sample_data):
    """student.init=random with loss.kd=0 loss.cos=0 and a teacher named (the baseline distillation must beat): the
    student gets the teacher's sizes, random weights, and trains without the teacher's losses."""
    import json

    run = tmp_path / "run"
    proc = pretrain(run, tiny_teacher, sample_data, "train.max_steps=1", "student.init=random", "loss.kd=0",
                    "loss.cos=0", "eval.n_samples=0", ranks=None, launcher="python")
    assert "teacher none" in proc.stdout + proc.stderr  # freed after lending its sizes
    teacher_cfg = json.loads((Path(tiny_teacher) / "config.json").read_text())
    student_cfg = json.loads((run / "student" / "config.json").read_text())
    assert student_cfg["dim"] == teacher_cfg["hidden_size"] and student_cfg["n_layers"] == 2
    assert "loss/kd" not in metrics(run)[1] and metrics(run)[1]["loss/mlm"] > 0


@pytest.mark.slow
def test_compiled_run_matches_the_eager_run(tmp_path, tiny_teacher, sample_data):
    """train.compile=true (engine.compile for the student, the teacher's encoder compiled in place): the same losses
    as eager to float tolerance. Slow on CPU (compilation), so not in the default run."""
    args = ["train.max_steps=2", "student.dropout=0.0", "student.attention_dropout=0.0", "eval.n_samples=0",
            "checkpoint.every_steps=0", "checkpoint.export_hf=false"]
    pretrain(tmp_path / "eager", tiny_teacher, sample_data, *args, ranks=None, launcher="python")
    pretrain(tmp_path / "compiled", tiny_teacher, sample_data, *args, "train.compile=true", ranks=None,
             launcher="python", timeout=900)
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for step in (1, 2):
        assert compiled[step]["loss/total"] == pytest.approx(eager[step]["loss/total"], rel=1e-4)


def test_resume_keeps_the_checkpoints_schedule_when_the_config_changes_max_steps(tmp_path, tiny_teacher, sample_data):
    """The checkpoint's total steps win (the log says so), and the learning rate follows that schedule: the steps
    after the resume have the learning rates of a run that went through with the checkpoint's total."""
    through, resumed = tmp_path / "through", tmp_path / "resumed"
    pretrain(through, tiny_teacher, sample_data, "train.max_steps=6", ranks=None, launcher="python")
    pretrain(resumed, tiny_teacher, sample_data, "train.max_steps=6", "train.stop_at_step=3",
             "checkpoint.every_steps=3", ranks=None, launcher="python")
    proc = pretrain(resumed, tiny_teacher, sample_data, "train.max_steps=12", ranks=None, launcher="python")
    assert "total steps 6 from the checkpoint kept" in proc.stdout + proc.stderr
    expected, got = metrics(through), metrics(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step]["train/lr"] == pytest.approx(expected[step]["train/lr"], rel=1e-9), step
