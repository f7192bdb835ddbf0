"""Cases of the fused exit step against its plain-torch twin, shared by the C++, Triton and
CUDA tests (``test_exit_head_step.py``, ``test_triton_exit_head_step.py``,
``test_cuda_exit_head_step.py``): the case grid, policies and inputs built so that a
last-bit rounding difference cannot flip a decision, the runners that compare an op with
:func:`eeengine.exit_step.exit_head_step_reference`, good and bad argument sets, and a tiny
multi-exit model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import BertConfig

from eeengine._custom_ops import exit_head_step
from eeengine.exit_step import exit_head_step_reference
from eeengine.heads import ExitHead, LteHead
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies.base import (
    ExitPolicy,
    State,
    entropy,
    normalized_entropy,
)
from eeengine.policies.budget import BudgetPolicy
from eeengine.policies.elbert import ElbertPolicy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policies.lte import LtePolicy
from eeengine.policies.max_prob import MaxProbPolicy
from eeengine.policies.mpee import MpeePolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.normalized_entropy import NormalizedEntropyPolicy
from eeengine.policies.patience import PatiencePolicy
from eeengine.policies.pcee import PceePolicy
from eeengine.policy_codes import PolicyCode

SEED = 0
NUM_LAYERS = 6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Logits of the op (fp32 math on the dtype's inputs) against the fp32 reference on the same
# inputs upcast; only the summation order differs.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-5, "rtol": 1e-5},
}
HIDDEN_SIZES = [7, 83, 384]
NUM_LABELS = [2, 3, 5]
BATCH_SIZES = [1, 13]
SCENARIOS = ["some", "all", "none"]
POLICIES = [
    "none", "entropy", "normalized_entropy", "max_prob", "patience", "pcee", "budget",
    "elbert_monotonic", "elbert_stable", "elbert_range", "lte", "mpee",
]  # fmt: skip
WINDOWS = [2, 3, 5]  # ELBERT's N
WINDOW_TESTS = ["monotonic", "stable", "range"]
STATEFUL_POLICIES = [
    "patience",
    "pcee",
    "elbert_monotonic",
    "elbert_stable",
    "elbert_range",
    "mpee",
    "lte",
]  # fmt: skip


def threshold_between(signal: Tensor, scenario: str, exit_below: bool) -> float:
    """A threshold that makes some / all / none of the rows pass, far from every value."""
    values = signal.double().sort().values
    low, high = float(values[0]) - 0.25, float(values[-1]) + 0.25
    if scenario == "all":
        return high if exit_below else low
    if scenario == "none":
        return low if exit_below else high
    if len(values) == 1:
        return high
    k = len(values) // 2
    gap = float(values[k] - values[k - 1])
    assert gap > 1e-5, "seed gives two signal values too close to separate"
    return float(values[k - 1] + values[k]) / 2


def assert_no_argmax_tie(logits: Tensor) -> None:
    top2 = logits.topk(2, -1).values
    assert bool((top2[:, 0] - top2[:, 1] > 1e-4).all()), "seed gives an argmax tie"


def elbert_case(
    test: str, scenario: str, ref_logits: Tensor, layer: int, gen: torch.Generator, window: int
) -> tuple[ExitPolicy, State]:
    """ELBERT with window ``test`` and N = ``window``, and a window state before ``layer``:
    "some" splits stage 1 and draws a random window for half the rows; "none" puts stage 1 out
    of reach; the other rows' windows hold entries that fail the test (one-hot at the current
    prediction: the confidence falls and its range is > 0; another label for "stable")."""
    batch_size, num_labels = ref_logits.shape
    assert_no_argmax_tie(ref_logits)
    pred = ref_logits.argmax(-1)
    tau = threshold_between(normalized_entropy(ref_logits), scenario, True)
    window_range = {"range": 0.25 if scenario == "some" else 0.0}.get(test)
    policy = ElbertPolicy(tau, window, test, window_range)
    if test == "stable":
        labels = torch.randint(0, num_labels, (batch_size, window), generator=gen)
        labels[: batch_size // 2] = pred[: batch_size // 2, None]  # half the rows steady
        if scenario == "none":
            labels = ((pred + 1) % num_labels)[:, None].repeat(1, window)
        return policy, {"window": labels}
    probs = torch.softmax(torch.randn(batch_size, window, num_labels, generator=gen) * 2, -1)
    failing = torch.nn.functional.one_hot(pred, num_labels).float()[:, None].repeat(1, window, 1)
    if scenario == "none":
        assert bool((torch.softmax(ref_logits, -1).amax(-1) < 0.999).all())
        probs = failing
    probs[: batch_size // 2] = failing[: batch_size // 2]  # half the rows unsteady
    return policy, {"window": probs}


def make_policy(
    name: str,
    scenario: str,
    ref_logits: Tensor,
    layer: int,
    gen: torch.Generator,
    lte_score: Tensor | None = None,
) -> tuple[ExitPolicy, State]:
    """The reference policy for ``scenario`` on these logits (and LTE scores, for "lte"), and a
    state before ``layer``."""
    batch_size, num_labels = ref_logits.shape
    if name.startswith("elbert_"):
        return elbert_case(name.removeprefix("elbert_"), scenario, ref_logits, layer, gen, 2)
    if name == "lte":
        return LtePolicy(threshold_between(lte_score, scenario, True)), {}
    if name == "mpee":
        memory_weight = 0.75
        memory = torch.randn(batch_size, num_labels, generator=gen) * 2
        ref_memory = (1 - memory_weight) * memory + memory_weight * ref_logits
        tau = threshold_between(entropy(ref_logits if layer == 1 else ref_memory), scenario, True)
        return MpeePolicy(tau, memory_weight), {"memory": memory}
    if name == "none":
        return NoExitPolicy(), {}
    if name == "entropy":
        return EntropyPolicy(threshold_between(entropy(ref_logits), scenario, True)), {}
    if name == "normalized_entropy":
        tau = threshold_between(normalized_entropy(ref_logits), scenario, True)
        return NormalizedEntropyPolicy(tau), {}
    if name == "max_prob":
        max_prob = torch.softmax(ref_logits, -1).amax(-1)
        return MaxProbPolicy(threshold_between(max_prob, scenario, False)), {}
    if name == "pcee":
        tau = threshold_between(normalized_entropy(ref_logits), scenario, True)
        patience = 1 if scenario == "all" else 2
        counter = torch.randint(0, 4, (batch_size,), generator=gen)  # also past the patience
        return PceePolicy(tau, patience), {"counter": counter}
    if name == "patience":
        assert_no_argmax_tie(ref_logits)
        pred = ref_logits.argmax(-1)
        patience = 2
        if scenario == "all":
            counter, prev = torch.full((batch_size,), patience - 1), pred.clone()
        elif scenario == "none":
            counter, prev = torch.full((batch_size,), patience - 1), (pred + 1) % num_labels
        else:
            counter = torch.randint(0, patience + 2, (batch_size,), generator=gen)
            same = torch.rand(batch_size, generator=gen) < 0.5
            prev = torch.where(same, pred, torch.full_like(pred, -1))
        return PatiencePolicy(patience=patience), {"counter": counter, "previous": prev}
    assert name == "budget"
    return BudgetPolicy({"some": layer, "all": 1, "none": layer + 1}[scenario]), {}


def make_lte(hidden_size: int) -> LteHead:
    """A learning-to-exit module with random weights spread enough to split rows."""
    gen = torch.Generator().manual_seed(SEED + 1)
    lte = LteHead(hidden_size).eval()
    with torch.no_grad():
        lte.dense.weight.copy_(torch.randn(1, hidden_size, generator=gen) * 3 / hidden_size**0.5)
        lte.dense.bias.zero_()
    return lte


def policy_case(
    name: str,
    scenario: str,
    head: ExitHead,
    hidden: Tensor,
    mask: Tensor | None,
    layer: int,
    gen: torch.Generator,
) -> tuple[ExitPolicy, State]:
    """:func:`make_policy` on the reference's logits (and LTE scores) of these inputs, upcast
    to fp32; ``mask`` None means ``hidden`` is already pooled."""
    pooled = hidden.float() if mask is None else head.pool(hidden.float(), mask)
    lte_score = make_lte(hidden.shape[-1])(pooled) if name == "lte" else None
    return make_policy(name, scenario, head.classifier(pooled), layer, gen, lte_score)


def make_inputs(
    batch_size: int, seq_len: int, hidden_size: int, num_labels: int, dtype: torch.dtype
) -> tuple[ExitHead, Tensor, Tensor, torch.Generator]:
    """A mean-pooling head and right-padded hidden states (first row full length)."""
    gen = torch.Generator().manual_seed(SEED)
    head = ExitHead(hidden_size, num_labels, "mean", dropout=0.1).eval()
    with torch.no_grad():
        head.classifier.weight.copy_(
            torch.randn(num_labels, hidden_size, generator=gen) * 3 / math.sqrt(hidden_size)
        )
        head.classifier.bias.copy_(torch.randn(num_labels, generator=gen))
    hidden = (torch.randn(batch_size, seq_len, hidden_size, generator=gen) * 2).to(dtype)
    lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    return head, hidden, mask, gen


def run_both(
    head: ExitHead,
    policy: ExitPolicy,
    hidden: Tensor,
    mask: Tensor | None,
    layer: int,
    state: State,
    gen: torch.Generator,
    op: Callable[..., tuple[Tensor, Tensor]] = exit_head_step,
    op_state: State | None = None,
) -> tuple[tuple, tuple]:
    """Run the reference (fp32, on the upcast inputs) and the op (the C++ op unless given) on
    fresh latch buffers, from copies of ``state`` (the op from ``op_state`` where given).

    Returns:
        (logits, exit_mask, state list, out_logits, out_layer) of the reference and of the op.
    """
    batch_size, num_labels = hidden.shape[0], head.classifier.out_features
    rows = torch.randperm(batch_size + 3, generator=gen)[:batch_size]
    lte = make_lte(hidden.shape[-1]) if "lte_score" in policy.needs else None
    pooled = hidden.float() if mask is None else head.pool(hidden.float(), mask)
    lte_score = None if lte is None else lte(pooled)
    results = []
    for backend in ("reference", "cpp"):
        out_logits = torch.zeros(batch_size + 3, num_labels)
        out_layer = torch.zeros(batch_size + 3, dtype=torch.long)
        start = op_state if backend != "reference" and op_state is not None else state
        step_state = {key: value.clone() for key, value in start.items()}
        if backend == "reference":
            if mask is None:  # pooled input: the reference head sees the pooled rows
                logits = head.classifier(pooled)
                signals = {} if lte is None else {"lte_score": lte_score}
                exit_mask, step_state = policy.step(logits, layer, step_state, **signals)
                if layer == NUM_LAYERS:
                    exit_mask = torch.ones_like(exit_mask)
                outputs = policy.output_logits(logits, step_state)
                out_logits[rows[exit_mask]] = outputs[exit_mask]
                out_layer[rows[exit_mask]] = layer
            else:
                logits, exit_mask, step_state = exit_head_step_reference(
                    head, policy, hidden.float(), mask, layer, NUM_LAYERS, step_state, rows,
                    out_logits, out_layer, lte,
                )  # fmt: skip
        else:
            logits, exit_mask = op(
                hidden, mask, head.classifier.weight, head.classifier.bias, policy.op_code,
                policy.op_params(layer), layer, NUM_LAYERS,
                [step_state[key] for key in policy.op_state_keys], rows, out_logits, out_layer,
                lte_score,
            )  # fmt: skip
        state_list = [step_state[key] for key in policy.op_state_keys]
        results.append((logits, exit_mask, state_list, out_logits, out_layer))
    return results[0], results[1]


def assert_same(ref: tuple, got: tuple, dtype: torch.dtype) -> None:
    ref_logits, ref_exit, ref_state, ref_out_logits, ref_out_layer = ref
    logits, exit_mask, state, out_logits, out_layer = got
    assert logits.dtype == torch.float32 and exit_mask.dtype == torch.bool
    torch.testing.assert_close(logits, ref_logits, **TOLERANCES[dtype])
    assert torch.equal(exit_mask, ref_exit)
    for got_state, ref_value in zip(state, ref_state, strict=True):
        assert got_state.dtype == ref_value.dtype and got_state.shape == ref_value.shape
        if got_state.is_floating_point():  # ELBERT's window, MPEE's memory, PABEE's value
            torch.testing.assert_close(got_state, ref_value, **TOLERANCES[dtype])
        else:
            assert torch.equal(got_state, ref_value)
    assert torch.equal(out_layer, ref_out_layer)
    torch.testing.assert_close(out_logits, ref_out_logits, **TOLERANCES[dtype])


def check_elbert_window(
    test: str, window: int, layer_offset: int, op: Callable[..., tuple[Tensor, Tensor]]
) -> None:
    """ELBERT with window N before (layer < N: only stage 1), at and after the window fills."""
    layer = max(1, window + layer_offset)
    head, hidden, mask, gen = make_inputs(13, 9, 83, 5, torch.float32)
    pooled = head.pool(hidden, mask)
    policy, state = elbert_case(test, "some", head.classifier(pooled), layer, gen, window)
    ref, got = run_both(head, policy, hidden, mask, layer, state, gen, op)
    assert_same(ref, got, torch.float32)
    if layer < window:  # only stage 1 can fire
        tau = policy.threshold_at(layer)
        assert torch.equal(got[1], normalized_entropy(head.classifier(pooled)) < tau)


def check_patience_regression(
    layer: int, scenario: str, dtype: torch.dtype, op: Callable[..., tuple[Tensor, Tensor]]
) -> None:
    """PABEE on a regression head (C = 1): same when |v_l - v_{l-1}| < δ."""
    head, hidden, mask, gen = make_inputs(13, 9, 83, 1, dtype)
    value = head(hidden.float(), mask)[:, 0]
    previous = value + torch.randn(13, generator=gen)
    if scenario == "none":
        previous = value + 10.0
    delta = threshold_between((value - previous).abs(), scenario, True)
    policy = PatiencePolicy(delta, patience=2)
    state = {"counter": torch.ones(13, dtype=torch.long), "previous": previous}
    ref, got = run_both(head, policy, hidden, mask, layer, state, gen, op)
    assert_same(ref, got, dtype)
    if layer == 1 or scenario == "none":
        assert not bool(got[1].any())
    elif scenario == "all":
        assert bool(got[1].all())


def check_argmax_ties(name: str, op: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Classes 1 and 3 get identical weights, so rows whose top class is one of them tie
    exactly: the prediction is the first (class 1), as torch.argmax."""
    head, hidden, mask, gen = make_inputs(13, 9, 83, 5, torch.float32)
    with torch.no_grad():
        head.classifier.weight[3] = head.classifier.weight[1] * 4
        head.classifier.bias[3] = head.classifier.bias[1] = 5.0
        head.classifier.weight[1] *= 4
    logits = head(hidden, mask)
    assert bool((logits.argmax(-1) == 1).any()), "no tied row"
    test = name.removeprefix("elbert_")
    if name == "patience":
        policy = PatiencePolicy(patience=1)
        state = {"counter": torch.zeros(13, dtype=torch.long), "previous": torch.ones(13).long()}
    else:
        policy = ElbertPolicy(0.0, 2, test)
        state = {"window": torch.ones(13, 2, dtype=torch.long)}
        if test == "monotonic":  # p(1) cannot fall from 0, every other class falls from 1
            state = {"window": torch.ones(13, 2, 5).index_fill_(2, torch.tensor([1]), 0.0)}
    ref, got = run_both(head, policy, hidden, mask, 3, state, gen, op)
    assert_same(ref, got, torch.float32)
    assert torch.equal(got[1], logits.argmax(-1) == 1)  # rows predicting class 1 stay steady


def check_state_over_layers(
    name: str, repeat: bool, dtype: torch.dtype, op: Callable[..., tuple[Tensor, Tensor]]
) -> None:
    """Layers 1 … L from init_state, each backend carrying its own state. ``repeated`` feeds
    the same hidden states at every layer: ELBERT's window then holds exactly equal entries
    (ties: confidence does not fall, range 0), MPEE's memory stays z."""
    head, hidden, mask, gen = make_inputs(13, 9, 83, 3, dtype)
    layers = [hidden] * NUM_LAYERS if repeat else [
        (torch.randn(hidden.shape, generator=gen) * 2).to(dtype) for _ in range(NUM_LAYERS)
    ]  # fmt: skip
    policy = policy_case(name, "some", head, hidden, mask, 1, gen)[0]
    if name.startswith("elbert_"):
        policy = ElbertPolicy(0.0, 3, policy.window_test, policy.window_range)  # stage 2 only
    ref_state = op_state = policy.init_state(13, torch.device("cpu"), 3)
    exited = torch.zeros(13, dtype=torch.long)
    for layer, h in enumerate(layers, 1):
        ref, got = run_both(head, policy, h, mask, layer, ref_state, gen, op, op_state)
        assert_same(ref, got, dtype)
        ref_state = dict(zip(policy.op_state_keys, ref[2], strict=True))
        op_state = dict(zip(policy.op_state_keys, got[2], strict=True))
        exited += got[1].long()
    if repeat and name.startswith("elbert_"):  # every window test passes once it is full
        assert int(exited.min()) == NUM_LAYERS - 2


def good_args() -> dict:
    return {
        "hidden_states": torch.randn(3, 4, 8),
        "attention_mask": torch.ones(3, 4),
        "weight": torch.randn(2, 8),
        "bias": torch.randn(2),
        "policy": int(PolicyCode.PCEE),
        "params": [0.5, 2.0],
        "layer": 1,
        "num_layers": NUM_LAYERS,
        "state": [torch.zeros(3, dtype=torch.long)],
        "rows": torch.arange(3),
        "out_logits": torch.zeros(3, 2),
        "out_layer": torch.zeros(3, dtype=torch.long),
    }


BAD_ARGS = [
    ("hidden_states", torch.randn(3, 4, 8, 1), "hidden_states must be pooled"),
    ("hidden_states", torch.randn(3, 4, 8).double(), "hidden_states must be float32"),
    ("attention_mask", None, "attention_mask must be given"),
    ("attention_mask", torch.ones(3, 5), "attention_mask must have shape"),
    ("weight", torch.randn(2, 9), "weight must have shape"),
    ("bias", torch.randn(3), "bias must have shape"),
    ("policy", 99, "unknown policy code"),
    ("params", [0.5], "params: policy code 5 takes 2"),
    ("params", [0.5, 1.5], "patience must be an integer"),
    ("layer", 7, "layer must be in"),
    ("state", [], "state: policy code 5 takes 1"),
    ("state", [torch.zeros(3, dtype=torch.int32)], r"state\[0\] must be Long"),
    ("rows", torch.tensor([0, 1, 3]), r"rows\[2\] = 3 is out of range"),
    ("out_logits", torch.zeros(3, 2, dtype=torch.float64), "out_logits must be"),
    ("out_layer", torch.zeros(2, dtype=torch.long), "out_layer must have shape"),
]


def policy_args(policy: PolicyCode, params: list[float], state: list[Tensor], **more) -> dict:
    """:func:`good_args` with another policy, its params and state (and ``more`` overrides)."""
    return {**good_args(), "policy": int(policy), "params": params, "state": state, **more}


def regression_args(**more) -> dict:
    """PABEE on a regression head (C = 1): params [patience, δ], a float32 previous value."""
    return {
        **good_args(), "policy": int(PolicyCode.PATIENCE), "params": [2.0, 0.1],
        "state": [torch.zeros(3, dtype=torch.long), torch.zeros(3)], "weight": torch.randn(1, 8),
        "bias": torch.randn(1), "out_logits": torch.zeros(3, 1), **more,
    }  # fmt: skip


# Good arguments of each stateful policy (the op's in-place state updates included).
GOOD_POLICY_ARGS = {
    "pcee": good_args,
    "elbert_monotonic": lambda: policy_args(
        PolicyCode.ELBERT, [0.5, 2, 0, 0], [torch.rand(3, 2, 2)]
    ),
    "elbert_stable": lambda: policy_args(
        PolicyCode.ELBERT, [0.5, 3, 1, 0], [torch.zeros(3, 3, dtype=torch.long)]
    ),
    "elbert_range": lambda: policy_args(PolicyCode.ELBERT, [0.5, 2, 2, 0.1], [torch.rand(3, 2, 2)]),
    "mpee": lambda: policy_args(PolicyCode.MPEE, [0.5, 0.9], [torch.randn(3, 2)]),
    "lte": lambda: policy_args(PolicyCode.LTE, [0.5], [], lte_score=torch.rand(3)),
    "patience_regression": regression_args,
}
POLICY_BAD_ARGS = [
    (policy_args(PolicyCode.ELBERT, [0.5, 1, 0, 0], [torch.rand(3, 1, 2)]), "window must be >= 2"),
    (policy_args(PolicyCode.ELBERT, [0.5, 2, 3, 0], [torch.rand(3, 2, 2)]), "unknown window test"),
    (
        policy_args(PolicyCode.ELBERT, [0.5, 2, 0, 0], [torch.rand(3, 3, 2)]),
        r"state\[0\] must be Float of shape \[3, 2, 2\]",
    ),
    (
        policy_args(PolicyCode.ELBERT, [0.5, 2, 1, 0], [torch.rand(3, 2)]),
        r"state\[0\] must be Long of shape \[3, 2\]",
    ),
    (policy_args(PolicyCode.MPEE, [0.5, 0.0], [torch.rand(3, 2)]), r"memory_weight must be in"),
    (
        policy_args(PolicyCode.MPEE, [0.5, 0.9], [torch.zeros(3, 2, dtype=torch.long)]),
        r"state\[0\] must be Float of shape \[3, 2\]",
    ),
    (policy_args(PolicyCode.LTE, [0.5], []), "lte_score must be given for policy code 8"),
    ({**good_args(), "lte_score": torch.rand(3)}, "lte_score must be given for policy code 8"),
    (policy_args(PolicyCode.LTE, [0.5], [], lte_score=torch.rand(4)), "lte_score must have shape"),
    (
        regression_args(state=[torch.zeros(3, dtype=torch.long)] * 2),
        r"state\[1\] must be Float of shape \[3\]",
    ),
    (
        regression_args(policy=int(PolicyCode.ENTROPY), params=[0.5], state=[]),
        "policy code 1 needs at least 2 classes",
    ),
]


def tiny_model(pooling: str, num_labels: int = 3, lte: bool = False) -> MultiExitBert:
    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=NUM_LAYERS, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    model = MultiExitBert(config, num_labels=num_labels, pooling=pooling, lte=lte).eval()
    with torch.no_grad():
        for head in model.exit_heads:  # confident enough heads that rows leave early
            head.classifier.weight.mul_(20)
    return model
