"""The cheap parts of benchmarks/distill_proof.py: the downstream data set built from the embedded sample, its
reference baselines and the students' overrides. The experiment itself (~35 min of CPU) is never run here."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def dp():
    spec = importlib.util.spec_from_file_location("distill_proof", ROOT / "benchmarks" / "distill_proof.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_paragraphs_are_real_labelled_english(dp):
    rows = dp.sample_paragraphs()
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {"faq", "howto", "tutorial"}
    assert min(counts.values()) > 300
    assert all(len(r["text"].split()) >= 12 and "\n" not in r["text"] for r in rows)
    # a FAQ or tutorial group is a section of the sample, named by its title
    assert all(r["group"].startswith(r["label"] + "/") for r in rows)


def test_classify_data_is_balanced_grouped_and_deterministic(dp, tmp_path):
    summary = dp.build_classify_data(str(tmp_path / "a"))
    again = dp.build_classify_data(str(tmp_path / "b"))
    splits = {}
    for name in ("train", "validation", "test"):
        rows = _read(tmp_path / "a" / f"{name}.jsonl")
        assert rows == _read(tmp_path / "b" / f"{name}.jsonl")
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == {"faq", "howto", "tutorial"} and len(set(counts.values())) == 1, counts
        assert summary["sizes"][name] == len(rows)
        splits[name] = rows
    assert summary == again
    # about 60 / 20 / 20, and no section contributes to two splits
    total = sum(summary["sizes"].values())
    assert 0.5 < summary["sizes"]["train"] / total < 0.7
    groups = {name: {r["group"] for r in rows} for name, rows in splits.items()}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    # the fine-tuning CLI's reader accepts the folder as it is
    from pipeline.evaluation.data import load_task_data

    data = load_task_data(str(tmp_path / "a"), "text", "label")
    assert data.label_names == ["faq", "howto", "tutorial"] and "test" in data.splits


def test_the_task_is_not_one_keyword(dp, tmp_path):
    dp.build_classify_data(str(tmp_path))
    train, test = _read(tmp_path / "train.jsonl"), _read(tmp_path / "test.jsonl")
    rule = dp.best_keyword_rule(train, test)
    nb = dp.naive_bayes(train, test)
    assert 0 <= rule["test_accuracy"] < 0.6  # one word does not solve it (chance is 1/3)
    assert 0.45 < nb["test_accuracy"] < 0.95 and 0 < nb["test_macro_f1"] <= 1  # words help, but not all the way


def test_baselines_on_a_toy_set(dp):
    train = [{"text": "alpha beta", "label": "a"}, {"text": "alpha gamma", "label": "a"},
             {"text": "delta beta", "label": "b"}, {"text": "delta gamma", "label": "b"}]
    test = [{"text": "alpha", "label": "a"}, {"text": "delta", "label": "b"}]
    rule = dp.best_keyword_rule(train, test)
    assert rule["word"] in ("alpha", "delta") and rule["test_accuracy"] == 1.0
    assert dp.naive_bayes(train, test)["test_accuracy"] == 1.0
    assert dp.macro_f1(["a", "b"], ["a", "a"], ["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)


def test_students_differ_only_in_init_and_loss(dp):
    cfg = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}
    over = {name: dp.student_overrides(name, cfg) for name in dp.STUDENTS}
    assert over["distilled"] == ["student.init=teacher"]
    assert over["mlm_teacher_init"] == ["student.init=teacher", "loss.kd=0", "loss.cos=0"]
    assert over["mlm_random"][:3] == ["student.init=random", "loss.kd=0", "loss.cos=0"]
    assert "student.hidden_size=384" in over["mlm_random"] and "student.ffn_size=1536" in over["mlm_random"]


def test_arguments_are_checked(dp, tmp_path):
    with pytest.raises(SystemExit):
        dp.parse_args(["--batch", "12", "--micro", "8", "--ranks", "2"])
    with pytest.raises(SystemExit):
        dp.parse_args(["--teacher", str(tmp_path)])  # no config.json there
    a = dp.parse_args(["--out", str(tmp_path), "--finetune-seeds", "0,3"])
    assert a.finetune_seeds == [0, 3] and a.out == str(tmp_path)
