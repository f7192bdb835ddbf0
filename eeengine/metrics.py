"""The official GLUE metrics (Wang et al. 2019), on plain Python/torch values.

Every metric also takes ``weights``, a (num_samples, num_examples) tensor of how often each
example occurs in each of ``num_samples`` resamples of the data (:func:`bootstrap_weights`),
and then returns the metric of every resample at once, a (num_samples,) float64 tensor: the
paired bootstrap (Efron & Tibshirani 1993) that :func:`eeengine.evaluation.sweep` uses for the
spread of each operating point's drop from full depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Resamples per bootstrap: the spread of a drop is one standard deviation, which 200
# resamples estimate to about 5 % (relative).
BOOTSTRAP_SAMPLES = 200


def bootstrap_weights(num_examples: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Tensor:
    """(samples, num_examples) float64: how many times each example is drawn in each of
    ``samples`` resamples of ``num_examples`` examples drawn with replacement (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(num_examples, (samples, num_examples), generator=generator)
    counts = torch.zeros(samples, num_examples, dtype=torch.float64)
    return counts.scatter_add_(1, drawn, torch.ones_like(counts))


def _weights(weights: Tensor | None, num_examples: int) -> Tensor:
    if weights is None:
        return torch.ones(1, num_examples, dtype=torch.float64)
    return weights.double()


def _value(values: Tensor, weights: Tensor | None) -> float | Tensor:
    """One float without resampling weights, else the (num_samples,) tensor."""
    return values.item() if weights is None else values


def _rate(hits: Tensor, weights: Tensor | None) -> float | Tensor:
    """Weighted percentage of True in ``hits`` (num_examples,)."""
    w = _weights(weights, hits.shape[0])
    return _value(100.0 * (w @ hits.double()) / w.sum(1), weights)


def _confusion(
    predictions: Sequence[int], labels: Sequence[int], weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted counts of true positives, true negatives, false positives, false negatives
    (class 1 positive), each (num_samples,)."""
    p, y = torch.as_tensor(predictions), torch.as_tensor(labels)
    w = _weights(weights, p.shape[0])
    cells = ((p == 1) & (y == 1), (p == 0) & (y == 0), (p == 1) & (y == 0), (p == 0) & (y == 1))
    tp, tn, fp, fn = (w @ cell.double() for cell in cells)
    return tp, tn, fp, fn


def accuracy(
    predictions: Sequence[int], labels: Sequence[int], weights: Tensor | None = None
) -> float | Tensor:
    """Fraction of predictions equal to the label, in percent (0-100)."""
    return _rate(torch.as_tensor(predictions) == torch.as_tensor(labels), weights)


def f1(
    predictions: Sequence[int], labels: Sequence[int], weights: Tensor | None = None
) -> float | Tensor:
    """F1 of the positive class (label 1), in percent."""
    tp, _, fp, fn = _confusion(predictions, labels, weights)
    return _value(100.0 * 2 * tp / (2 * tp + fp + fn).clamp(min=1), weights)


def matthews(
    predictions: Sequence[int], labels: Sequence[int], weights: Tensor | None = None
) -> float | Tensor:
    """Matthews correlation coefficient of binary predictions, times 100 (0 where a row or
    column of the confusion matrix is empty)."""
    tp, tn, fp, fn = _confusion(predictions, labels, weights)
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
    defined = denominator > 0
    values = 100.0 * (tp * tn - fp * fn) / denominator.where(defined, 1.0)
    return _value(values.where(defined, 0.0), weights)


def pearson(
    predictions: Sequence[float], labels: Sequence[float], weights: Tensor | None = None
) -> float | Tensor:
    """Pearson correlation, times 100 (NaN where either side is constant)."""
    p = torch.as_tensor(predictions, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    w = _weights(weights, p.shape[0])
    w = w / w.sum(1, keepdim=True)
    dp, dy = p - (w @ p)[:, None], y - (w @ y)[:, None]
    covariance = (w * dp * dy).sum(1)
    return _value(
        100.0 * covariance / ((w * dp * dp).sum(1) * (w * dy * dy).sum(1)).sqrt(), weights
    )


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


def spearman(
    predictions: Sequence[float], labels: Sequence[float], weights: Tensor | None = None
) -> float | Tensor:
    """Spearman rank correlation (Pearson of the ranks, ties get average ranks), times 100.
    With ``weights``, the ranks are those of the whole sample (a resample is not re-ranked)."""
    return pearson(_average_ranks(predictions), _average_ranks(labels), weights)


# Regression agreement: a value agrees with full depth when within this fraction of the spread
# (max - min) of the full-depth values (STS-B, 0-5 scale: about 0.25).
REGRESSION_AGREEMENT = 0.05


def agreement(
    predictions: Sequence[int | float],
    reference: Sequence[int | float],
    weights: Tensor | None = None,
) -> float | Tensor:
    """Percent (0-100) of predictions that agree with ``reference``, the full-depth predictions
    of the same inputs: the same class index, or for regression (float values) within
    :data:`REGRESSION_AGREEMENT` times the spread (max - min) of ``reference`` (of the whole
    sample, with ``weights``). The metric of label-free calibration
    (:mod:`eeengine.calibration`)."""
    p = torch.as_tensor(predictions)
    y = torch.as_tensor(reference)
    if not y.is_floating_point():
        return accuracy(predictions, reference, weights)
    tolerance = REGRESSION_AGREEMENT * (y.max() - y.min()).item()
    return _rate((p.double() - y.double()).abs() <= tolerance, weights)


METRICS = {
    "agreement": agreement,
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
