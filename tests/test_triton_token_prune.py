"""The Triton kernel of token_prune (eeengine.kernels.token_prune) against the plain-torch
reference (eeengine.token_pruning.token_prune_reference), with the inputs, tolerances and bad
arguments of test_token_prune.py.

Kept indices and masks must be exactly equal (k = ceil(r c) included, at the keep ratios where
fp32 would round it differently); hidden states and memory per-dtype close. Without a GPU the
kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton); it costs tens of ms per row, so batches are small. bf16 is left
out: the interpreter's bf16 arithmetic is wrong. On a GPU the same tests run the compiled kernel
on CUDA tensors. The sm_90 build check compiles it in a subprocess (the interpreted kernel of
this process cannot be compiled).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.modeling_bert import attention_bias
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.token_pruning import TokenPruneOutput, num_kept, token_prune_reference
from tests.conftest import tiny_config
from tests.test_token_prune import (
    BAD_ARGS,
    KEEP_RATIOS,
    SEQ_LENS,
    assert_same,
    good_args,
    make_inputs,
    strided_inputs,
)
from tests.triton_support import DEVICE, compile_for_sm90, import_kernel

triton_kernel = import_kernel("token_prune")

DTYPES = [torch.float32, torch.float16]  # bf16: the interpreter's arithmetic is wrong
# (keep ratio, candidates c) where r c lands exactly on an integer in float64: one rounding step
# above it keeps one token more. In fp32 all but 0.7 * 10 (6.99999988 there) do round above.
BOUNDARY_CASES = [(0.1, 10), (0.3, 10), (0.6, 5), (0.2, 55), (0.7, 10)]


def on_device(*args: object) -> TokenPruneOutput:
    """The Triton op on every tensor argument moved to DEVICE, results back on the CPU."""
    moved = [a.to(DEVICE) if torch.is_tensor(a) else a for a in args]
    return TokenPruneOutput(*(t.cpu() for t in triton_kernel.token_prune(*moved)))


def check(inputs: tuple[Tensor, ...], keep_ratio: float, beta: float, dtype: torch.dtype) -> None:
    ref = token_prune_reference(*inputs, keep_ratio, beta)
    assert_same(on_device(*inputs, keep_ratio, beta), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_ratio", KEEP_RATIOS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@torch.inference_mode()
def test_matches_reference(seq_len: int, keep_ratio: float, dtype: torch.dtype) -> None:
    """Random right-padded rows (the first full length)."""
    check(make_inputs(4, seq_len, dtype=dtype), keep_ratio, 0.5, dtype)


@pytest.mark.parametrize(
    ("batch_size", "seq_len", "hidden_size", "heads", "head_size"),
    [(1, 23, 7, 1, 3), (1, 23, 384, 4, 8), (3, 23, 83, 12, 32), (2, 300, 64, 4, 16)],
)
@torch.inference_mode()
def test_shapes_match_reference(
    batch_size: int, seq_len: int, hidden_size: int, heads: int, head_size: int
) -> None:
    """Batch 1 and more; hidden and head sizes that are not powers of two or exceed one tile;
    one long row (BLOCK_N 512, several key and hidden-state tiles)."""
    inputs = make_inputs(batch_size, seq_len, hidden_size, heads, head_size)
    check(inputs, 0.7, 1.0, torch.float32)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32])
@torch.inference_mode()
def test_mask_dtypes_and_short_rows(mask_dtype: torch.dtype) -> None:
    """Rows of [CLS] alone, [CLS] + 1 and [CLS] + 2 tokens; the output mask keeps the input
    mask's dtype."""
    hidden, mask, query, key, memory = make_inputs(6, 9)
    mask[1:, :] = 0
    mask[1:, 0] = 1  # only [CLS]
    mask[2:, 1] = 1  # [CLS] + 1 token
    mask[4:, 2] = 1  # [CLS] + 2 tokens
    inputs = (hidden, mask.to(mask_dtype), query, key, memory)
    for keep_ratio in (0.0, 0.5, 1.0):
        check(inputs, keep_ratio, 0.5, torch.float32)


@torch.inference_mode()
def test_padding_row_without_cls() -> None:
    """A row of padding only (no real [CLS]): [CLS] copied with mask 0, nothing kept nor fused,
    as the reference and the C++ op."""
    hidden, mask, query, key, memory = make_inputs(3, 6)
    mask[2] = 0
    check((hidden, mask, query, key, memory), 0.5, 0.5, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.inference_mode()
def test_ties_and_zero_memory(dtype: torch.dtype) -> None:
    """Equal keys and a zero memory: every memory ties, the lowest positions are kept. β = 0:
    the memory stays 0, so the fusion token is the plain mean of the dropped tokens."""
    hidden, mask, query, key, memory = make_inputs(3, 12, dtype=dtype)
    key[:] = key[:, :, :1]  # every key equal: exact ties everywhere
    zero = memory * 0
    got = on_device(hidden, mask, query, key, zero, 0.5, 1.0)
    assert_same(got, token_prune_reference(hidden, mask, query, key, zero, 0.5, 1.0), dtype)
    assert got.kept_indices[0, :7].tolist() == list(range(7))
    got = on_device(hidden, mask, query, key, zero, 0.3, 0.0)
    assert_same(got, token_prune_reference(hidden, mask, query, key, zero, 0.3, 0.0), dtype)
    assert bool((got.memory == 0).all())
    fusion = hidden[0, 5:].float().mean(0).to(dtype)  # ceil(0.3 * 11) = 4 kept: 1..4
    torch.testing.assert_close(got.hidden_states[0, 5], fusion, atol=2e-3, rtol=2e-3)


@torch.inference_mode()
def test_keep_ratio_one_is_the_identity() -> None:
    hidden, mask, query, key, memory = make_inputs(4, 11)
    identity = on_device(hidden, mask, query, key, memory, 1.0, 0.5)
    assert torch.equal(identity.hidden_states, hidden * mask[..., None])
    assert torch.equal(identity.attention_mask, mask)
    assert torch.equal(identity.kept_indices, torch.where(mask.bool(), torch.arange(11), -1))


@pytest.mark.parametrize(("keep_ratio", "count"), BOUNDARY_CASES)
@torch.inference_mode()
def test_kept_count_is_ceil_in_float64(keep_ratio: float, count: int) -> None:
    """k = ceil(r c) exactly as num_kept (float64), where fp32 would mostly keep one more."""
    assert (keep_ratio * count).is_integer()
    fp32_kept = math.ceil(float(np.float32(keep_ratio)) * count)
    assert (fp32_kept != num_kept(count, keep_ratio)) == (keep_ratio != 0.7)
    hidden, mask, query, key, memory = make_inputs(2, count + 1, 16, 2, 4)
    mask[1] = torch.arange(count + 1) <= count // 2  # a shorter row too
    got = on_device(hidden, mask, query, key, memory, keep_ratio, 0.5)
    assert_same(
        got, token_prune_reference(hidden, mask, query, key, memory, keep_ratio, 0.5), torch.float32
    )
    kept = (got.kept_indices > 0).sum(1).tolist()
    assert kept == [num_kept(count, keep_ratio), num_kept(count // 2, keep_ratio)]


def test_split_keep_ratio_is_exact() -> None:
    for keep_ratio in [0.0, 1.0, 0.7, 0.1, 1 / 3, math.pi / 4, 1e-30, 0.9999999999999999]:
        hi, mid, lo = triton_kernel.split_keep_ratio(keep_ratio)
        assert all(float(np.float32(x)) == x for x in (hi, mid, lo))
        assert (hi + mid) + lo == keep_ratio


@torch.inference_mode()
def test_strided_inputs() -> None:
    """The layouts the runtime passes: keys and [CLS] query as SDPA head views of (B, N, H),
    sliced hidden states and memory."""
    inputs = strided_inputs()
    check(inputs, 0.6, 0.5, torch.float32)


def test_batch_of_zero_rows() -> None:
    out = on_device(
        torch.randn(0, 5, 8), torch.ones(0, 5), torch.randn(0, 2, 4), torch.randn(0, 2, 5, 4),
        torch.zeros(0, 4), 0.5, 1.0,
    )  # fmt: skip
    assert out.hidden_states.shape == (0, 4, 8) and out.kept_indices.shape == (0, 4)


@pytest.mark.parametrize(("arg", "value", "message"), BAD_ARGS)
def test_bad_arguments_are_named(arg: str, value: object, message: str) -> None:
    on_device(*good_args().values())  # the good arguments pass
    args = good_args()
    args[arg] = value
    with pytest.raises(RuntimeError, match=message):
        on_device(*args.values())


@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_opcheck(keep_ratio: float) -> None:
    args = good_args()
    args["attention_mask"][1, 3:] = 0
    args["keep_ratio"] = keep_ratio
    moved = tuple(a.to(DEVICE) if torch.is_tensor(a) else a for a in args.values())
    torch.library.opcheck(torch.ops.eeengine.token_prune_triton.default, moved)


def test_prune_op_per_backend() -> None:
    """The runtime prunes with the Triton op on the GPU backends."""
    assert _custom_ops.prune_op("triton") is triton_kernel.token_prune
    assert _custom_ops.prune_op("cuda") is triton_kernel.token_prune
    assert _custom_ops.prune_op("cpp") is _custom_ops.token_prune
    assert _custom_ops.prune_op("reference") is token_prune_reference


@torch.inference_mode()
def test_pruned_layer_matches_reference() -> None:
    """A BERT layer's pruned_forward (attention, prune, feed-forward), as the runtime calls it
    on the "triton" backend: the SDPA query/key views go to the op as they are."""
    torch.manual_seed(0)
    layer = MultiExitBert(tiny_config(num_hidden_layers=1), num_labels=2).eval().backbone.layers[0]
    hidden, mask, _, _, memory = make_inputs(3, 9, hidden_size=32)
    args = tuple(t.to(DEVICE) for t in (hidden, attention_bias(mask), mask, memory))
    layer = layer.to(DEVICE)
    ref = layer.pruned_forward(*args, 0.6, 0.5, token_prune_reference)
    got = layer.pruned_forward(*args, 0.6, 0.5, _custom_ops.prune_op("triton"))
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-5, rtol=1e-5)


def test_compiles_for_sm90_without_gpu() -> None:
    assert compile_for_sm90("token_prune") == 2
