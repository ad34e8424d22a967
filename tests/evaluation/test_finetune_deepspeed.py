"""Fine-tuning under the real `deepspeed` launcher: two CPU ranks (DS_ACCELERATOR=cpu, gloo) running the
Trainer's DeepSpeed integration (ZeRO-1, fp32) reproduce the single-process plain-PyTorch run: the same
evaluation at every epoch, the same final report, the same saved weights."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.finetune import FinetuneError, check_deepspeed_config, resolve_deepspeed
from tests.evaluation.test_finetune import sentiment_rows, tiny_student, write_csv
from tests.training.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def student(tmp_path_factory, wordpiece_dir) -> str:
    """Every dropout off, so that the runs can be compared exactly."""
    return tiny_student(tmp_path_factory.mktemp("student"), wordpiece_dir, "distilbert", dropout=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """64 train examples (8 global steps of 8 per epoch); 24 validation examples (whole evaluation batches on
    every rank) and 31 test examples, which split unevenly over 2 ranks."""
    d = tmp_path_factory.mktemp("sentiment")
    write_csv(d / "train.csv", sentiment_rows(64, seed=0))
    write_csv(d / "validation.csv", sentiment_rows(24, seed=1))
    write_csv(d / "test.csv", sentiment_rows(31, seed=2))
    return d


ARGS = ["--epochs", "4", "--lr", "1e-2", "--warmup-ratio", "0.1", "--batch-size", "8", "--max-length", "32",
        "--patience", "0", "--seed", "0", "--no-progress", "--progress-every", "1000"]


def run_finetune(student, data, out, *, ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    args = [str(ROOT / "launch" / "finetune.py"), "--model", student, "--data", str(data), "--output", str(out),
            *ARGS]
    port = free_port()
    if ranks > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(port), *args, "--deepspeed", str(ROOT / "ds_configs" / "zero1_fp32.json")]
    else:
        cmd = [sys.executable, *args, "--deepspeed", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(ROOT))
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    for path in leaked:
        os.unlink(path)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.integration
def test_two_deepspeed_ranks_reproduce_the_single_process_run(student, data, tmp_path):
    plain = run_finetune(student, data, tmp_path / "plain", ranks=1)
    ds = run_finetune(student, data, tmp_path / "ds", ranks=2)
    a = json.loads((tmp_path / "plain" / "report.json").read_text())
    b = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert (a["engine"]["deepspeed"], a["engine"]["ranks"]) == (None, 1)
    assert b["engine"]["deepspeed"].endswith("zero1_fp32.json") and b["engine"]["ranks"] == 2
    assert a["steps"] == b["steps"] == 4 * 8  # 64 / 8 global steps per epoch, whatever the ranks
    assert len(a["history"]) == len(b["history"]) == 4
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["eval_loss"] == pytest.approx(ha["eval_loss"], rel=1e-4), (a["history"], b["history"])
        assert hb["eval_accuracy"] == ha["eval_accuracy"]
    for split in ("validation", "test"):
        ra, rb = a["results"][split], b["results"][split]
        assert rb["classes"] == ra["classes"] and rb["confusion_matrix"] == ra["confusion_matrix"]
    # The predictions of an uneven split are gathered without the padding examples (every example once, none
    # doubled), but the Trainer's mean loss still counts the last batch's padding: compared where batches are whole.
    assert b["results"]["test"]["classes"]["macro avg"]["support"] == 31
    assert b["results"]["validation"]["loss"] == pytest.approx(a["results"]["validation"]["loss"], rel=1e-4)
    assert a["results"]["test"]["accuracy"] >= 0.75, a["history"]  # it learned the task (chance is 0.5)
    wa, wb = weights(tmp_path / "plain"), weights(tmp_path / "ds")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("k_lin.bias"):
            # The key bias adds the same q.b to every score of a row, which softmax ignores: its true gradient is
            # 0, its computed one rounding noise, and Adam scales noise up to full-size steps. Noise differs
            # between any two summation orders, so this parameter drifts differently; nothing else may.
            continue
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    # rank 0 alone logs and prints the report
    assert ds.stdout.count("[finetune] eval epoch 1.00") == 1 and ds.stdout.count("weighted avg") == 2
    assert "[finetune] DeepSpeed zero1_fp32.json: 2 rank(s) on cpu, 8 examples per step" in ds.stdout
    assert "[finetune] PyTorch: 1 rank(s) on cpu, 8 examples per step, fp32" in plain.stdout
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(tmp_path / "ds"), device="cpu")
    assert clf("the concert was brilliant")[0]["label"] == "positive"


def test_deepspeed_choice_and_config_checks(tmp_path):
    assert resolve_deepspeed("auto", cuda=False) is None
    assert resolve_deepspeed("auto", cuda=True).endswith("ds_configs/zero2_bf16.json")
    assert resolve_deepspeed(None, cuda=True) is None
    for stage in (0, 1, 2):
        assert check_deepspeed_config(str(ROOT / "ds_configs" / f"zero{stage}_bf16.json"))
    with pytest.raises(FinetuneError, match=r"zero3_bf16.json: zero_optimization.stage 3: fine-tuning uses ZeRO "
                                            r"stages 0-2"):
        check_deepspeed_config(str(ROOT / "ds_configs" / "zero3_bf16.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 1,}}')
    with pytest.raises(FinetuneError, match="bad.json: not a readable DeepSpeed JSON"):
        check_deepspeed_config(str(bad))
