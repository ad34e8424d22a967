"""Fine-tuning under DeepSpeed: two real CPU ranks (the `deepspeed` launcher, gloo) reproduce the single-process
plain-PyTorch run step for step, uneven last batch and uneven evaluation shards included; the config checks; the
loss weighting that makes the ranks' gradient average the whole batch's gradient."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.finetune import (DEFAULT_DS_CONFIG, FinetuneConfig, FinetuneError, deepspeed_config,
                                          rank_share, resolve_engine)
from tests.evaluation.test_finetune import sentiment_rows, write_csv
from tests.training.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def student(tmp_path_factory, wordpiece_dir) -> str:
    """A 2-layer DistilBERT masked LM with every dropout off (so that runs can be compared exactly)."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    folder = tmp_path_factory.mktemp("student")
    tok = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                                           seq_classif_dropout=0.0, pad_token_id=tok.pad_token_id)
                          ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """81 train examples: with a global batch of 8 the last step has 1, so rank 1 gets none (weight 0); 21
    validation and 31 test examples split unevenly over 2 ranks at evaluation."""
    d = tmp_path_factory.mktemp("sentiment")
    write_csv(d / "train.csv", sentiment_rows(81, seed=0))
    write_csv(d / "validation.csv", sentiment_rows(21, seed=1))
    write_csv(d / "test.csv", sentiment_rows(31, seed=2))
    return d


ARGS = ["--epochs", "4", "--lr", "1e-2", "--batch-size", "8", "--max-length", "32", "--patience", "0",
        "--no-progress"]


def run_finetune(student, data, out, *, ranks: int, extra=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    args = [str(ROOT / "launch" / "finetune.py"), "--model", student, "--data", str(data), "--output", str(out),
            *ARGS, *extra]
    port = free_port()
    if ranks > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(port), *args, "--engine", "deepspeed"]
    else:
        cmd = [sys.executable, *args, "--engine", "torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=str(ROOT))
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    for path in leaked:
        os.unlink(path)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert not leaked, f"the run left {leaked} in /dev/shm"
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_deepspeed_ranks_reproduce_the_single_process_run(student, data, tmp_path):
    plain = run_finetune(student, data, tmp_path / "plain", ranks=1)
    ds = run_finetune(student, data, tmp_path / "ds", ranks=2)
    a = json.loads((tmp_path / "plain" / "report.json").read_text())
    b = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert (a["engine"], a["ranks"], a["zero_stage"]) == ("torch", 1, None)
    assert (b["engine"], b["ranks"], b["zero_stage"]) == ("deepspeed", 2, 1)
    assert a["steps"] == b["steps"] == 4 * 11  # ceil(81 / 8) global steps per epoch, whatever the ranks
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-4), (a["history"], b["history"])
        assert hb["valid_loss"] == pytest.approx(ha["valid_loss"], rel=1e-4), (a["history"], b["history"])
        assert hb["valid_accuracy"] == ha["valid_accuracy"]
    assert b["test"] == a["test"] and b["validation"] == a["validation"]
    assert b["test"]["macro avg"]["support"] == 31 and b["validation"]["macro avg"]["support"] == 21
    assert a["test"]["accuracy"] >= 0.9, a["history"]  # it learned the task (chance is 0.5)
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
    assert ds.stdout.count("[finetune] epoch 1/4") == 1 and ds.stdout.count("weighted avg") == 2
    assert "engine deepspeed: 2 rank(s) on cpu, 8 examples per step, ZeRO stage 1" in ds.stdout
    assert "engine torch: 1 rank(s) on cpu" in plain.stdout
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(tmp_path / "ds"), device="cpu")
    assert clf("the concert was brilliant")[0]["label"] in ("positive", "negative")


def test_rank_weights_make_the_average_of_rank_gradients_the_batch_gradient():
    """Per-example losses l_i: mean over ranks of (weight_r x mean of rank r's l_i) equals the mean of all l_i,
    for every batch size and world size, empty ranks included."""
    g = torch.Generator().manual_seed(0)
    for world in (1, 2, 3, 8):
        for n in (1, 2, 5, 8, 13):
            losses = torch.rand(n, generator=g, dtype=torch.float64)
            items = list(range(n))
            parts = [rank_share(items, r, world) for r in range(world)]
            assert sorted(i for p, w in parts if w for i in p) == items  # every example exactly once
            got = sum(w * losses[p].mean() for p, w in parts) / world
            assert got.item() == pytest.approx(losses.mean().item(), rel=1e-12)
            assert all(p for p, _ in parts)  # an empty rank still has an example to run (with weight 0)


def cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(model="m", data="d", output="o", batch_size=10, **kw)


def write(tmp_path, obj) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(obj))
    return str(path)


def test_deepspeed_config_is_filled_from_the_fine_tuning_settings(tmp_path):
    ds = deepspeed_config(cfg(), world=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 12
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == DEFAULT_DS_CONFIG["zero_optimization"]
    shipped = deepspeed_config(cfg(deepspeed_config=str(ROOT / "ds_configs" / "zero2_fp32.json")), world=2)
    assert shipped["zero_optimization"]["stage"] == 2 and shipped["train_batch_size"] == 10
    same = deepspeed_config(cfg(deepspeed_config=write(tmp_path, {"train_batch_size": 10})), world=2)
    assert same["train_micro_batch_size_per_gpu"] == 5


@pytest.mark.parametrize("obj, message", [
    ({"optimizer": {"type": "Adam"}}, '"optimizer": fine-tuning builds its own AdamW'),
    ({"scheduler": {"type": "WarmupLR"}}, '"scheduler": fine-tuning builds its own'),
    ({"bf16": {"enabled": True}}, '"bf16.enabled": fine-tuning keeps fp32 weights'),
    ({"zero_optimization": {"stage": 3}}, '"zero_optimization.stage" 3: fine-tuning supports ZeRO stages 0-2'),
    ({"train_batch_size": 64}, '"train_batch_size" is 64 but the fine-tuning settings give 10'),
    ({"gradient_clipping": 0.5}, '"gradient_clipping" is 0.5'),
])
def test_deepspeed_configs_fine_tuning_cannot_use_are_refused(tmp_path, obj, message):
    path = write(tmp_path, obj)
    with pytest.raises(FinetuneError) as e:
        deepspeed_config(cfg(deepspeed_config=path), world=2)
    assert str(e.value).startswith(f"{path}: cannot fine-tune with it") and message in str(e.value)


def test_bad_deepspeed_config_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "zero_optimization": {"stage": 1,}\n}\n')
    with pytest.raises(FinetuneError, match=r"(?s)bad\.json.*not valid JSON at line 2"):
        deepspeed_config(cfg(deepspeed_config=str(path)), world=1)
    with pytest.raises(FinetuneError, match="deepspeed_config: no such file"):
        cfg(deepspeed_config=str(tmp_path / "missing.json")).validate()
    with pytest.raises(FinetuneError, match="engine must be one of"):
        cfg(engine="fsdp").validate()


def test_auto_engine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_engine("auto", {}) == "torch"
    assert resolve_engine("auto", {"WORLD_SIZE": "1"}) == "torch"
    assert resolve_engine("auto", {"WORLD_SIZE": "2"}) == "deepspeed"
    assert resolve_engine("torch", {"WORLD_SIZE": "2"}) == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine("auto", {}) == "deepspeed"
