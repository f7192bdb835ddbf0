"""Training on a tiny random model: the weighted loss, and a checkpoint the engine loads."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from eeengine import Engine
from eeengine.cli import build_parser
from eeengine.training import TrainConfig, train
from eeengine.training.recipes import get_recipe
from eeengine.training.recipes.weighted import weighted_loss
from tests.conftest import SENTENCES


def test_weighted_loss_matches_formula():
    torch.manual_seed(0)
    all_logits = torch.randn(3, 5, 4)
    labels = torch.randint(0, 4, (5,))
    per_exit = [F.cross_entropy(all_logits[i], labels).item() for i in range(3)]
    expected = (1 * per_exit[0] + 2 * per_exit[1] + 3 * per_exit[2]) / 6
    assert weighted_loss(all_logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_loss_regression_uses_mse():
    all_logits = torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]]])  # (L=2, B=2, 1)
    targets = torch.tensor([1.0, 1.0])
    # exit 1: ((0)^2 + (1)^2) / 2 = 0.5; exit 2: (4 + 1) / 2 = 2.5; (1*0.5 + 2*2.5) / 3
    assert weighted_loss(all_logits, targets).item() == pytest.approx(5.5 / 3)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'magic'"):
        get_recipe("magic")


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "sst2-tiny"
    config = TrainConfig(base_model=str(tiny_bert_dir), max_train_examples=96, batch_size=16)
    return train(config, out, progress=False)


def test_train_writes_a_loadable_checkpoint(trained):
    manifest = json.loads((trained / "eeengine.json").read_text())
    assert manifest["training"]["recipe"] == "weighted"
    assert manifest["training"]["steps"] == 6
    assert len(manifest["training"]["dev_exit_metrics"]) == 4
    calibration = json.loads((trained / "calibration.json").read_text())
    assert set(calibration["policies"]) >= {"entropy", "normalized_entropy", "pcee"}
    engine = Engine(trained)
    prediction = engine.predict("a gorgeous, witty, seductive movie.")
    assert prediction.label in ("negative", "positive")


def test_default_policy_is_within_max_drop_of_full_depth(trained):
    manifest = json.loads((trained / "eeengine.json").read_text())
    calibration = json.loads((trained / "calibration.json").read_text())
    policy = manifest["policy"]
    if policy["name"] == "none":
        return
    points = [
        p
        for p in calibration["policies"][policy["name"]]
        if all(p.get(k) == v for k, v in policy.items() if k != "name")
    ]
    assert points, "the default policy must be one of the swept points"
    assert points[0]["metric"] >= calibration["full_depth"] - 0.5 - 1e-9
    assert math.isclose(points[0]["speedup"], 4 / points[0]["avg_exit_layer"])


def test_failed_training_leaves_existing_checkpoint(trained, tiny_bert_dir):
    before = (trained / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="unknown task"):
        train(TrainConfig(base_model=str(tiny_bert_dir), task="imdb"), trained, progress=False)
    assert (trained / "model.safetensors").read_bytes() == before


def test_train_with_token_pruning(tiny_bert_dir, tmp_path):
    """The schedule is trained with, evaluated with (per-exit dev metrics and calibration), and
    saved; the engine serves the checkpoint with it."""
    schedule = {"layers": [1, 3], "keep_ratio": 0.6, "beta": [1.0, 0.5]}
    config = TrainConfig(
        base_model=str(tiny_bert_dir), max_train_examples=32, batch_size=16,
        token_pruning=schedule,
    )  # fmt: skip
    path = train(config, tmp_path / "pruned", progress=False)
    manifest = json.loads((path / "eeengine.json").read_text())
    assert manifest["token_pruning"] == schedule
    assert manifest["training"]["config"]["token_pruning"] == schedule
    prediction = Engine(path, policy="none").predict(SENTENCES[5])
    assert prediction.tokens_kept is not None and prediction.tokens_kept[-1] < 20


def test_cli_reads_the_schedule_as_json():
    args = build_parser().parse_args(
        ["train", "--out", "x", "--token-pruning", '{"layers": [2, 4], "keep_ratio": 0.7, '
         '"beta": [1.0, 0.5]}']
    )  # fmt: skip
    assert args.token_pruning == {"layers": [2, 4], "keep_ratio": 0.7, "beta": [1.0, 0.5]}
