"""The paired-bootstrap spread of each swept point's drop (``drop_std``), the weighted metrics
it is computed with, and choosing operating points at a confidence."""

import json
import re
import shutil
import warnings
from statistics import NormalDist

import pytest
import torch

from eeengine import Engine
from eeengine.calibration import select_operating_point
from eeengine.cli import main
from eeengine.evaluation import policy_params, predictions_of, sweep
from eeengine.metrics import METRICS, agreement, bootstrap_weights
from eeengine.policies import make_policy
from eeengine.selection import choose_operating_point


def _indices(num_examples: int, samples: int, seed: int = 0) -> torch.Tensor:
    """The resamples bootstrap_weights counts, drawn again: (samples, num_examples) indices."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_examples, (samples, num_examples), generator=generator)


def test_bootstrap_weights_count_draws_with_replacement():
    weights = bootstrap_weights(50, samples=30, seed=3)
    assert weights.shape == (30, 50) and weights.dtype == torch.float64
    assert torch.equal(weights.sum(1), torch.full((30,), 50.0, dtype=torch.float64))
    first = torch.bincount(_indices(50, 30, seed=3)[0], minlength=50).double()
    assert torch.equal(weights[0], first)
    assert torch.equal(weights, bootstrap_weights(50, samples=30, seed=3))  # seeded


@pytest.mark.parametrize("name", ["accuracy", "f1", "matthews", "pearson"])
def test_weighted_metrics_equal_the_metric_of_each_resample(name):
    generator = torch.Generator().manual_seed(1)
    if name == "pearson":
        predictions = torch.randn(60, generator=generator).tolist()
        labels = (torch.tensor(predictions) + torch.randn(60, generator=generator)).tolist()
    else:
        predictions = torch.randint(2, (60,), generator=generator).tolist()
        labels = torch.randint(2, (60,), generator=generator).tolist()
    metric = METRICS[name]
    weighted = metric(predictions, labels, bootstrap_weights(60, samples=25))
    for b, rows in enumerate(_indices(60, 25).tolist()):
        expected = metric([predictions[i] for i in rows], [labels[i] for i in rows])
        assert weighted[b].item() == pytest.approx(expected, abs=1e-9)


def test_weighted_matthews_is_zero_where_a_resample_has_one_class():
    weights = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    values = METRICS["matthews"]([1, 0, 1], [1, 0, 0], weights)
    assert values[0].item() == 0.0  # only row 0 drawn: one class, MCC undefined -> 0
    assert values[1].item() == pytest.approx(METRICS["matthews"]([1, 0, 1], [1, 0, 0]))


def test_weighted_regression_agreement_keeps_the_whole_sample_tolerance():
    reference = [0.0, 1.0, 2.0, 4.0]  # spread 4: tolerance 0.2
    predictions = [0.1, 1.5, 2.0, 3.9]  # agree, disagree, agree, agree
    weights = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    assert agreement(predictions, reference, weights).tolist() == [50.0, 100.0]
    assert agreement(predictions, reference) == 75.0


def test_every_swept_point_has_the_paired_bootstrap_spread_of_its_drop():
    generator = torch.Generator().manual_seed(0)
    all_logits = 3 * torch.randn(4, 120, 2, generator=generator)
    labels = torch.randint(2, (120,), generator=generator).tolist()
    result = sweep(all_logits, labels, "accuracy", {})
    full = predictions_of(all_logits[-1])
    resamples = _indices(120, 200).tolist()
    point = result["policies"]["budget"][0]  # exits every row at layer 1
    layer1 = predictions_of(all_logits[0])
    drops = torch.tensor(
        [
            METRICS["accuracy"]([full[i] for i in rows], [labels[i] for i in rows])
            - METRICS["accuracy"]([layer1[i] for i in rows], [labels[i] for i in rows])
            for rows in resamples
        ],
        dtype=torch.float64,
    )
    assert point["drop_std"] == pytest.approx(drops.std().item(), rel=1e-9)
    assert all(p["drop_std"] >= 0 for points in result["policies"].values() for p in points)
    last = result["policies"]["budget"][-1]  # layer L-1: some rows agree with full depth
    assert last["drop_std"] < point["drop_std"]


def _calibration(points: list[dict], num_examples: int = 1000) -> dict:
    return {
        "metric": "accuracy",
        "num_layers": 6,
        "num_examples": num_examples,
        "full_depth": 90.0,
        "policies": {"p": points},
    }


def _point(threshold: float, metric: float, avg: float, drop_std: float | None) -> dict:
    return {
        "threshold": threshold,
        "metric": metric,
        "avg_exit_layer": avg,
        "speedup": 6 / avg,
        "layer_saving": 1 - avg / 6,
        "drop_std": drop_std,
    }


def test_confidence_asks_the_drop_plus_z_spreads_to_stay_within_max_drop():
    z = NormalDist().inv_cdf(1 - 0.1 / 2)  # confidence 0.9 over K = 2 points: 1.645
    fast = _point(0.5, 89.6, 2.0, 0.4)  # drop 0.4; 0.4 + 1.645 * 0.4 = 1.06
    slow = _point(0.2, 89.8, 3.0, 0.2)  # drop 0.2; 0.2 + 1.645 * 0.2 = 0.53
    calibration = _calibration([fast, slow])
    assert choose_operating_point(calibration, 0.5)[1] is fast
    assert choose_operating_point(calibration, 0.54, confidence=0.9)[1] is slow
    assert 0.4 + z * 0.4 < 1.06 < 0.4 + NormalDist().inv_cdf(1 - 0.1 / 3) * 0.4
    assert choose_operating_point(calibration, 1.06, confidence=0.9)[1] is fast
    assert choose_operating_point(calibration, 0.52, confidence=0.9) is None
    # one more point searched: a larger z (the union bound), so 1.06 no longer admits `fast`
    third = _point(0.1, 89.0, 5.0, 0.1)
    assert (
        choose_operating_point(_calibration([fast, slow, third]), 1.06, confidence=0.9)[1] is slow
    )
    # a spread of 0 (no disagreement on the examples) counts as one example: 100 / n points
    exact = _calibration([_point(0.5, 90.0, 1.0, 0.0)], num_examples=400)  # 0.25 points
    assert choose_operating_point(exact, 0.25 * 1.28, confidence=0.9) is None
    assert choose_operating_point(exact, 0.25 * 1.29, confidence=0.9) is not None
    # an unknown spread (NaN on some resample) cannot be bounded, but counts without confidence
    unknown = _calibration([_point(0.5, 89.9, 1.0, None)])
    assert choose_operating_point(unknown, 0.5, confidence=0.9) is None
    assert choose_operating_point(unknown, 0.5) is not None


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 1.5, True, "0.9"])
def test_confidence_outside_zero_one_is_refused(confidence):
    calibration = _calibration([_point(0.5, 89.6, 2.0, 0.4)])
    with pytest.raises(ValueError, match="confidence must be"):
        choose_operating_point(calibration, 0.5, confidence=confidence)


def test_confidence_needs_max_drop_and_a_sweep_with_drop_std():
    calibration = _calibration([_point(0.5, 89.6, 2.0, 0.4)])
    with pytest.raises(ValueError, match="confidence applies to max_drop"):
        select_operating_point(calibration, target_speedup=2.0, confidence=0.9)
    old = _calibration([{k: v for k, v in _point(0.5, 89.6, 2.0, 0.4).items() if k != "drop_std"}])
    with pytest.raises(ValueError, match="has no drop_std"):
        select_operating_point(old, max_drop=0.5, confidence=0.9)
    with pytest.raises(
        ValueError, match="at confidence 0.9; the most accurate loses 0.40"
    ):  # 0.4 + 1.28 * 0.4
        select_operating_point(calibration, max_drop=0.5, confidence=0.9)


def test_a_refused_point_that_beats_full_depth_is_called_a_gain():
    """On 100 rows (1 point a row) a point 0.5 above full depth is not certified at 0.9
    (-0.5 + 1.28 * max(0, 100 / 100) > 0.5); the message says it scores above full depth,
    not that it "loses -0.50"."""
    calibration = _calibration([_point(0.5, 90.5, 2.0, 0.0)], num_examples=100)
    with pytest.raises(ValueError, match="the most accurate scores 0.50 above full depth"):
        select_operating_point(calibration, max_drop=0.5, confidence=0.9)


def test_engine_and_cli_calibrate_at_a_confidence(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    args = ["calibrate", "--ckpt", str(ckpt), "--task", "sst2", "--split", "dev"]
    assert main([*args, "--max-drop", "2", "--confidence", "0.9", "--write"]) == 0
    out = capsys.readouterr().out
    assert "layer speed-up" in out
    assert re.search(r"drop -?\d+\.\d\d ± \d+\.\d\d \(bootstrap sd\)", out), out
    calibration = json.loads((ckpt / "calibration.json").read_text())
    reference = calibration["full_depth"]
    points = sum(len(p) for p in calibration["policies"].values())
    z = NormalDist().inv_cdf(1 - 0.1 / points)
    least = 100 / calibration["num_examples"]
    engine = Engine(ckpt, max_drop=2.0, confidence=0.9)
    point = engine.operating_point
    assert point.drop_std == _stored_spread(calibration, point)
    assert reference - point.metric + z * max(point.drop_std, least) <= 2.0 + 1e-9
    plain = Engine(ckpt, max_drop=2.0).operating_point
    assert plain.avg_exit_layer <= point.avg_exit_layer  # the margin never makes it faster
    assert main([*args, "--target-speedup", "1.5", "--confidence", "0.9"]) == 2
    assert "confidence applies to max_drop" in capsys.readouterr().err


def _stored_spread(calibration: dict, point) -> float:
    for candidate in calibration["policies"][point.name]:
        if all(candidate.get(k) == v for k, v in point.params.items()):
            return candidate["drop_std"]
    raise AssertionError("the chosen point is not in the calibration")


def test_a_policy_with_no_certified_point_runs_its_safest_swept_point_and_warns(
    trained_csv_ckpt, tmp_path
):
    """A checkpoint trained at 90 % confidence whose 10 calibration rows certify no point of
    the asked policy: the engine runs that policy's point with the most layers on average in
    the sweep (not its uncalibrated built-in parameters, which ``normalized_entropy`` does not
    even have) and says so; with its parameters given, or where a point qualifies, silently."""
    path = shutil.copytree(trained_csv_ckpt, tmp_path / "ckpt")
    manifest = json.loads((path / "eeengine.json").read_text())
    manifest["training"]["config"]["max_drop_confidence"] = 0.9
    (path / "eeengine.json").write_text(json.dumps(manifest))
    calibration = json.loads((path / "calibration.json").read_text())
    uncertified = [
        p
        for p in calibration["policies"]
        if p != manifest["policy"]["name"]
        and choose_operating_point(calibration, 0.5, policy=p, confidence=0.9) is None
        and choose_operating_point(calibration, 0.5, policy=p) is not None
    ]
    assert "normalized_entropy" in uncertified
    for name in uncertified:
        points = calibration["policies"][name]
        most_layers = max(point["avg_exit_layer"] for point in points)
        safest = max(
            (point for point in points if point["avg_exit_layer"] == most_layers),
            key=lambda point: point["metric"],
        )
        expected = make_policy(name, **policy_params(safest))
        with pytest.warns(UserWarning, match=rf"no calibrated point of '{name}' .* 0.9 confid"):
            engine = Engine(path, policy=name)
        assert repr(engine.policy) == repr(expected), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(path, policy="normalized_entropy", threshold=0.3)
        Engine(trained_csv_ckpt, policy=uncertified[0])  # chosen as measured: a point qualifies
