"""The scores of the fine-tuning tasks: accuracy, binary F1, macro F1 and Matthews correlation for
classification, Pearson and Spearman correlation for regression, each a plain function of numpy arrays.

Written here rather than taken from scikit-learn / scipy / the `evaluate` library: they are a few lines each,
the runtime then depends on neither, and `evaluate` downloads its metric scripts at run time (refused offline).
The tests compare every one with scikit-learn's and scipy's on random samples.

`compute(names, predictions, labels)` gives a dict of the named metrics; `METRICS` lists the names.
"""
from __future__ import annotations

import numpy as np


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean())


def binary_f1(y_true, y_pred, positive=1) -> float:
    """F1 of the positive class (GLUE's MRPC and QQP: label 1, "equivalent" / "duplicate"); 0 when undefined."""
    y_true, y_pred = np.asarray(y_true) == positive, np.asarray(y_pred) == positive
    tp = float((y_true & y_pred).sum())
    denom = float(y_true.sum() + y_pred.sum())
    return 2 * tp / denom if denom else 0.0


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of every class's F1 over the classes present in either array."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.union1d(y_true, y_pred)
    return float(np.mean([binary_f1(y_true, y_pred, c) for c in classes]))


def matthews_corrcoef(y_true, y_pred) -> float:
    """Matthews correlation, the multi-class form (Gorodkin's R_K) that reduces to the binary phi coefficient;
    0 when a marginal is constant (the correlation is undefined)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes, idx = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t, p = idx[:len(y_true)], idx[len(y_true):]
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (t, p), 1)
    true_count, pred_count = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), np.trace(confusion)
    cov_tp = correct * n - pred_count @ true_count
    cov_pp = n * n - pred_count @ pred_count
    cov_tt = n * n - true_count @ true_count
    denom = np.sqrt(cov_pp * cov_tt)
    return float(cov_tp / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def average_ranks(x) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span (scipy.stats.rankdata's "average")."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of s+1 .. e
    return ranks


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


CLASSIFICATION = {"accuracy": accuracy, "f1": binary_f1, "macro_f1": macro_f1, "mcc": matthews_corrcoef}
REGRESSION = {"pearson": pearson, "spearman": spearman}
METRICS = {**CLASSIFICATION, **REGRESSION}


def compute(names, predictions, labels) -> dict[str, float]:
    """The named metrics of predicted against true values (class ids, or scores for regression metrics)."""
    return {name: METRICS[name](labels, predictions) for name in names}
