"""The Triton kernel of exit_head_step (eeengine.kernels.exit_head_step) against its plain-torch
twin (eeengine.exit_step.exit_head_step_reference), with the helpers of test_exit_head_step.py.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (only Triton reads it). The interpreter costs
~5 ms per program, so batches are small. bf16 is left out: the interpreter's bf16 arithmetic is
wrong. On a GPU the same tests run the compiled kernel on CUDA tensors. The sm_90 build check
compiles it in a subprocess (the interpreted kernel of this process cannot be compiled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from eeengine._custom_ops import fused_op, resolve_backend
from eeengine.policies import ExitPolicy
from tests.exit_step_cases import (
    BAD_ARGS,
    GOOD_POLICY_ARGS,
    NUM_LAYERS,
    POLICY_BAD_ARGS,
    SCENARIOS,
    STATEFUL_POLICIES,
    WINDOW_TESTS,
    assert_same,
    check_argmax_ties,
    check_elbert_window,
    check_patience_regression,
    check_state_over_layers,
    good_args,
    make_inputs,
    make_policy,
    policy_case,
    run_both,
)
from tests.policy_oracles import CASES, draw_case
from tests.triton_support import DEVICE, compile_for_sm90, import_kernel

triton_kernel = import_kernel("exit_head_step")

DTYPES = [torch.float32, torch.float16]  # bf16: the interpreter's arithmetic is wrong
POLICIES = [
    "none", "entropy", "normalized_entropy", "max_prob", "patience", "pcee", "budget",
    "elbert_monotonic", "elbert_stable", "elbert_range", "lte", "mpee",
]  # fmt: skip
NUM_LABELS = [2, 5]
BATCH_SIZES = [1, 7]
WINDOWS = [2, 3]


def to_device(args: Sequence[object]) -> list[object]:
    """The op's arguments with every tensor (and tensor in a list) moved to DEVICE."""

    def move(a: object) -> object:
        if isinstance(a, list):
            return [move(x) for x in a]
        return a.to(DEVICE) if torch.is_tensor(a) else a

    return [move(a) for a in args]


def on_device(*args: object) -> tuple[Tensor, Tensor]:
    """Call the Triton op with every tensor argument moved to DEVICE; copy the in-place
    updates (state, out_logits, out_layer) back into the caller's CPU tensors."""
    moved = to_device(args)
    logits, exit_mask = triton_kernel.exit_head_step_triton(*moved)
    for index in (8, 10, 11):  # state, out_logits, out_layer
        targets, results = args[index], moved[index]
        if torch.is_tensor(targets):
            targets, results = [targets], [results]
        for target, result in zip(targets, results, strict=True):
            target.copy_(result.cpu())
    return logits.cpu(), exit_mask.cpu()


def run(
    name: str,
    scenario: str,
    dtype: torch.dtype,
    batch_size: int = 7,
    seq_len: int = 6,
    hidden_size: int = 19,
    num_labels: int = 5,
    layer: int = 3,
    op: Callable[..., tuple[Tensor, Tensor]] = on_device,
) -> tuple[tuple, tuple]:
    """Reference and Triton results for one policy scenario on random right-padded inputs."""
    head, hidden, mask, gen = make_inputs(batch_size, seq_len, hidden_size, num_labels, dtype)
    policy, state = policy_case(name, scenario, head, hidden, mask, layer, gen)
    return run_both(head, policy, hidden, mask, layer, state, gen, op)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", POLICIES)
@torch.inference_mode()
def test_policies_match_reference(name: str, scenario: str, dtype: torch.dtype) -> None:
    ref, got = run(name, scenario, dtype)
    assert_same(ref, got, dtype)
    exits = int(got[1].sum())
    if name == "none" or scenario == "none":
        assert exits == 0
    elif scenario == "all":
        assert exits == 7
    elif name != "budget":
        assert 0 < exits < 7, "scenario 'some' should split the batch"


@pytest.mark.parametrize("name", STATEFUL_POLICIES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("num_labels", NUM_LABELS)
@torch.inference_mode()
def test_shapes_match_reference(num_labels: int, batch_size: int, name: str) -> None:
    ref, got = run(name, "some", torch.float32, batch_size, 11, 83, num_labels, layer=2)
    assert_same(ref, got, torch.float32)


@pytest.mark.parametrize("test", WINDOW_TESTS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layer_offset", [-1, 0, 1])
@torch.inference_mode()
def test_elbert_window_lengths(test: str, window: int, layer_offset: int) -> None:
    check_elbert_window(test, window, layer_offset, on_device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("layer", [1, 3])
@torch.inference_mode()
def test_patience_regression_matches_reference(
    layer: int, scenario: str, dtype: torch.dtype
) -> None:
    check_patience_regression(layer, scenario, dtype, on_device)


@pytest.mark.parametrize("name", ["patience", "elbert_stable", "elbert_monotonic"])
@torch.inference_mode()
def test_argmax_ties_take_the_first_class(name: str) -> None:
    check_argmax_ties(name, on_device)


@pytest.mark.parametrize("repeat", [False, True], ids=["random", "repeated"])
@pytest.mark.parametrize("name", ["elbert_monotonic", "elbert_stable", "elbert_range", "mpee"])
@torch.inference_mode()
def test_state_over_layers_matches_reference(name: str, repeat: bool) -> None:
    check_state_over_layers(name, repeat, torch.float32, on_device)


def run_fused(
    policy: ExitPolicy,
    all_logits: Tensor,
    signals: dict[str, Tensor],
    op: Callable[..., tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """The runtime's compacting loop through the fused op ``op`` (early_exit_forward runs only
    the CPU backends on CPU tensors): each layer's logits
    enter as pooled rows of an identity head (weight I, bias 0, so the op's logits are exactly
    the given ones), exited rows leave the batch and the state.

    Returns:
        (exit_layer, logits), as :func:`eeengine.policies.run_policy`.
    """
    num_layers, batch_size, num_labels = all_logits.shape
    eye, bias = torch.eye(num_labels), torch.zeros(num_labels)
    rows = torch.arange(batch_size)
    out_logits = torch.zeros(batch_size, num_labels)
    out_layer = torch.zeros(batch_size, dtype=torch.long)
    state = policy.init_state(batch_size, all_logits.device, num_labels)
    for layer in range(1, num_layers + 1):
        score = signals["lte_score"][layer - 1, rows] if policy.needs else None
        _, exit_mask = op(
            all_logits[layer - 1, rows], None, eye, bias, policy.op_code,
            policy.op_params(layer), layer, num_layers,
            [state[key] for key in policy.op_state_keys], rows, out_logits, out_layer, score,
        )  # fmt: skip
        keep = ~exit_mask
        rows = rows[keep]
        state = {name: value[keep] for name, value in state.items()}
        if len(rows) == 0:
            break
    return out_layer, out_logits


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=5, deadline=None)
@given(data=st.data())
@torch.inference_mode()
def test_paper_oracles_through_the_kernel(name: str, data: st.DataObject) -> None:
    """tests/test_policies_oracle.py's random examples (fewer and smaller: the interpreter is
    slow) through the runtime's loop on the Triton kernel."""
    policy, all_logits, signals, expected_layer, expected_out = draw_case(data, name, 5, 3)
    exit_layer, out = run_fused(policy, all_logits, signals, on_device)
    assert exit_layer.tolist() == expected_layer
    torch.testing.assert_close(out, torch.tensor(expected_out))


@pytest.mark.parametrize("name", ["none", "patience", "elbert_monotonic", "mpee"])
@torch.inference_mode()
def test_last_layer_every_row_exits(name: str) -> None:
    ref, got = run(name, "none", torch.float32, layer=NUM_LAYERS)
    assert bool(got[1].all())
    assert_same(ref, got, torch.float32)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@torch.inference_mode()
def test_padding_and_mask_dtypes(mask_dtype: torch.dtype) -> None:
    head, hidden, mask, gen = make_inputs(5, 8, 19, 2, torch.float32)
    mask[1:, 3:] = 0  # heavy padding
    mask[2, :] = 0  # a row with no real token: the reference divides by clamp_min(1)
    policy, state = make_policy("entropy", "some", head(hidden, mask), 1, gen)
    ref, got = run_both(head, policy, hidden, mask.to(mask_dtype), 1, state, gen, on_device)
    assert_same(ref, got, torch.float32)


@torch.inference_mode()
def test_strided_inputs() -> None:
    """Batch/sequence slices (as the runtime's compaction makes) and a strided hidden dim."""
    head, hidden, mask, gen = make_inputs(9, 12, 19, 3, torch.float32)
    sliced, sliced_mask = hidden[1::2, :10], mask[1::2, :10]
    wide = torch.randn(4, 10, 38, generator=gen)[..., ::2]
    for h, m in ((sliced, sliced_mask), (wide, sliced_mask[:4])):
        assert not h.is_contiguous()
        policy, state = make_policy("max_prob", "some", head(h, m), 2, gen)
        ref, got = run_both(head, policy, h, m, 2, state, gen, on_device)
        assert_same(ref, got, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_pooled_input(dtype: torch.dtype) -> None:
    """[CLS]+pooler output: the op takes the pooled (batch, hidden) rows and no mask."""
    head, hidden, mask, gen = make_inputs(5, 4, 19, 5, torch.float32)
    pooled = hidden[:, 0].to(dtype)
    policy, state = make_policy("patience", "some", head.classifier(pooled.float()), 2, gen)
    ref, got = run_both(head, policy, pooled, None, 2, state, gen, on_device)
    assert_same(ref, got, dtype)
    policy, state = policy_case("lte", "some", head, pooled, None, 2, gen)
    ref, got = run_both(head, policy, pooled, None, 2, state, gen, on_device)
    assert_same(ref, got, dtype)


def test_batch_of_zero_rows() -> None:
    logits, exit_mask = on_device(
        torch.randn(0, 3, 8), torch.ones(0, 3), torch.randn(2, 8), torch.randn(2),
        1, [0.5], 1, NUM_LAYERS, [], torch.zeros(0, dtype=torch.long),
        torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
    )  # fmt: skip
    assert logits.shape == (0, 2) and exit_mask.shape == (0,)


@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [case for case in BAD_ARGS if case[0] != "rows"],  # rows are not range-checked on device
)
def test_bad_arguments_are_named(arg: str, value: object, message: str) -> None:
    on_device(*good_args().values())  # the good arguments pass
    args = good_args()
    args[arg] = value
    with pytest.raises(RuntimeError, match=message):
        on_device(*args.values())


@pytest.mark.parametrize(("args", "message"), POLICY_BAD_ARGS)
def test_bad_policy_arguments_are_named(args: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        on_device(*args.values())


def test_triton_is_the_primary_gpu_backend() -> None:
    policy = make_policy("pcee", "all", torch.zeros(1, 2), 1, torch.Generator())[0]
    assert resolve_backend(None, policy, 2, "cuda") == "triton"
    assert fused_op("triton") is triton_kernel.exit_head_step_triton


@pytest.mark.parametrize("name", GOOD_POLICY_ARGS)
def test_opcheck(name: str) -> None:
    args = GOOD_POLICY_ARGS[name]()
    if name == "pcee":
        args["params"] = [0.9, 1.0]
    moved = to_device(list(args.values()))
    torch.library.opcheck(torch.ops.eeengine.exit_head_step_triton.default, tuple(moved))


def test_compiles_for_sm90_without_gpu() -> None:
    assert compile_for_sm90("exit_head_step") == 15
