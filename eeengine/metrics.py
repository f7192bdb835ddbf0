"""The official GLUE metrics (Wang et al. 2019), on plain Python/torch values."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label, in percent (0-100)."""
    p, y = torch.as_tensor(predictions), torch.as_tensor(labels)
    return 100.0 * (p == y).double().mean().item()


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1), in percent."""
    p, y = torch.as_tensor(predictions), torch.as_tensor(labels)
    tp = ((p == 1) & (y == 1)).sum().item()
    fp = ((p == 1) & (y == 0)).sum().item()
    fn = ((p == 0) & (y == 1)).sum().item()
    return 100.0 * 2 * tp / max(2 * tp + fp + fn, 1)


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient of binary predictions, times 100."""
    p, y = torch.as_tensor(predictions), torch.as_tensor(labels)
    tp = ((p == 1) & (y == 1)).sum().item()
    tn = ((p == 0) & (y == 0)).sum().item()
    fp = ((p == 1) & (y == 0)).sum().item()
    fn = ((p == 0) & (y == 1)).sum().item()
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return 100.0 * (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation, times 100."""
    p = torch.as_tensor(predictions, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    return 100.0 * torch.corrcoef(torch.stack([p, y]))[0, 1].item()


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values all get the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of the ranks, ties get average ranks), times 100."""
    return pearson(_average_ranks(predictions), _average_ranks(labels))


# Regression agreement: a value agrees with full depth when within this fraction of the spread
# (max - min) of the full-depth values (STS-B, 0-5 scale: about 0.25).
REGRESSION_AGREEMENT = 0.05


def agreement(predictions: Sequence[int | float], reference: Sequence[int | float]) -> float:
    """Percent (0-100) of predictions that agree with ``reference``, the full-depth predictions
    of the same inputs: the same class index, or for regression (float values) within
    :data:`REGRESSION_AGREEMENT` times the spread (max - min) of ``reference``.

    The metric of label-free calibration (:mod:`eeengine.calibration`)."""
    p = torch.as_tensor(predictions)
    y = torch.as_tensor(reference)
    if not y.is_floating_point():
        return accuracy(predictions, reference)
    tolerance = REGRESSION_AGREEMENT * (y.max() - y.min()).item()
    return 100.0 * ((p.double() - y.double()).abs() <= tolerance).double().mean().item()


METRICS = {
    "agreement": agreement,
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
