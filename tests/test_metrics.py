"""GLUE metrics against hand-computed values."""

import pytest

from eeengine.metrics import accuracy, f1, matthews, pearson


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
