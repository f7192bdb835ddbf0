"""Calibration sweeps over every policy that applies to the model."""

import torch

from eeengine.evaluation import (
    SWEEP_ELBERT_WINDOWS,
    SWEEP_GRIDS,
    SWEEP_PATIENCE,
    policy_params,
    sweep,
    sweep_params,
)
from eeengine.policies import POLICIES, make_policy
from eeengine.selection import choose_operating_point

NUM_LAYERS, NUM_EXAMPLES = 4, 40


def _random_logits(num_labels: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(NUM_LAYERS, NUM_EXAMPLES, num_labels, generator=generator) * 3


def test_classification_sweeps_every_policy_but_lte_unless_given_scores():
    logits = _random_logits(2)
    labels = logits[-1].argmax(-1).tolist()
    result = sweep(logits, labels, "accuracy")
    assert set(result["policies"]) == set(POLICIES) - {"lte", "none"}
    assert result["full_depth"] == 100.0
    budget = result["policies"]["budget"]
    assert [p["layer"] for p in budget] == [1, 2, 3]
    assert [p["avg_exit_layer"] for p in budget] == [1.0, 2.0, 3.0]
    patience = result["policies"]["patience"]
    assert [(p["patience"], p["threshold"]) for p in patience] == [
        (t, None) for t in SWEEP_PATIENCE["patience"]
    ]
    elbert = result["policies"]["elbert"]
    assert len(elbert) == len(SWEEP_GRIDS["elbert"]) * len(SWEEP_ELBERT_WINDOWS)
    assert {(p["window"], p["window_test"]) for p in elbert} == set(SWEEP_ELBERT_WINDOWS)

    scores = torch.rand(NUM_LAYERS, NUM_EXAMPLES, generator=torch.Generator().manual_seed(1))
    with_lte = sweep(logits, labels, "accuracy", signals={"lte_score": scores})
    assert len(with_lte["policies"]["lte"]) == len(SWEEP_GRIDS["lte"])
    name, point = choose_operating_point(with_lte, max_drop=100.0)
    assert point["avg_exit_layer"] == 1.0  # anything goes: the fastest point


def test_regression_sweeps_only_policies_that_support_it():
    logits = _random_logits(1)
    labels = logits[-1, :, 0].tolist()
    result = sweep(logits, labels, "pearson")
    assert set(result["policies"]) == {"patience", "budget"}
    patience = result["policies"]["patience"]
    assert len(patience) == len(SWEEP_PATIENCE["patience"]) * len(SWEEP_GRIDS["patience"])
    assert all(p["threshold"] is not None for p in patience)


def test_sweep_params_of_budget_follow_the_depth():
    assert sweep_params("budget", 2, 6) == [{"layer": k} for k in range(1, 6)]
    assert sweep_params("patience", 3, 6) == [
        {"threshold": None, "patience": t} for t in SWEEP_PATIENCE["patience"]
    ]


def test_every_swept_point_rebuilds_its_policy():
    logits = _random_logits(5)
    scores = torch.rand(NUM_LAYERS, NUM_EXAMPLES, generator=torch.Generator().manual_seed(1))
    result = sweep(logits, logits[-1].argmax(-1).tolist(), "accuracy", {"lte_score": scores})
    for name, points in result["policies"].items():
        for point in points:
            params = policy_params(point)
            assert make_policy(name, **params).params() == params
    assert policy_params({"name": "budget", "layer": 3}) == {"layer": 3}


def test_max_drop_is_measured_from_the_reference_full_depth_when_the_sweep_has_one():
    """An int8 sweep records the fp32 model's full depth: "within 0.5 points" counts the
    quantization loss too (hand-made sweep: full depth 94.2 at int8, 94.6 at fp32)."""

    def point(metric: float, avg_exit_layer: float) -> dict:
        return {"layer": 1, "metric": metric, "avg_exit_layer": avg_exit_layer}

    calibration = {
        "metric": "accuracy",
        "num_layers": 6,
        "full_depth": 94.2,
        "policies": {"budget": [point(93.8, 2.0), point(94.1, 3.0), point(94.2, 5.0)]},
    }
    assert choose_operating_point(calibration, max_drop=0.5)[1]["avg_exit_layer"] == 2.0
    calibration["reference_full_depth"] = 94.6
    assert choose_operating_point(calibration, max_drop=0.5)[1]["avg_exit_layer"] == 3.0
    assert choose_operating_point(calibration, max_drop=0.3) is None
