"""Per-class precision, recall, F1 and support, with scikit-learn's `classification_report` conventions
(`output_dict=True, zero_division=0`), by plain counting: the runtime then does not depend on scikit-learn (the
tests compare the two).

    classification_report(["a", "b", "a"], ["a", "a", "a"], labels=["a", "b"])
    -> {"a": {"precision": 0.667, "recall": 1.0, "f1-score": 0.8, "support": 2}, "b": {...},
        "accuracy": 0.667, "macro avg": {...}, "weighted avg": {...}}

Conventions kept from scikit-learn: keys are `str(label)` in the order of `labels`; a ratio with a zero
denominator is 0; F1 is 2tp / (2tp + fp + fn) (not the harmonic mean of the rounded ratios); macro averages
every label in `labels`, including labels with no support; weighted averages by true support; `"accuracy"`
is reported when `labels` covers every true and predicted value, otherwise a `"micro avg"` entry over
`labels` takes its place; support is an int, every other value a float.
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

METRICS = ("precision", "recall", "f1-score")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def classification_report(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                          labels: Sequence[Hashable]) -> dict:
    """The report of scikit-learn's `classification_report(y_true, y_pred, labels=labels, output_dict=True,
    zero_division=0)`, computed by counting. `labels` fixes the rows and their order."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} values but y_pred has {len(y_pred)}")
    if not len(y_true):
        raise ValueError("classification_report of an empty sample")
    labels = list(labels)
    if not labels:
        raise ValueError("classification_report needs at least one label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels has duplicates: {labels}")
    tp, pred_count, true_count = Counter(), Counter(y_pred), Counter(y_true)
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] += 1

    report: dict = {}
    rows = []
    for label in labels:
        t, n_pred, n_true = tp[label], pred_count[label], true_count[label]
        fp, fn = n_pred - t, n_true - t
        row = {"precision": _ratio(t, n_pred), "recall": _ratio(t, n_true),
               "f1-score": _ratio(2 * t, 2 * t + fp + fn), "support": int(n_true)}
        report[str(label)] = row
        rows.append(row)

    total_support = sum(r["support"] for r in rows)
    if set(labels) >= set(true_count) | set(pred_count):
        report["accuracy"] = _ratio(sum(tp[label] for label in labels), len(y_true))
    else:  # some values are outside `labels`: micro average over `labels` only (scikit-learn's "micro avg")
        sum_tp = sum(tp[label] for label in labels)
        sum_pred = sum(pred_count[label] for label in labels)
        sum_true = sum(true_count[label] for label in labels)
        report["micro avg"] = {"precision": _ratio(sum_tp, sum_pred), "recall": _ratio(sum_tp, sum_true),
                               "f1-score": _ratio(2 * sum_tp, sum_pred + sum_true), "support": int(total_support)}
    report["macro avg"] = {**{m: float(sum(r[m] for r in rows) / len(rows)) for m in METRICS},
                           "support": int(total_support)}
    report["weighted avg"] = {**{m: _ratio(sum(r[m] * r["support"] for r in rows), total_support) for m in METRICS},
                              "support": int(total_support)}
    return report


def format_report(report: dict, title: str | None = None, digits: int = 4) -> str:
    """A report as a text table, laid out like scikit-learn's printed classification_report."""
    names = [k for k in report if k not in ("accuracy", "micro avg", "macro avg", "weighted avg")]
    avgs = [k for k in ("micro avg", "macro avg", "weighted avg") if k in report]
    width = max([len(n) for n in names + avgs] + [len("accuracy"), digits])
    head = f"{'':>{width}} " + " ".join(f"{h:>9}" for h in ("precision", "recall", "f1-score", "support"))
    lines = ([title] if title else []) + [head, ""]

    def row(name, r):
        return (f"{name:>{width}} " + " ".join(f"{r[m]:>9.{digits}f}" for m in METRICS) + f" {r['support']:>9d}")

    lines += [row(n, report[n]) for n in names] + [""]
    if "accuracy" in report:
        support = report["macro avg"]["support"]
        lines.append(f"{'accuracy':>{width}} {'':>9} {'':>9} {report['accuracy']:>9.{digits}f} {support:>9d}")
    lines += [row(a, report[a]) for a in avgs]
    return "\n".join(lines)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> list[list[int]]:
    """Counts [true label][predicted label] of label ids 0..n_labels-1 (scikit-learn's layout)."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    return matrix
