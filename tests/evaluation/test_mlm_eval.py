"""launch/evaluate.py: numbers on tiny models equal an independent computation with the plain HF forward."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pipeline.data import PreparedDataset
from pipeline.evaluation.mlm_eval import eval_batches, evaluate_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, wordpiece_dir):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    from pipeline.resources import SAMPLE_CORPUS

    root = tmp_path_factory.mktemp("mlm_eval")
    data = root / "data"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), "--input",
                           str(SAMPLE_CORPUS / "howto.txt.zst"), "--tokenizer", wordpiece_dir, "--output", str(data),
                           "--workers", "1", "--valid-fraction", "0.2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(1)
    teacher = root / "teacher"
    BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    student = root / "student"
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64)).save_pretrained(student)
    tok.save_pretrained(student)
    return str(data), str(teacher), str(student)


def _independent(model_dir, data, teacher_dir=None):
    """Plain HF forward over the same fixed batches: sum of CE, correct and agreeing tokens, by hand."""
    from transformers import AutoModelForMaskedLM

    m = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    t = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval() if teacher_dir else None
    batches = eval_batches(PreparedDataset(data, "valid"), seq_len=32, mode="packed", n_samples=24, batch_size=8)
    ce = correct = agree = n = 0
    with torch.no_grad():
        for b in batches:
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            sel = b["labels"] != -100
            lp = torch.log_softmax(logits[sel], -1)
            gold = b["labels"][sel]
            ce += -lp[torch.arange(len(gold)), gold].sum().item()
            pred = logits[sel].argmax(-1)
            correct += (pred == gold).sum().item()
            if t is not None:
                tp = t(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[sel].argmax(-1)
                agree += (tp == pred).sum().item()
            n += len(gold)
    return ce / n, correct / n, agree / n, n


def test_numbers_equal_an_independent_computation(setup):
    data, teacher, student = setup
    rows = evaluate_models([student], data=data, teacher=teacher, seq_len=32, n_samples=24, batch_size=8)
    assert [r["model"] for r in rows] == [teacher, student]
    t_row, s_row = rows
    loss, acc, agree, n = _independent(student, data, teacher)
    assert s_row["masked_tokens"] == n and s_row["sequences"] == 24
    assert s_row["mlm_loss"] == pytest.approx(loss, rel=1e-5)
    assert s_row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert s_row["mlm_acc"] == pytest.approx(acc) and s_row["agreement"] == pytest.approx(agree)
    t_loss, t_acc, _, _ = _independent(teacher, data)
    assert t_row["mlm_loss"] == pytest.approx(t_loss, rel=1e-5) and t_row["mlm_acc"] == pytest.approx(t_acc)
    assert t_row["agreement"] == 1.0
    # Fixed masks: evaluating again gives the same numbers exactly.
    again = evaluate_models([student], data=data, teacher=teacher, seq_len=32, n_samples=24, batch_size=8)
    assert again == rows


def test_cli_table_json_and_tokenizer_mismatch(setup, tmp_path):
    data, teacher, student = setup
    out = tmp_path / "eval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), student, "--data", data,
                           "--teacher", teacher, "--seq-len", "32", "--n-samples", "24", "--batch-size", "8",
                           "--output", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "agreement" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 and results[1]["model"] == student

    from transformers import BertTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    other = tmp_path / "other"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(other)
    for f in ("config.json", "model.safetensors"):
        (other / f).write_bytes(open(os.path.join(student, f), "rb").read())
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), str(other), "--data", data,
                           "--seq-len", "32", "--n-samples", "24", "--batch-size", "8"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "was prepared with tokenizer" in proc.stderr
