"""Every exit policy against a one-sample reference loop written from its paper.

The oracles (``tests/policy_oracles.py``) use Python floats and lists, one sample at a time,
one ``if`` per layer, and share nothing with ``eeengine.policies``. ``run_policy`` (batched,
fp32) must give the same exit layer (exactly) and the same output logits (``assert_close``) for
every row. The oracles compute in fp64, so a random example whose deciding comparison lies
within ``MARGIN`` of its threshold is discarded (``assume``); exact ties are checked by the
hand-written cases instead.

Each random example also goes through the runtime's loop (:func:`early_exit_forward`: exited
rows are dropped from the hidden states and every state tensor), fed by an executor whose exit
heads give back the drawn logits exactly (:class:`LogitsExecutor`); it must agree as well, on
the plain-torch backend and on the fused C++ op (tests/test_triton_exit_head_step.py runs the
examples through the Triton kernel).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eeengine._custom_ops import HAS_C
from eeengine.policies import POLICIES, make_policy, run_policy
from eeengine.policies.base import entropy as policy_entropy
from eeengine.policies.base import normalized_entropy as policy_normalized_entropy
from tests.policy_oracles import CASES, Comparisons, draw_case, run_runtime


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (100x slower on a loaded host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_policy_has_an_oracle():
    assert set(CASES) == set(POLICIES)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_batched_policy_matches_oracle(name, data):
    policy, all_logits, signals, expected_layer, expected_out = draw_case(data, name)
    exit_layer, out = run_policy(policy, all_logits, signals)
    assert exit_layer.tolist() == expected_layer
    torch.testing.assert_close(out, torch.tensor(expected_out))
    compact_layer, compact_out = run_runtime(policy, all_logits, signals)
    assert compact_layer.tolist() == expected_layer
    torch.testing.assert_close(compact_out, out, rtol=0, atol=0)
    if HAS_C:
        fused_layer, fused_out = run_runtime(policy, all_logits, signals, "cpp")
        assert fused_layer.tolist() == expected_layer
        torch.testing.assert_close(fused_out, out)


def next_float32_up(value: float) -> float:
    """The smallest float32 above ``value`` (thresholds are compared in fp32)."""
    return torch.nextafter(torch.tensor(value), torch.tensor(math.inf)).item()


def exit_layer_of(name: str, layers: list[list[float]], scores=None, **params) -> int:
    """Exit layer of one sample, from the policy, from the oracle and from the runtime on the
    fused C++ op (which must agree)."""
    num_labels = len(layers[0])
    signals = {} if scores is None else {"lte_score": torch.tensor(scores)[:, None]}
    policy = make_policy(name, **params)
    policy.validate(num_labels, len(layers), signals=signals.keys())
    exit_layer, _ = run_policy(policy, torch.tensor(layers)[:, None, :], signals)
    oracle_layer, _ = CASES[name][0](layers, params, Comparisons(), scores)
    assert exit_layer.item() == oracle_layer
    if HAS_C:
        fused_layer, _ = run_runtime(policy, torch.tensor(layers)[:, None, :], signals, "cpp")
        assert fused_layer.item() == oracle_layer
    return oracle_layer


CONFIDENT, UNSURE = [8.0, -8.0], [0.0, 0.0]


UNSURE5 = [0.0] * 5


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("entropy", {"threshold": 0.1}),
        ("normalized_entropy", {"threshold": 0.1}),
        ("max_prob", {"threshold": 0.9}),
        ("pcee", {"threshold": 0.1, "patience": 1}),
        ("elbert", {"threshold": 0.1}),
        ("mpee", {"threshold": 0.1}),
    ],
)
def test_confident_first_layer_exits_there_and_unsure_rows_run_to_full_depth(name, params):
    assert exit_layer_of(name, [CONFIDENT, UNSURE, UNSURE], **params) == 1
    # Uniform at every layer: never confident. (elbert's window passes on identical layers,
    # whose probabilities do not fall; its full-depth case is in test_elbert_window_tests.)
    if name != "elbert":
        assert exit_layer_of(name, [UNSURE5] * 4, **params) == 4


def test_lte_and_budget_exit_at_layer_one():
    assert exit_layer_of("lte", [UNSURE] * 3, scores=[0.1, 0.9, 0.9], threshold=0.5) == 1
    assert exit_layer_of("lte", [UNSURE] * 3, scores=[0.9, 0.9, 0.9], threshold=0.5) == 3
    assert exit_layer_of("budget", [UNSURE] * 3, layer=1) == 1
    assert exit_layer_of("budget", [UNSURE] * 3, layer=3) == 3


def test_patience_counter_starts_at_layer_one_and_resets():
    # argmax 0, 0, 1, 1, 1, 0 -> counters 0, 1, 0, 1, 2
    layers = [[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 2.0], [1.0, 0.0]]
    assert exit_layer_of("patience", layers, patience=1) == 2  # earliest exit is t + 1
    assert exit_layer_of("patience", layers, patience=2) == 5
    assert exit_layer_of("patience", layers, patience=3) == 6  # never: full depth


def test_pcee_counter_resets():
    # confident, unsure, confident, confident -> counters 1, 0, 1, 2
    layers = [CONFIDENT, UNSURE, CONFIDENT, CONFIDENT, UNSURE]
    assert exit_layer_of("pcee", layers, threshold=0.5, patience=2) == 4
    assert exit_layer_of("pcee", layers, threshold=0.5, patience=3) == 5


def test_argmax_ties_go_to_the_first_class():
    # [1, 1] predicts class 0, so it agrees with [2, 0] and not with [0, 2].
    assert exit_layer_of("patience", [[1.0, 1.0], [2.0, 0.0], UNSURE], patience=1) == 2
    assert exit_layer_of("patience", [[1.0, 1.0], [0.0, 2.0], UNSURE], patience=1) == 3
    tied5 = [3.0, 1.0, 3.0, 0.0, 0.0]
    first5 = [4.0, 0.0, 0.0, 0.0, 0.0]
    assert exit_layer_of("patience", [tied5, first5, UNSURE5], patience=1) == 2
    stable = {"threshold": 0.0, "window_test": "stable"}
    assert exit_layer_of("elbert", [tied5, first5, UNSURE5], **stable) == 2


@pytest.mark.parametrize(
    ("name", "signal", "params"),
    [
        ("entropy", policy_entropy, {}),
        ("normalized_entropy", policy_normalized_entropy, {}),
        ("pcee", policy_normalized_entropy, {"patience": 1}),
        ("elbert", policy_normalized_entropy, {"window": 3}),
        ("mpee", policy_entropy, {}),  # m_1 = z_1
    ],
)
@pytest.mark.parametrize("first", [[0.3, 1.1], [0.5, -1.0, 2.0, 0.0, 0.25]])
def test_entropy_equal_to_the_threshold_does_not_exit(name, signal, params, first):
    h = signal(torch.tensor([first])).item()  # the policy's own fp32 value: H < τ is False
    layers = [first, [0.0] * len(first), [0.0] * len(first)]
    policy = make_policy(name, threshold=h, **params)
    assert run_policy(policy, torch.tensor(layers)[:, None, :])[0].item() != 1
    policy = make_policy(name, threshold=next_float32_up(h), **params)
    assert run_policy(policy, torch.tensor(layers)[:, None, :])[0].item() == 1


def test_max_prob_at_the_threshold_exits():
    assert exit_layer_of("max_prob", [UNSURE, UNSURE], threshold=0.5) == 1  # p = 0.5 >= 0.5
    assert exit_layer_of("max_prob", [UNSURE, UNSURE], threshold=next_float32_up(0.5)) == 2
    assert exit_layer_of("max_prob", [UNSURE5, UNSURE5], threshold=0.2) == 1  # p = 1/5


def test_lte_score_equal_to_the_threshold_does_not_exit():
    assert exit_layer_of("lte", [UNSURE] * 2, scores=[0.5, 0.5], threshold=0.5) == 2
    assert exit_layer_of("lte", [UNSURE] * 2, scores=[0.5, 0.5], threshold=0.625) == 1


def test_patience_regression_uses_strict_difference():
    values = [[0.5], [0.75], [1.0], [1.0]]  # differences 0.25, 0.25, 0 (exact in fp32)
    assert exit_layer_of("patience", values, threshold=0.25, patience=1) == 4
    assert exit_layer_of("patience", values, threshold=0.3, patience=1) == 2
    assert exit_layer_of("patience", values, threshold=0.3, patience=2) == 3
    per_layer = [0.0, 0.0, 0.3, 0.0]
    assert exit_layer_of("patience", values, threshold=per_layer, patience=1) == 3


def test_lte_and_budget_work_on_regression():
    values = [[0.5], [0.75], [1.0]]
    assert exit_layer_of("lte", values, scores=[0.9, 0.1, 0.0], threshold=0.5) == 2
    assert exit_layer_of("budget", values, layer=2) == 2
    assert exit_layer_of("none", values) == 3


def test_elbert_window_tests():
    falling = [[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0], UNSURE]  # class 0, p(0) falls
    assert exit_layer_of("elbert", falling, threshold=0.0) == 5
    assert exit_layer_of("elbert", falling, threshold=0.0, window_test="stable") == 2
    assert exit_layer_of("elbert", falling, threshold=0.0, window_test="stable", window=4) == 4
    # p(0) = 0.953, 0.881, 0.731, 0.622: consecutive ranges 0.072, 0.150, 0.109.
    by_range = {"threshold": 0.0, "window_test": "range"}
    assert exit_layer_of("elbert", falling, window_range=0.1, **by_range) == 2
    assert exit_layer_of("elbert", falling, window_range=0.05, **by_range) == 5
    # Equal probabilities do not fall: monotonic passes; range 0 <= r = 0 passes.
    flat = [[1.0, 0.0], [1.0, 0.0], UNSURE]
    assert exit_layer_of("elbert", flat, threshold=0.0) == 2
    assert exit_layer_of("elbert", flat, window_range=0.0, **by_range) == 2
    assert exit_layer_of("elbert", [[1.0, 0.0], [0.99, 0.0], UNSURE], threshold=0.0) == 3
    # The window uses the current prediction: class 1 rises from 0.08 to 0.83 (C = 5), so
    # confidence in it never fell although the label changed.
    changed = [[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0], UNSURE5]
    assert exit_layer_of("elbert", changed, threshold=0.0) == 2
    assert exit_layer_of("elbert", changed, threshold=0.0, window_test="stable") == 3
    # Stage 1 fires before the window is full.
    assert exit_layer_of("elbert", [CONFIDENT, UNSURE, UNSURE], threshold=0.1, window=3) == 1


def test_mpee_memory_is_the_output():
    policy = make_policy("mpee", threshold=0.0)
    layers = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])
    exit_layer, logits = run_policy(policy, layers)
    assert exit_layer.tolist() == [2]
    torch.testing.assert_close(logits, torch.tensor([[0.2, 1.8]]))  # 0.1 m_1 + 0.9 z_2
    policy = make_policy("mpee", threshold=0.5)
    exit_layer, logits = run_policy(policy, torch.tensor([[CONFIDENT], [UNSURE]]))
    assert exit_layer.tolist() == [1]
    torch.testing.assert_close(logits, torch.tensor([CONFIDENT]))  # m_1 = z_1
    # λ = 1 forgets the past: the entropy policy.
    x = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(0)) * 3
    mpee = run_policy(make_policy("mpee", threshold=0.4, memory_weight=1.0), x)
    plain = run_policy(make_policy("entropy", threshold=0.4), x)
    assert mpee[0].tolist() == plain[0].tolist()
    torch.testing.assert_close(mpee[1], plain[1])


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("max_prob", {"threshold": [0.5, 0.9]}),
        ("patience", {"patience": 3}),
        ("patience", {"threshold": 0.2, "patience": 1}),
        ("elbert", {"threshold": 0.2, "window": 3, "window_test": "range", "window_range": 0.1}),
        ("lte", {"threshold": 0.3}),
        ("mpee", {"threshold": 0.3, "memory_weight": 0.5}),
        ("budget", {"layer": 2}),
    ],
)
def test_params_round_trip(name, params):
    policy = make_policy(name, **params)
    assert make_policy(name, **policy.params()).params() == policy.params()


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("patience", {"patience": 0}, "patience must be an integer >= 1"),
        ("elbert", {"threshold": 0.2, "window": 1}, "window must be an integer >= 2"),
        ("elbert", {"threshold": 0.2, "window_test": "trend"}, "window_test must be one of"),
        ("elbert", {"threshold": 0.2, "window_test": "range"}, "window_range .* is required"),
        ("elbert", {"threshold": 0.2, "window_range": 0.1}, "taken only with it"),
        (
            "elbert",
            {"threshold": 0.2, "window_test": "range", "window_range": 1.5},
            r"window_range must be a number in \[0, 1\]",
        ),
        ("mpee", {"threshold": 0.2, "memory_weight": 0.0}, r"memory_weight .* \(0, 1\]"),
        ("budget", {}, "needs layer"),
        ("budget", {"layer": 0}, "layer must be an integer >= 1"),
        ("max_prob", {}, "needs a threshold"),
        ("lte", {}, "needs a threshold"),
        ("budget", {"layer": 2, "threshold": 0.2}, "does not take"),
    ],
)
def test_bad_policy_arguments(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **params)


@pytest.mark.parametrize(
    ("name", "params", "num_labels", "message"),
    [
        ("entropy", {"threshold": 0.2}, 1, "regression model"),
        ("elbert", {"threshold": 0.2}, 1, "regression model"),
        ("mpee", {"threshold": 0.2}, 1, "regression model"),
        ("patience", {}, 1, "needs threshold δ"),
        ("patience", {"threshold": 0.2}, 2, "only for regression"),
        ("budget", {"layer": 7}, 2, r"layer 7 is out of range \[1, 6\]"),
        ("max_prob", {"threshold": 1.5}, 2, "out of range"),
        ("lte", {"threshold": -0.1}, 2, "out of range"),
        ("mpee", {"threshold": 0.8}, 2, "out of range"),  # > log 2
        ("elbert", {"threshold": 1.2}, 5, "out of range"),
        ("patience", {"threshold": -0.5}, 1, "out of range"),
        ("mpee", {"threshold": [0.1, 0.2]}, 2, "2 per-layer thresholds given"),
        ("max_prob", {"threshold": [0.9] * 7}, 2, "7 per-layer thresholds given"),
    ],
)
def test_validation_against_the_model(name, params, num_labels, message):
    with pytest.raises(ValueError, match=message):
        policy = make_policy(name, **params)
        policy.validate(num_labels=num_labels, num_layers=6, signals=("lte_score",))


def test_lte_needs_a_model_with_the_lte_module_and_its_score():
    policy = make_policy("lte", threshold=0.2)
    with pytest.raises(ValueError, match="needs a checkpoint trained with the LTE module"):
        policy.validate(num_labels=2, num_layers=6)
    policy.validate(num_labels=1, num_layers=6, signals=("lte_score",))
    with pytest.raises(ValueError, match="needs signal"):
        run_policy(policy, torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="lte_score"):
        policy.step(torch.zeros(2, 2), 1, {})
