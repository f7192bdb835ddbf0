"""The row graph (:mod:`eeengine.executors.row_graph`): one row's whole early-exit loop as one
ONNX Runtime session, against the definition of each policy's outcome
(:func:`eeengine.policies.run_policy`) on the executor's own logits of every exit."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("onnxruntime")

from eeengine.batching import collate, encode  # noqa: E402
from eeengine.evaluation import exits_through  # noqa: E402
from eeengine.executors import TorchExecutor, make_executor  # noqa: E402
from eeengine.modeling_multiexit import MultiExitBert  # noqa: E402
from eeengine.policies import make_policy, run_policy  # noqa: E402
from eeengine.policies.base import entropy  # noqa: E402
from eeengine.runtime import ExitLoop  # noqa: E402
from eeengine.token_pruning import TokenPruning  # noqa: E402
from tests.conftest import SENTENCES, make_tiny_model, tiny_config  # noqa: E402

POLICIES = [
    ("none", {}),
    ("entropy", {"threshold": 0.5}),
    ("entropy", {"threshold": [0.45, 0.15, 0.6, 0.6]}),
    ("normalized_entropy", {"threshold": 0.7}),
    ("max_prob", {"threshold": 0.75}),
    ("patience", {"patience": 2}),
    ("pcee", {"threshold": 0.75, "patience": 2}),
    ("budget", {"layer": 2}),
    ("mpee", {"threshold": 0.5}),
    ("elbert", {"threshold": 0.5, "window": 2}),
    ("elbert", {"threshold": 0.3, "window": 3, "window_test": "stable"}),
    ("elbert", {"threshold": 0.3, "window": 2, "window_test": "range", "window_range": 0.1}),
]
# Regression heads (num_labels == 1): the policies that take them.
REGRESSION_POLICIES = [
    ("patience", {"threshold": 0.05, "patience": 2}),
    ("budget", {"layer": 3}),
    ("none", {}),
]


def rows(tokenizer, texts=SENTENCES):
    """Each text as its own batch of one: (input_ids, attention_mask, token_type_ids)."""
    encoded = encode(tokenizer, texts, None, 64)
    cpu = torch.device("cpu")
    return [collate(encoded, [i], tokenizer.pad_token_id, cpu) for i in range(len(texts))]


@pytest.fixture(scope="module", params=[(2, "fp32"), (3, "fp32"), (2, "int8"), (1, "fp32")])
def setup(request, tiny_bert_dir):
    num_labels, precision = request.param
    model = make_tiny_model(tiny_bert_dir, num_labels=num_labels)
    return model, make_executor("onnxruntime", model, precision)


def policy_cases(num_labels):
    """The policies for ``num_labels`` classes, entropy thresholds (nats) scaled by log C /
    log 2 and max_prob's towards 1 / C so that rows exit at several layers."""
    if num_labels == 1:
        return REGRESSION_POLICIES
    scale = math.log(num_labels) / math.log(2)
    cases = []
    for name, params in POLICIES:
        params = dict(params)
        if name in ("entropy", "mpee"):  # nats
            t = params["threshold"]
            params["threshold"] = [x * scale for x in t] if isinstance(t, list) else t * scale
        elif name == "max_prob":
            params["threshold"] = params["threshold"] / scale
        cases.append((name, params))
    return cases


@pytest.mark.parametrize("case", range(len(POLICIES)))
def test_row_graph_exits_as_the_policy_on_the_executors_logits(setup, tokenizer, case):
    model, executor = setup
    cases = policy_cases(model.num_labels)
    if case >= len(cases):
        pytest.skip("fewer regression policies")
    name, params = cases[case]
    policy = make_policy(name, **params)
    row = executor.row_loop(policy)
    assert row is not None
    exits = []
    for batch in rows(tokenizer):
        logits, exit_layer = row(*batch)
        all_logits, _ = exits_through(executor, model, batch)
        expected_layer, expected_logits = run_policy(policy, all_logits)
        assert exit_layer.tolist() == expected_layer.tolist()
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        exits.append(int(exit_layer))
    if name in ("entropy", "max_prob"):  # the heads spread the rows over layers
        assert len(set(exits)) > 1, exits


def test_the_loop_runs_a_single_row_through_the_row_graph(setup, tokenizer, monkeypatch):
    model, executor = setup
    name, params = policy_cases(model.num_labels)[1]
    policy = make_policy(name, **params)
    loop = ExitLoop(model, policy, "cpp", None, executor)
    calls = []
    runner = executor.row_loop(policy)
    monkeypatch.setattr(executor, "row_loop", lambda p: calls.append(p) or runner)
    for batch in rows(tokenizer)[:4]:
        out = loop.run(*batch)
        expected = ExitLoop(model, policy, "reference", None, executor).run(*batch)
        assert out.exit_layer.tolist() == expected.exit_layer.tolist()
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
        assert out.tokens_kept.tolist() == expected.tokens_kept.tolist()
    # The first row runs layer by layer (a one-off prediction does not build the graph), the
    # next ones in the row graph.
    assert calls == [policy] * 3
    # A batch of two runs layer by layer; so does the reference backend (above: no call).
    batch = collate(encode(tokenizer, SENTENCES[:2], None, 64), [0, 1], 0, torch.device("cpu"))
    loop.run(*batch)
    assert len(calls) == 3
    # and the loop says so, building nothing
    assert loop.row_loop_unavailable() is None
    reference = ExitLoop(model, policy, "reference", None, executor)
    reason = reference.row_loop_unavailable()
    assert reason == "the reference backend runs every batch layer by layer"
    pruning = TokenPruning(layers=(2,), keep_ratio=0.5, beta=(1.0,))
    pruned = ExitLoop(model, policy, "cpp", pruning, executor)
    assert pruned.row_loop(1) is None and pruned.row_loop(1) is None
    assert pruned.row_loop_unavailable() == "token pruning runs every batch layer by layer"
    assert len(calls) == 3


def test_run_tokens_equals_the_tensor_call(setup, tokenizer):
    """The token-list entry point runs the same graph: the same logits (float32 values) and
    exit layer as the tensor call on the collated row."""
    model, executor = setup
    name, params = policy_cases(model.num_labels)[1]
    row = executor.row_loop(make_policy(name, **params))
    encoded = encode(tokenizer, SENTENCES, None, 64)
    for i, batch in enumerate(rows(tokenizer)):
        logits, exit_layer = row.run_tokens(encoded.input_ids[i], encoded.token_type_ids[i])
        expected_logits, expected_layer = row(*batch)
        assert logits == expected_logits[0].tolist()
        assert exit_layer == int(expected_layer)


def test_engine_predicts_lone_inputs_through_the_row_graph(tiny_ckpt, monkeypatch):
    """``Engine.predict`` of one input: the first runs layer by layer and builds no graph (a
    one-off prediction), later ones run the row graph's token-list entry point; every answer
    equals the same input's in a batch of all (exit layer exactly, probabilities to 1e-5)."""
    from eeengine import Engine
    from eeengine.executors.row_loop import RowLoop

    settings = {"executor": "onnxruntime", "policy": "entropy", "threshold": 0.5}
    batched = Engine(tiny_ckpt, **settings).predict(SENTENCES)
    engine = Engine(tiny_ckpt, **settings)
    calls = []
    run_tokens = RowLoop.run_tokens
    monkeypatch.setattr(
        RowLoop, "run_tokens", lambda self, *a: calls.append(a) or run_tokens(self, *a)
    )
    alone = [engine.predict(SENTENCES[0])]
    assert engine._executor._row is None and calls == []
    alone += [engine.predict(text) for text in SENTENCES[1:]]
    assert len(calls) == len(SENTENCES) - 1
    assert len({p.exit_layer for p in batched}) > 1  # the rows exit at several layers
    for one, expected in zip(alone, batched, strict=True):
        assert (one.label, one.exit_layer, one.flops) == (
            expected.label,
            expected.exit_layer,
            expected.flops,
        )
        assert one.probs == pytest.approx(expected.probs, abs=1e-5)


def test_one_row_graph_per_policy(setup):
    _, executor = setup
    first = make_policy("budget", layer=2)
    runner = executor.row_loop(first)
    assert executor.row_loop(make_policy("budget", layer=2)) is runner  # same parameters
    assert executor.row_loop(make_policy("budget", layer=3)) is not runner
    changed = make_policy("entropy", threshold=0.3)
    runner = executor.row_loop(changed)
    changed.threshold = 0.2  # changed in place: its graph is stale
    rebuilt = executor.row_loop(changed)
    assert rebuilt is not runner
    assert executor.row_loop(changed) is rebuilt
    # the same parameters under another policy are another policy
    assert executor.row_loop(make_policy("normalized_entropy", threshold=0.2)) is not rebuilt


def test_no_row_graph_where_it_cannot_run(tiny_bert_dir):
    """No runner, and the reason says why (``GET /info`` reports it), where the row graph
    cannot run; a runner and no reason where it can."""
    model = make_tiny_model(tiny_bert_dir)
    policy = make_policy("entropy", threshold=0.5)
    torch_executor = TorchExecutor(model)
    assert torch_executor.row_loop(policy) is None
    assert "torch executor" in torch_executor.row_loop_unavailable(policy)
    pruning = TokenPruning(layers=(2,), keep_ratio=0.5, beta=(1.0,))
    pruned = make_executor("onnxruntime", model, token_pruning=pruning)
    assert pruned.row_loop(policy) is None
    assert "token-pruning" in pruned.row_loop_unavailable(policy)
    executor = make_executor("onnxruntime", model)
    lte = make_policy("lte", threshold=0.5)
    assert executor.row_loop(lte) is None
    assert "lte_score" in executor.row_loop_unavailable(lte)
    assert executor.row_loop_unavailable(policy) is None
    assert executor.row_loop(policy) is not None


@pytest.mark.parametrize("layout", ["per_layer", "shared"])
def test_row_graph_with_cls_pooler_heads(tokenizer, layout):
    torch.manual_seed(0)
    model = MultiExitBert(tiny_config(), 2, pooling="cls", layout=layout).eval()
    executor = make_executor("onnxruntime", model)
    batches = rows(tokenizer)
    all_logits = [exits_through(executor, model, batch)[0].detach() for batch in batches]
    # Between the two middle entropies at layer 1: half the rows exit there, and no row sits
    # within rounding of the threshold.
    first = torch.cat([entropy(logits[0]) for logits in all_logits]).sort().values
    middle = len(first) // 2
    threshold = float(first[middle - 1] + first[middle]) / 2
    policy = make_policy("entropy", threshold=threshold)
    row = executor.row_loop(policy)
    exits = []
    for batch, logits_of_every_exit in zip(batches, all_logits, strict=True):
        logits, exit_layer = row(*batch)
        expected_layer, expected_logits = run_policy(policy, logits_of_every_exit)
        assert exit_layer.tolist() == expected_layer.tolist()
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        exits.append(int(exit_layer))
    assert len(set(exits)) > 1, exits


@pytest.mark.parametrize(("name", "params"), POLICIES)
def test_row_graph_builds_without_onnxruntime_warnings(tiny_bert_dir, capfd, name, params):
    executor = make_executor("onnxruntime", make_tiny_model(tiny_bert_dir))
    capfd.readouterr()
    assert executor.row_loop(make_policy(name, **params)) is not None
    assert "[W:onnxruntime" not in capfd.readouterr().err
