"""The three exit-head layouts: which parameters exist, and that they are shared."""

import pytest
import torch

from eeengine.heads import make_exit_heads
from eeengine.modeling_multiexit import MultiExitBert
from tests.conftest import tiny_config


def _keys(layout: str, pooling: str) -> set[str]:
    model = MultiExitBert(tiny_config(), 2, pooling=pooling, layout=layout)
    return {k for k in model.state_dict() if not k.startswith("bert.")}


def test_per_layer_cls_has_a_pooler_and_classifier_per_layer():
    keys = _keys("per_layer", "cls")
    assert {f"exit_heads.{i}.pooler.dense.weight" for i in range(4)} <= keys
    assert {f"exit_heads.{i}.classifier.weight" for i in range(4)} <= keys
    assert len(keys) == 16


def test_shared_pooler_stores_the_pooler_once():
    keys = _keys("shared_pooler", "cls")
    assert keys == {"exit_pooler.dense.weight", "exit_pooler.dense.bias"} | {
        f"exit_heads.{i}.classifier.{p}" for i in range(4) for p in ("weight", "bias")
    }


def test_shared_has_one_head():
    assert _keys("shared", "cls") == {
        f"exit_heads.0.{m}.{p}" for m in ("pooler.dense", "classifier") for p in ("weight", "bias")
    }
    assert _keys("shared", "mean") == {
        "exit_heads.0.classifier.weight",
        "exit_heads.0.classifier.bias",
    }


@pytest.mark.parametrize("layout", ["shared_pooler", "shared"])
def test_shared_parts_are_the_same_module(layout):
    model = MultiExitBert(tiny_config(), 2, pooling="cls", layout=layout)
    hidden = torch.randn(3, 5, 32)
    mask = torch.ones(3, 5)
    pooled = [model.exit_head(i).pool(hidden, mask) for i in range(4)]
    for p in pooled[1:]:
        torch.testing.assert_close(p, pooled[0], rtol=0, atol=0)
    with torch.no_grad():
        (model.exit_pooler or model.exit_heads[0].pooler).dense.bias.add_(1.0)
    assert not torch.equal(model.exit_head(3).pool(hidden, mask), pooled[0])


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout 'stacked'"):
        make_exit_heads("stacked", 8, 2, 4, "mean", 0.1)


def test_lte_score_reaches_the_policy_in_the_loop():
    from eeengine.policies import make_policy, run_policy
    from eeengine.runtime import early_exit_forward

    torch.manual_seed(0)
    model = MultiExitBert(tiny_config(), 2, pooling="cls", lte=True).eval()
    with torch.no_grad():
        model.lte.dense.weight.mul_(20.0)  # spread the scores so rows exit at different layers
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (16, 9), generator=g)
    mask = torch.ones_like(input_ids)
    mask[3, 4:] = 0
    inputs = (input_ids, mask, torch.zeros_like(input_ids))
    with torch.no_grad():
        all_logits, signals = model.exits(*inputs)
    assert signals["lte_score"].shape == (4, 16) and model.signals == ("lte_score",)
    policy = make_policy("lte", threshold=0.5)
    policy.validate(2, 4, signals=model.signals)
    expected_layer, expected_logits = run_policy(policy, all_logits, signals)
    assert 1 < len(set(expected_layer.tolist())), "the test needs rows exiting at several layers"
    out = early_exit_forward(model, policy, *inputs)
    torch.testing.assert_close(out.exit_layer, expected_layer, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, expected_logits)
