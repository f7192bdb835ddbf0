"""Every recipe's loss against its formula, written out by hand on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from eeengine.training.recipes import RECIPES, make_recipe
from eeengine.training.recipes.lte import lte_targets
from eeengine.training.recipes.weighted import weighted_loss

L, B, C = 3, 5, 4


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(L, B, C), torch.randint(0, C, (B,))


def _ce(logits, labels):
    return [F.cross_entropy(logits[i], labels).item() for i in range(logits.shape[0])]


def _loss(name, all_logits, labels, step=0, stage=0, signals=None, **kwargs):
    recipe = make_recipe(name, L, all_logits.shape[-1], "per_layer", **kwargs)
    return recipe, recipe.loss(step, stage, all_logits, labels, signals or {})


def test_joint_is_the_sum(batch):
    _, loss = _loss("joint", *batch)
    assert loss.item() == pytest.approx(sum(_ce(*batch)), rel=1e-6)


def test_weighted_loss_matches_formula(batch):
    ce = _ce(*batch)
    expected = (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6
    assert weighted_loss(*batch).item() == pytest.approx(expected, rel=1e-6)
    assert _loss("weighted", *batch)[1].item() == pytest.approx(expected, rel=1e-6)


def test_weighted_loss_regression_uses_mse():
    all_logits = torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]]])  # (L=2, B=2, 1)
    targets = torch.tensor([1.0, 1.0])
    # exit 1: ((0)^2 + (1)^2) / 2 = 0.5; exit 2: (4 + 1) / 2 = 2.5; (1*0.5 + 2*2.5) / 3
    assert weighted_loss(all_logits, targets).item() == pytest.approx(5.5 / 3)


def test_elbert_weights_start_at_sigmoid_4_and_sum_to_L(batch):
    recipe, loss = _loss("elbert", *batch)
    s = 1 / (1 + math.exp(-4))
    ce = _ce(*batch)
    assert recipe.weights().tolist() == pytest.approx([s, s, L - 2 * s])
    assert loss.item() == pytest.approx(s * ce[0] + s * ce[1] + (L - 2 * s) * ce[2], rel=1e-6)
    assert recipe.lr == 1e-2
    assert recipe.learned()["loss_weights"] == pytest.approx([s, s, L - 2 * s], abs=1e-6)


def test_elbert_gradient_moves_weight_from_worse_exits(batch):
    recipe, loss = _loss("elbert", *batch)
    loss.backward()
    ce = _ce(*batch)
    s = 1 / (1 + math.exp(-4))
    expected = [s * (1 - s) * (ce[i] - ce[-1]) for i in range(L - 1)]
    assert recipe.loss_weight_logits.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_two_stage(batch):
    recipe, stage1 = _loss("two_stage", *batch, stage=0)
    ce = _ce(*batch)
    assert stage1.item() == pytest.approx(ce[-1], rel=1e-6)
    assert recipe.loss(7, 1, *batch, {}).item() == pytest.approx(ce[0] + ce[1], rel=1e-6)
    assert [recipe.stage(step, 10) for step in range(10)] == [0] * 5 + [1] * 5
    for name, stage1_trains in [
        ("bert.encoder.layer.0.attention.self.query.weight", True),
        ("exit_heads.0.classifier.weight", False),
        ("exit_heads.1.pooler.dense.bias", False),
        ("exit_heads.2.classifier.weight", True),  # the final classifier
        ("exit_pooler.dense.weight", True),
    ]:
        assert recipe.trains(name, 0) is stage1_trains, name
        assert recipe.trains(name, 1) is not stage1_trains, name


def test_two_stage_needs_separate_heads():
    with pytest.raises(ValueError, match="separate exit heads"):
        make_recipe("two_stage", L, 2, "shared")


def test_alternating(batch):
    recipe, even = _loss("alternating", *batch, step=0)
    ce = _ce(*batch)
    assert even.item() == pytest.approx(ce[-1], rel=1e-6)
    assert recipe.loss(1, 0, *batch, {}).item() == pytest.approx(sum(ce), rel=1e-6)
    assert recipe.loss(4, 0, *batch, {}).item() == pytest.approx(ce[-1], rel=1e-6)


def test_lte_targets():
    all_logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0]]])
    labels = torch.tensor([0, 1])
    assert lte_targets(all_logits, labels).tolist() == [[0.0, 0.0], [1.0, 0.0]]
    regression = torch.tensor([[[1.5], [-1.0]]])
    expected = [math.tanh(0.5), math.tanh(2.0)]
    assert lte_targets(regression, torch.tensor([1.0, 1.0]))[0].tolist() == pytest.approx(expected)


def test_lte_adds_mse_to_the_base(batch):
    scores = torch.rand(L, B)
    recipe, loss = _loss(
        "lte", *batch, step=1, signals={"lte_score": scores}, lte_base="alternating"
    )
    wrong = (batch[0].argmax(-1) != batch[1]).float()
    expected = sum(_ce(*batch)) + ((scores - wrong) ** 2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert recipe.needs_lte and recipe.hyperparameters() == {"base": "alternating"}
    two_stage = make_recipe("lte", L, C, "per_layer", lte_base="two_stage")
    assert two_stage.trains("lte.dense.weight", 1) and not two_stage.trains("bert.x", 1)


def test_mpee_matches_formula(batch):
    all_logits, labels = batch
    recipe, loss = _loss("mpee", all_logits, labels)
    gamma, T = 0.1, 3.0
    with torch.no_grad():
        scores = torch.stack(
            [recipe.context(torch.tanh(recipe.attention(all_logits[i]))) for i in range(L)]
        )
        eta = torch.softmax(scores, dim=0)
        teacher = sum(eta[i] * all_logits[i] for i in range(L))
        p_t = torch.softmax(teacher / T, -1)
        kl = 0.0
        for i in range(L):
            p = torch.softmax(all_logits[i] / T, -1)
            kl += (p * (p.log() - p_t.log())).sum(-1).mean().item()
    expected = (
        (1 - gamma) * sum(_ce(all_logits, labels))
        + gamma * T**2 * kl
        + gamma * F.cross_entropy(teacher, labels).item()
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert recipe.attention.weight.grad is not None  # learns from γ·CE(teacher)


def test_mpee_is_classification_only():
    with pytest.raises(ValueError, match="classification only"):
        make_recipe("mpee", L, 1, "per_layer")


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'magic'"):
        make_recipe("magic", L, 2, "per_layer")
    with pytest.raises(ValueError, match="unknown base recipe 'lte'"):
        make_recipe("lte", L, 2, "per_layer", lte_base="lte")
    assert set(RECIPES) == {
        "joint",
        "weighted",
        "elbert",
        "two_stage",
        "alternating",
        "lte",
        "mpee",
    }


def _smoothed_ce(logits, labels, eps):
    """Szegedy et al. 2016, Sec. 7: target q' = (1 − ε)·onehot + ε/C, loss −Σ q' log p."""
    log_p = torch.log_softmax(logits, -1)
    target = (1 - eps) * F.one_hot(labels, logits.shape[-1]).float() + eps / logits.shape[-1]
    return [-(target * log_p[i]).sum(-1).mean().item() for i in range(logits.shape[0])]


@pytest.mark.parametrize("name", ["joint", "weighted", "alternating", "lte"])
def test_label_smoothing_reaches_every_exit_loss(batch, name):
    all_logits, labels = batch
    ce = _smoothed_ce(all_logits, labels, 0.1)
    expected = {
        "joint": sum(ce),
        "weighted": (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6,
        "alternating": ce[-1],  # step 0: the last exit alone
    }
    recipe, loss = _loss(name, all_logits, labels, signals=_lte_signals(), label_smoothing=0.1)
    if name == "lte":  # its base, alternating, smooths; the LTE term is unchanged
        base = recipe.base.loss(0, 0, all_logits, labels, {})
        assert recipe.base.label_smoothing == 0.1
        assert base.item() == pytest.approx(ce[-1], rel=1e-6)
        return
    assert loss.item() == pytest.approx(expected[name], rel=1e-6)
    assert loss.item() != pytest.approx(_loss(name, all_logits, labels)[1].item(), rel=1e-3)


def _lte_signals():
    return {"lte_score": torch.full((L, B), 0.5)}


def test_label_smoothing_refused_outside_0_1_and_on_regression():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        make_recipe("weighted", L, 2, "per_layer", label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing applies to classification"):
        make_recipe("weighted", L, 1, "per_layer", label_smoothing=0.1)
