"""The batched early-exit loop against the policy applied to full-depth logits, and against
running each row alone."""

import pytest
import torch

from eeengine.batching import collate, encode
from eeengine.executors import TorchExecutor
from eeengine.policies import make_policy, run_policy
from eeengine.runtime import early_exit_forward, layer_segments
from eeengine.token_pruning import TokenPruning
from tests.conftest import SENTENCES, make_tiny_model

POLICIES = [
    ("entropy", {"threshold": 0.5}),
    ("entropy", {"threshold": [0.45, 0.15, 0.6, 0.6]}),
    ("normalized_entropy", {"threshold": 0.7}),
    ("pcee", {"threshold": 0.75, "patience": 2}),
    ("none", {}),
    ("budget", {"layer": 2}),
]


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return make_tiny_model(tiny_bert_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return collate(encode(tokenizer, SENTENCES, None, 64), range(len(SENTENCES)), 0)


@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_loop_matches_policy_on_full_depth_logits(model, batch, name, params):
    policy = make_policy(name, **params)
    with torch.inference_mode():
        all_logits = model(*batch)
    expected_layer, expected_logits = run_policy(policy, all_logits)
    out = early_exit_forward(model, policy, *batch)
    assert out.exit_layer.tolist() == expected_layer.tolist()
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=1e-5)


def test_exits_are_spread_over_layers(model, batch):
    """The fixture model is useful only if rows exit at different layers."""
    policy = make_policy("entropy", threshold=[0.45, 0.15, 0.6, 0.6])
    out = early_exit_forward(model, policy, *batch)
    assert len(set(out.exit_layer.tolist())) >= 3


@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_batch_equals_one_by_one(model, tokenizer, name, params):
    policy = make_policy(name, **params)
    encoded = encode(tokenizer, SENTENCES, None, 64)
    together = early_exit_forward(model, policy, *collate(encoded, range(len(SENTENCES)), 0))
    for i in range(len(SENTENCES)):
        alone = early_exit_forward(model, policy, *collate(encoded, [i], 0))
        assert alone.exit_layer.item() == together.exit_layer[i].item()
        torch.testing.assert_close(alone.logits[0], together.logits[i], atol=1e-5, rtol=1e-5)


def test_all_rows_exit_at_layer_one(model, batch):
    out = early_exit_forward(model, make_policy("normalized_entropy", threshold=1.0), *batch)
    assert out.exit_layer.tolist() == [1] * len(SENTENCES)


@pytest.mark.parametrize(
    ("name", "params", "decides", "heads_run"),
    [("none", {}, [4], [4]), ("budget", {"layer": 3}, [3, 4], [3]),
     ("budget", {"layer": 9}, [4], [4]),
     ("entropy", {"threshold": 0.0}, [1, 2, 3, 4], [1, 2, 3, 4])],
)  # fmt: skip
def test_exit_heads_run_only_where_the_policy_decides(
    model, batch, name, params, decides, heads_run
):
    """Policies whose decision needs no logits before some layer (``none``: the last;
    ``budget``: its layer, capped at the depth) skip the exit head there; the outputs are
    checked against the full-depth oracle above."""
    policy = make_policy(name, **params)
    assert [layer for layer in range(1, 5) if policy.decides_at(layer, 4)] == decides
    calls = []
    original = model.exit_head
    model.exit_head = lambda index: calls.append(index + 1) or original(index)
    try:
        early_exit_forward(model, policy, *batch)
    finally:
        del model.exit_head
    assert sorted(set(calls)) == heads_run


@pytest.mark.parametrize(
    ("name", "params", "pruning", "segments"),
    [("none", {}, None, [(1, 4)]),
     ("budget", {"layer": 3}, None, [(1, 3), (4, 4)]),
     ("entropy", {"threshold": 0.5}, None, [(1, 1), (2, 2), (3, 3), (4, 4)]),
     ("none", {}, [2], [(1, 1), (2, 2), (3, 4)]),
     ("budget", {"layer": 4}, [3], [(1, 2), (3, 3), (4, 4)])],
)  # fmt: skip
def test_layer_segments(name, params, pruning, segments):
    """Runs of layers between two decisions (hand-listed): a pruning layer is its own run."""
    schedule = None if pruning is None else TokenPruning(tuple(pruning), 0.7, (1.0,))
    assert layer_segments(4, make_policy(name, **params), schedule) == segments


@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_executor_runs_each_segment_in_one_call(model, batch, name, params):
    """The loop hands the executor whole runs of layers (full depth: one call for all four),
    and gives the same exits and logits as the policy on the full-depth logits."""
    policy = make_policy(name, **params)
    executor = TorchExecutor(model)
    calls = []
    original = executor.layers
    executor.layers = lambda start, stop, *rest: (
        calls.append((start + 1, stop)) or original(start, stop, *rest)
    )
    out = early_exit_forward(model, policy, *batch, executor=executor)
    expected = layer_segments(4, policy, None)
    assert calls and calls == expected[: len(calls)]  # a prefix: the loop stops when all exit
    with torch.inference_mode():
        expected_layer, expected_logits = run_policy(policy, model(*batch))
    assert out.exit_layer.tolist() == expected_layer.tolist()
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-5, rtol=1e-5)
    lengths = batch[1].sum(1, keepdim=True)
    ran = torch.arange(1, 5) <= out.exit_layer[:, None]
    assert torch.equal(out.tokens_kept, lengths * ran)
