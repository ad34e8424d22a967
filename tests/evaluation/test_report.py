"""classification_report: scikit-learn's conventions (output_dict=True, zero_division=0) by plain counting."""
from __future__ import annotations

import random

import pytest

from pipeline.evaluation.report import classification_report, format_report


def test_hand_computed_example():
    # cat: tp 2, fp 2, fn 0; dog: tp 0, fp 0, fn 1 (never predicted: precision 0 by zero_division); bird: tp 1, fn 1
    y_true = ["cat", "cat", "dog", "bird", "bird"]
    y_pred = ["cat", "cat", "cat", "bird", "cat"]
    r = classification_report(y_true, y_pred, ["bird", "cat", "dog"])
    assert list(r) == ["bird", "cat", "dog", "accuracy", "macro avg", "weighted avg"]
    assert r["bird"] == {"precision": 1.0, "recall": 0.5, "f1-score": pytest.approx(2 / 3), "support": 2}
    assert r["cat"] == {"precision": pytest.approx(0.5), "recall": 1.0, "f1-score": pytest.approx(2 / 3), "support": 2}
    assert r["dog"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["macro avg"] == {"precision": pytest.approx(0.5), "recall": pytest.approx(0.5),
                              "f1-score": pytest.approx(4 / 9), "support": 5}
    assert r["weighted avg"] == {"precision": pytest.approx((2 * 1 + 2 * 0.5) / 5),
                                 "recall": pytest.approx((2 * 0.5 + 2 * 1) / 5),
                                 "f1-score": pytest.approx((2 * 2 / 3 + 2 * 2 / 3) / 5), "support": 5}
    assert isinstance(r["cat"]["support"], int)


def test_label_outside_labels_gives_micro_avg_and_unsupported_label_counts_in_macro():
    r = classification_report([0, 1, 1, 2], [0, 1, 2, 2], labels=[0, 1, 3])
    assert "accuracy" not in r and list(r)[:3] == ["0", "1", "3"]
    # micro over labels {0, 1, 3}: tp 2, predicted 2, true 3
    assert r["micro avg"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1-score": pytest.approx(0.8),
                              "support": 3}
    assert r["3"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    assert r["macro avg"]["recall"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [], ["a"])
    with pytest.raises(ValueError, match="y_pred"):
        classification_report(["a"], ["a", "b"], ["a", "b"])


def _random_case(rng: random.Random):
    names = ["neg", "neu", "pos", "x"][: rng.randint(2, 4)]
    n = rng.randint(1, 40)
    y_true = [rng.choice(names) for _ in range(n)]
    y_pred = [rng.choice(names) for _ in range(n)]
    labels = sorted(set(names) | set(y_true))
    if rng.random() < 0.3:  # a label subset: the micro-average branch
        labels = labels[: max(1, len(labels) - 1)]
    return y_true, y_pred, labels


def test_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    cases = [_random_case(rng) for _ in range(200)]
    cases.append((["a", "a", "b"], ["a", "a", "a"], ["a", "b", "c"]))  # a never-true, never-predicted label
    for y_true, y_pred, labels in cases:
        ours = classification_report(y_true, y_pred, labels)
        ref = sk.classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
        assert list(ours) == list(ref), (y_true, y_pred, labels)
        for key, value in ref.items():
            if isinstance(value, dict):
                for m, v in value.items():
                    assert ours[key][m] == pytest.approx(v, abs=1e-12), (key, m, y_true, y_pred, labels)
            else:
                assert ours[key] == pytest.approx(value, abs=1e-12), (key, y_true, y_pred, labels)


def test_format_report_table():
    text = format_report(classification_report(["a", "b"], ["a", "a"], ["a", "b"]), title="test")
    lines = text.splitlines()
    assert lines[0] == "test" and "precision" in lines[1] and "f1-score" in lines[1]
    assert any(line.split()[:1] == ["accuracy"] and line.split()[1] == "0.5000" for line in lines)
    assert any(line.strip().startswith("macro avg") for line in lines)
