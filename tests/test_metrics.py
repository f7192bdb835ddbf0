"""GLUE metrics against hand-computed values."""

import pytest

from eeengine.metrics import METRICS, accuracy, f1, matthews, pearson, spearman


def test_classification_metrics():
    predictions = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    # tp = 2, fp = 1, fn = 1, tn = 2
    assert accuracy(predictions, labels) == pytest.approx(100 * 4 / 6)
    assert f1(predictions, labels) == pytest.approx(100 * 4 / 6)  # 2tp / (2tp + fp + fn)
    assert matthews(predictions, labels) == pytest.approx(100 * (4 - 1) / 9)
    assert matthews([1, 1], [1, 1]) == 0.0  # undefined: reported as 0


def test_pearson():
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(100.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-100.0)


def test_spearman_without_ties_is_one_minus_six_sum_d2():
    # rank differences 0, 1, 1, 1, 1: rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8
    assert spearman([10, 20, 30, 40, 50], [1, 3, 2, 5, 4]) == pytest.approx(80.0)


def test_spearman_ties_get_average_ranks():
    # ranks x = 1, 2.5, 2.5, 4 and y = 1, 3, 2, 4; Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(
        100 * 4.5 / (4.5 * 5) ** 0.5
    )
    # Order-preserving transforms do not change it; reversing negates it.
    assert spearman([0.1, 5.0, 5.0, 9.0], [-3.0, 7.0, 1.0, 8.0]) == pytest.approx(
        100 * 4.5 / (4.5 * 5) ** 0.5
    )
    assert spearman([3, 2, 2, 1], [1, 3, 2, 4]) == pytest.approx(-100 * 4.5 / (4.5 * 5) ** 0.5)
    assert METRICS["spearman"] is spearman
