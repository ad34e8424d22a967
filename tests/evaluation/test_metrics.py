"""The task metrics (pipeline/evaluation/metrics.py) against hand computations, scikit-learn and scipy."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from pipeline.evaluation import metrics
from pipeline.evaluation.report import classification_report, confusion_matrix


def test_mcc_by_hand():
    # tp 3, tn 2, fp 1, fn 2: (3*2 - 1*2) / sqrt(4 * 5 * 3 * 4) = 4 / sqrt(240)
    y_true = [1, 1, 1, 1, 1, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 0, 0, 0, 1]
    assert metrics.matthews_corrcoef(y_true, y_pred) == pytest.approx(4 / np.sqrt(240))
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # a constant prediction: undefined -> 0


def test_pearson_and_spearman_by_hand():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    # x = [1, 2, 3, 4], y = [1, 3, 2, 4]: centred dot 4, norms sqrt(5) * sqrt(5)
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 5)
    # ties share the mean rank: [10, 20, 20, 30] ranks [1, 2.5, 2.5, 4]
    assert metrics.average_ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert metrics.spearman([1, 2, 3, 4], [10, 100, 1000, 10000]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_against_scikit_learn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y_true, y_pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    b_true, b_pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sklearn.metrics.accuracy_score(y_true, y_pred))
    assert metrics.binary_f1(b_true, b_pred) == pytest.approx(sklearn.metrics.f1_score(b_true, b_pred))
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(sklearn.metrics.f1_score(y_true, y_pred,
                                                                                      average="macro"))
    assert metrics.matthews_corrcoef(y_true, y_pred) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(y_true, y_pred), abs=1e-12)
    x = rng.normal(size=n)
    y = x + rng.normal(size=n)
    y_tied = np.round(y)  # ties, as STS-B's 0-5 scores in steps of 0.2 have
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert metrics.spearman(x, y_tied) == pytest.approx(scipy.stats.spearmanr(x, y_tied)[0])


def test_confusion_matrix_and_report_against_scikit_learn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 200).tolist(), rng.integers(0, 4, 200).tolist()
    assert confusion_matrix(y_true, y_pred, 4) == sklearn.metrics.confusion_matrix(y_true, y_pred).tolist()
    ours = classification_report(y_true, y_pred, [0, 1, 2, 3])
    theirs = sklearn.metrics.classification_report(y_true, y_pred, labels=[0, 1, 2, 3], output_dict=True,
                                                   zero_division=0)
    assert ours.keys() == theirs.keys()
    for key, row in theirs.items():
        assert ours[key] == pytest.approx(row), key
