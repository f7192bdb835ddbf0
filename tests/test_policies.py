"""Exit policies on hand-computed cases (DESIGN.md table)."""

import math

import pytest
import torch

from eeengine.policies import make_policy, run_policy
from eeengine.policies.base import entropy, normalized_entropy


def test_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    # p = (1/2, 1/2): log 2; p = (1/4, 3/4): -(1/4 log 1/4 + 3/4 log 3/4)
    expected_0 = math.log(2)
    expected_1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(logits).tolist() == pytest.approx([expected_0, expected_1], abs=1e-6)
    assert normalized_entropy(torch.zeros(1, 5)).item() == pytest.approx(1.0, abs=1e-6)
    assert entropy(logits.half()).dtype == torch.float32


def _logits_with_entropy(values: list[float]) -> torch.Tensor:
    """Binary logits whose normalized entropies are given (found by bisection on the margin)."""
    rows = []
    for target in values:
        lo, hi = 0.0, 50.0
        for _ in range(100):
            mid = (lo + hi) / 2
            h = normalized_entropy(torch.tensor([[0.0, mid]])).item()
            lo, hi = (mid, hi) if h > target else (lo, mid)
        rows.append([0.0, (lo + hi) / 2])
    return torch.tensor(rows)


def test_pcee_counter_resets_and_needs_consecutive_layers():
    # One row, 6 layers; normalized entropies: confident, not, confident, confident, ...
    h = [0.1, 0.9, 0.1, 0.1, 0.9, 0.9]
    all_logits = _logits_with_entropy(h)[:, None, :]  # (L, 1, C)
    exit_layer, _ = run_policy(make_policy("pcee", threshold=0.5, patience=2), all_logits)
    assert exit_layer.tolist() == [4]  # counters 1, 0, 1, 2 -> exit at layer 4
    exit_layer, _ = run_policy(make_policy("pcee", threshold=0.5, patience=3), all_logits)
    assert exit_layer.tolist() == [6]  # never 3 in a row: full depth
    exit_layer, _ = run_policy(make_policy("pcee", threshold=0.5, patience=1), all_logits)
    assert exit_layer.tolist() == [1]


def test_entropy_threshold_is_strict_and_per_layer():
    all_logits = torch.zeros(4, 1, 2)  # H = log 2 at every layer
    policy = make_policy("entropy", threshold=math.log(2))
    assert run_policy(policy, all_logits)[0].tolist() == [4]  # H < τ is false at equality
    per_layer = make_policy("entropy", threshold=[0.0, 0.7, 0.0, 0.0])
    assert run_policy(per_layer, all_logits)[0].tolist() == [2]


def test_batched_rows_exit_independently():
    all_logits = torch.stack(
        [
            torch.tensor([[0.0, 10.0], [0.0, 0.0], [0.0, 0.0]]),
            torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]]),
            torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
        ]
    )  # (L=3, B=3, C=2)
    exit_layer, logits = run_policy(make_policy("normalized_entropy", threshold=0.2), all_logits)
    assert exit_layer.tolist() == [1, 2, 3]
    torch.testing.assert_close(logits, torch.tensor([[0.0, 10.0], [10.0, 0.0], [0.0, 0.0]]))
    assert run_policy(make_policy("none"), all_logits)[0].tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("foo", {}, "unknown policy 'foo'"),
        ("entropy", {}, "needs a threshold"),
        ("pcee", {"threshold": 0.2, "patience": 0}, "patience must be an integer >= 1"),
        ("entropy", {"threshold": 0.2, "patience": 2}, "does not take"),
    ],
)
def test_bad_policy_arguments(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **params)


@pytest.mark.parametrize(
    ("name", "threshold", "message"),
    [
        ("entropy", -0.1, "out of range"),
        ("entropy", 0.8, "out of range"),  # > log 2
        ("normalized_entropy", 1.5, "out of range"),
        ("pcee", [0.1, 0.2], "2 per-layer thresholds given, the model has 6 layers"),
    ],
)
def test_threshold_validation(name, threshold, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, threshold=threshold).validate(num_labels=2, num_layers=6)
