"""The fused C++ op exit_head_step against its plain-torch twin (eeengine.runtime.
exit_head_step_reference: ExitHead + the policy's step + latch).

Logits are compared with one per-dtype tolerance table; exit masks, policy state and latched
exit layers must be exactly equal. Thresholds are placed midway between two of the reference's
signal values, so a last-bit rounding difference cannot flip a decision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import BertConfig

from eeengine import _custom_ops
from eeengine._custom_ops import HAS_C, LOAD_ERROR, exit_head_step, resolve_backend
from eeengine.exit_step import exit_head_step_reference
from eeengine.heads import ExitHead, LteHead
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies.base import (
    ExitPolicy,
    State,
    entropy,
    normalized_entropy,
    run_policy,
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
from eeengine.runtime import early_exit_forward

requires_c = pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
# Whether the extension was built with CUDA kernels (asks the dispatcher; no GPU needed).
HAS_CUDA_KERNEL = HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(
    "eeengine::exit_head_step", "CUDA"
)

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


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", POLICIES)
@torch.inference_mode()
def test_policies_match_reference(name: str, scenario: str, dtype: torch.dtype) -> None:
    head, hidden, mask, gen = make_inputs(13, 9, 83, 3, dtype)
    layer = 3
    policy, state = policy_case(name, scenario, head, hidden, mask, layer, gen)
    ref, got = run_both(head, policy, hidden, mask, layer, state, gen)
    assert_same(ref, got, dtype)
    expected = {"all": 13, "none": 0}.get(scenario)
    if name == "none":
        expected = 0
    if expected is not None:
        assert int(got[1].sum()) == expected
    elif name not in ("budget",):
        assert 0 < int(got[1].sum()) < 13, "scenario 'some' should split the batch"


@requires_c
@pytest.mark.parametrize("name", STATEFUL_POLICIES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_labels", NUM_LABELS)
@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_shapes_match_reference(
    dtype: torch.dtype, hidden_size: int, num_labels: int, batch_size: int, name: str
) -> None:
    head, hidden, mask, gen = make_inputs(batch_size, 11, hidden_size, num_labels, dtype)
    policy, state = policy_case(name, "some", head, hidden, mask, 2, gen)
    ref, got = run_both(head, policy, hidden, mask, 2, state, gen)
    assert_same(ref, got, dtype)


@requires_c
@pytest.mark.parametrize("test", WINDOW_TESTS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layer_offset", [-1, 0, 1])  # before, at and after the window fills
@torch.inference_mode()
def test_elbert_window_lengths(test: str, window: int, layer_offset: int) -> None:
    check_elbert_window(test, window, layer_offset, exit_head_step)


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


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("layer", [1, 3])
@torch.inference_mode()
def test_patience_regression_matches_reference(
    layer: int, scenario: str, dtype: torch.dtype
) -> None:
    check_patience_regression(layer, scenario, dtype, exit_head_step)


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


@requires_c
@pytest.mark.parametrize("name", ["patience", "elbert_stable", "elbert_monotonic"])
@torch.inference_mode()
def test_argmax_ties_take_the_first_class(name: str) -> None:
    check_argmax_ties(name, exit_head_step)


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


@requires_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("repeat", [False, True], ids=["random", "repeated"])
@pytest.mark.parametrize("name", STATEFUL_POLICIES)
@torch.inference_mode()
def test_state_over_layers_matches_reference(name: str, repeat: bool, dtype: torch.dtype) -> None:
    check_state_over_layers(name, repeat, dtype, exit_head_step)


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


@requires_c
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_low_precision_error_at_most_twice_torch(dtype: torch.dtype) -> None:
    """FlashAttention's rule: error vs fp32 on the original inputs <= 2x torch's own in dtype."""
    head, hidden32, mask, gen = make_inputs(13, 17, 384, 3, torch.float32)
    exact = head(hidden32, mask)
    torch_err = (head.to(dtype)(hidden32.to(dtype), mask.to(dtype)).float() - exact).abs().max()
    head = head.float()
    logits, _ = exit_head_step(
        hidden32.to(dtype), mask, head.classifier.weight, head.classifier.bias, PolicyCode.NONE,
        [], 1, NUM_LAYERS, [], torch.arange(13), torch.zeros(13, 3),
        torch.zeros(13, dtype=torch.long),
    )  # fmt: skip
    assert (logits - exact).abs().max() <= 2 * torch_err


@requires_c
@pytest.mark.parametrize("name", POLICIES)
@torch.inference_mode()
def test_last_layer_every_row_exits(name: str) -> None:
    head, hidden, mask, gen = make_inputs(13, 9, 83, 3, torch.float32)
    policy, state = policy_case(name, "none", head, hidden, mask, NUM_LAYERS, gen)
    ref, got = run_both(head, policy, hidden, mask, NUM_LAYERS, state, gen)
    assert bool(got[1].all())
    assert_same(ref, got, torch.float32)


@requires_c
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32])
@torch.inference_mode()
def test_padding_and_mask_dtypes(mask_dtype: torch.dtype) -> None:
    head, hidden, mask, gen = make_inputs(5, 8, 83, 2, torch.float32)
    mask[1:, 3:] = 0  # heavy padding
    mask[2, :] = 0  # a row with no real token: the reference divides by clamp_min(1)
    ref_logits = head(hidden, mask)
    policy, state = make_policy("entropy", "some", ref_logits, 1, gen)
    ref, got = run_both(head, policy, hidden, mask.to(mask_dtype), 1, state, gen)
    assert_same(ref, got, torch.float32)


@requires_c
@torch.inference_mode()
def test_strided_inputs() -> None:
    """Batch/sequence slices (as the runtime's compaction makes) and a strided hidden dim."""
    head, hidden, mask, gen = make_inputs(9, 12, 83, 3, torch.float32)
    sliced, sliced_mask = hidden[1::2, :10], mask[1::2, :10]
    wide = torch.randn(4, 10, 166, generator=gen)[..., ::2]
    for h, m in ((sliced, sliced_mask), (wide, sliced_mask[:4])):
        assert not h.is_contiguous()
        ref_logits = head(h, m)
        policy, state = make_policy("max_prob", "some", ref_logits, 2, gen)
        ref, got = run_both(head, policy, h, m, 2, state, gen)
        assert_same(ref, got, torch.float32)


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_pooled_input_matches_cls_head(dtype: torch.dtype) -> None:
    """[CLS]+dense+tanh pooling runs in torch; the op takes the pooled (batch, hidden) rows."""
    head, hidden, mask, gen = make_inputs(7, 5, 83, 5, torch.float32)
    cls_head = ExitHead(83, 5, "cls", dropout=0.1).eval()
    pooled = cls_head.pool(hidden, mask).to(dtype)
    policy, state = make_policy("patience", "some", head.classifier(pooled.float()), 2, gen)
    ref, got = run_both(head, policy, pooled, None, 2, state, gen)
    assert_same(ref, got, dtype)


@requires_c
def test_batch_of_zero_rows() -> None:
    logits, exit_mask = exit_head_step(
        torch.randn(0, 3, 8), torch.ones(0, 3), torch.randn(2, 8), torch.randn(2),
        PolicyCode.ENTROPY, [0.5], 1, NUM_LAYERS, [], torch.zeros(0, dtype=torch.long),
        torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
    )  # fmt: skip
    assert logits.shape == (0, 2) and exit_mask.shape == (0,)


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


@requires_c
@pytest.mark.parametrize(("arg", "value", "message"), BAD_ARGS)
def test_bad_arguments_are_named(arg: str, value: object, message: str) -> None:
    exit_head_step(**good_args())  # the good arguments pass
    args = good_args()
    args[arg] = value
    with pytest.raises(RuntimeError, match=message):
        exit_head_step(**args)


@requires_c
@pytest.mark.parametrize(("args", "message"), POLICY_BAD_ARGS)
def test_bad_policy_arguments_are_named(args: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        exit_head_step(**args)


@requires_c
@pytest.mark.parametrize("name", GOOD_POLICY_ARGS)
def test_opcheck(name: str) -> None:
    args = GOOD_POLICY_ARGS[name]()
    if name == "pcee":
        args["params"] = [0.9, 1.0]
    torch.library.opcheck(torch.ops.eeengine.exit_head_step.default, tuple(args.values()))


@requires_c
def test_torch_compile_fullgraph() -> None:
    head, hidden, mask, _ = make_inputs(4, 6, 16, 3, torch.float32)
    weight, bias = head.classifier.weight.detach(), head.classifier.bias.detach()

    def step(hidden: Tensor, counter: Tensor, out_logits: Tensor, out_layer: Tensor) -> Tensor:
        _, exit_mask = exit_head_step(
            hidden * 1.0, mask, weight, bias, PolicyCode.PCEE, [0.99, 1.0], 2, NUM_LAYERS,
            [counter], torch.arange(4), out_logits, out_layer,
        )  # fmt: skip
        return exit_mask

    buffers = [(torch.zeros(4, dtype=torch.long), torch.zeros(4, 3), torch.zeros(4).long())]
    buffers.append(tuple(t.clone() for t in buffers[0]))
    expected = step(hidden, *buffers[0])
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(hidden, *buffers[1]), expected)
    for eager, traced in zip(*buffers, strict=True):  # the in-place updates happened too
        assert torch.equal(traced, eager)
    assert int(buffers[1][0].sum()) > 0


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


RUNTIME_POLICIES = [
    (EntropyPolicy(0.6), 3),
    (NormalizedEntropyPolicy(0.5), 3),
    (PceePolicy(0.6, 2), 3),
    (NoExitPolicy(), 3),
    (PatiencePolicy(patience=1), 3),
    (ElbertPolicy(0.2, 2), 3),
    (ElbertPolicy(0.2, 3, "stable"), 3),
    (ElbertPolicy(0.2, 2, "range", 0.2), 2),
    (MpeePolicy(0.6, 0.9), 3),
    (LtePolicy(0.5), 3),
    (PatiencePolicy(10.0, patience=1), 1),  # regression: δ in the heads' units
    (LtePolicy(0.5), 1),
]


@requires_c
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize(
    ("policy", "num_labels"),
    RUNTIME_POLICIES,
    ids=[f"{p.name}-{getattr(p, 'window_test', '')}-C{c}" for p, c in RUNTIME_POLICIES],
)
def test_runtime_cpp_backend_matches_reference(
    pooling: str, policy: ExitPolicy, num_labels: int
) -> None:
    model = tiny_model(pooling, num_labels, lte=policy.name == "lte")
    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(1, 50, (8, 10), generator=gen)
    lengths = torch.randint(3, 11, (8,), generator=gen)
    attention_mask = (torch.arange(10) < lengths[:, None]).long()
    batch = (input_ids * attention_mask, attention_mask, torch.zeros_like(input_ids))
    ref = early_exit_forward(model, policy, *batch, backend="reference")
    got = early_exit_forward(model, policy, *batch, backend="cpp")
    with torch.inference_mode():  # both equal the policy's definition on full-depth logits
        exit_layer, logits = run_policy(policy, *model.exits(*batch))
    assert torch.equal(ref.exit_layer, exit_layer)
    torch.testing.assert_close(ref.logits, logits, **TOLERANCES[torch.float32])
    assert torch.equal(got.exit_layer, ref.exit_layer)
    torch.testing.assert_close(got.logits, ref.logits, **TOLERANCES[torch.float32])
    if policy.name != "none":
        assert int(ref.exit_layer.min()) < NUM_LAYERS, "no row exits early: weak test"


def test_resolve_backend() -> None:
    policy = EntropyPolicy(0.5)
    assert resolve_backend("reference", policy, 2) == "reference"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        resolve_backend("gpu", policy, 2)


@requires_c
def test_resolve_backend_picks_the_cpp_op_on_cpu() -> None:
    policy = EntropyPolicy(0.5)
    assert resolve_backend(None, policy, 2) == "cpp"
    assert resolve_backend("cpp", policy, 2) == "cpp"
    assert _custom_ops.fused_op("cpp") is exit_head_step


def test_resolve_backend_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA devices try "triton" (primary) then "cuda"; CPU backends are refused there."""
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    with pytest.raises(ValueError, match="backend 'triton' does not run on cpu devices"):
        resolve_backend("triton", policy, 2, "cpu")
    with pytest.raises(ValueError, match="backend 'cpp' does not run on cuda devices"):
        resolve_backend("cpp", policy, 2, "cuda")
    assert resolve_backend("reference", policy, 2, "cuda") == "reference"
    monkeypatch.setattr(_custom_ops.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="triton is not installed"):
        resolve_backend("triton", policy, 2, "cuda")


@pytest.mark.skipif(HAS_CUDA_KERNEL, reason="eeengine._C has CUDA kernels: 'cuda' is available")
def test_resolve_backend_without_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """No "cuda" backend, and without triton no fused op at all on CUDA devices."""
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        resolve_backend("cuda", policy, 2, "cuda")
    monkeypatch.setattr(_custom_ops.importlib.util, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match="triton is not installed; .*without CUDA kernels"):
        assert resolve_backend(None, policy, 2, "cuda") == "reference"


def test_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_custom_ops, "HAS_C", False)
    monkeypatch.setattr(_custom_ops, "LOAD_ERROR", "the extension eeengine._C is not built")
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    with pytest.warns(UserWarning, match="reference backend .*not built"):
        assert resolve_backend(None, policy, 2) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(None, policy, 2) == "reference"  # no second warning
    with pytest.raises(ValueError, match="backend 'cpp' is not available: .*not built"):
        resolve_backend("cpp", policy, 2)


def test_unsupported_policy_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_custom_ops, "_warned", set())
    policy = EntropyPolicy(0.5)
    monkeypatch.setattr(policy, "op_code", None)
    with pytest.warns(UserWarning, match="reference backend"):
        assert resolve_backend(None, policy, 2) == "reference"
    with pytest.raises(ValueError, match="backend 'cpp' is not available"):
        resolve_backend("cpp", policy, 2)


@requires_c
def test_regression_and_training_mode_refuse_cpp() -> None:
    with pytest.raises(ValueError, match="needs >= 2 classes"):
        resolve_backend("cpp", PceePolicy(0.5, 2), 1)
    assert resolve_backend("cpp", NoExitPolicy(), 1) == "cpp"
    model = tiny_model("mean").train()
    ones = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="model.eval"):
        early_exit_forward(model, NoExitPolicy(), ones, ones, ones * 0, backend="cpp")
