"""token_prune: the plain-torch reference against hand-computed cases, and the fused C++ op
against the reference (eeengine.token_pruning.token_prune_reference).

Kept indices and masks must be exactly equal; hidden states and memory are compared with one
per-dtype tolerance table (kept tokens are copies, only the fusion token and the memory are
computed).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from eeengine._custom_ops import HAS_C, LOAD_ERROR, token_prune
from eeengine.token_pruning import (
    TokenPruneOutput,
    TokenPruning,
    cls_attention,
    pruned_length,
    token_prune_reference,
)

requires_c = pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")

SEED = 0
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Op (fp32 math on the dtype's inputs) against the reference on the same inputs: the memory is
# fp32 in both; the fusion token is rounded to the dtype, so it may differ by one unit there.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
KEEP_RATIOS = [0.0, 0.3, 0.7, 1.0]
SEQ_LENS = [1, 2, 3, 7, 83]
BATCH_SIZES = [1, 13]
HIDDEN_SIZES = [7, 83, 384]


def make_inputs(
    batch_size: int,
    seq_len: int,
    hidden_size: int = 83,
    heads: int = 3,
    head_size: int = 5,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random right-padded inputs (first row full length, every row has [CLS]) and a random
    non-negative memory."""
    gen = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(batch_size, seq_len, hidden_size, generator=gen).to(dtype)
    lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    query = (torch.randn(batch_size, heads, head_size, generator=gen) * 2).to(dtype)
    key = torch.randn(batch_size, heads, seq_len, head_size, generator=gen).to(dtype)
    memory = torch.rand(batch_size, seq_len - 1, generator=gen) / seq_len
    return hidden, mask, query, key, memory


def assert_same(got: TokenPruneOutput, ref: TokenPruneOutput, dtype: torch.dtype) -> None:
    assert got.hidden_states.dtype == ref.hidden_states.dtype
    assert got.attention_mask.dtype == ref.attention_mask.dtype
    assert got.memory.dtype == torch.float32 and got.kept_indices.dtype == torch.long
    assert torch.equal(got.kept_indices, ref.kept_indices)
    assert torch.equal(got.attention_mask, ref.attention_mask)
    torch.testing.assert_close(got.memory, ref.memory, **TOLERANCES[torch.float32])
    torch.testing.assert_close(got.hidden_states, ref.hidden_states, **TOLERANCES[dtype])


# --- the reference on cases computed by hand -------------------------------------------------


def one_head_inputs(weights: list[float], hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query and keys of one head (head_size 1) whose [CLS] attention is ``weights``
    normalised: q = 1, k_n = log w_n, so softmax(q k) = w / sum(w). Mask all ones."""
    key = torch.tensor(weights).log().view(1, 1, -1, 1)
    return torch.ones(1, hidden.shape[1]), torch.ones(1, 1, 1), key


def test_reference_by_hand() -> None:
    hidden = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)
    # [CLS] attention 0.1, then 0.3, 0.05, 0.25, 0.2, 0.1 on tokens 1..5.
    mask, query, key = one_head_inputs([0.1, 0.3, 0.05, 0.25, 0.2, 0.1], hidden)
    memory = torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.2]])
    out = token_prune_reference(hidden, mask, query, key, memory, keep_ratio=0.5, beta=0.5)
    # m = 0.5 m + 0.5 a = [0.15, 0.225, 0.125, 0.1, 0.15]; k = ceil(0.5 * 5) = 3 keeps
    # positions 2 (0.225), 1 and 5 (0.15); drops 3 (0.125) and 4 (0.1).
    expected_memory = [0.15, 0.225, 0.15, 0.225]  # kept in order, then the fusion's sum
    assert out.kept_indices.tolist() == [[0, 1, 2, 5, -1]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1]]
    torch.testing.assert_close(out.memory, torch.tensor([expected_memory]))
    fusion = (0.125 * hidden[0, 3] + 0.1 * hidden[0, 4]) / 0.225
    expected = torch.stack([hidden[0, 0], hidden[0, 1], hidden[0, 2], hidden[0, 5], fusion])
    torch.testing.assert_close(out.hidden_states[0], expected)


def test_ties_keep_the_lower_position() -> None:
    """Equal keys give equal attention: the lowest positions are kept, the fusion token is the
    plain mean of the rest (the renormalised weights are uniform)."""
    hidden = torch.randn(1, 9, 4)
    key = torch.ones(1, 2, 9, 3)
    out = token_prune_reference(
        hidden, torch.ones(1, 9), torch.randn(1, 2, 3), key, torch.zeros(1, 8), 0.5, 1.0
    )
    assert out.kept_indices.tolist() == [[0, 1, 2, 3, 4, -1]]
    torch.testing.assert_close(out.hidden_states[0, -1], hidden[0, 5:].mean(0))
    torch.testing.assert_close(out.memory[0], torch.tensor([1 / 9] * 4 + [4 / 9]))


def test_zero_memory_fuses_uniformly() -> None:
    """β = 0 and a zero memory: every weight is 0, so the fusion token is the plain mean."""
    hidden = torch.randn(1, 5, 4)
    out = token_prune_reference(
        hidden, torch.ones(1, 5), torch.randn(1, 1, 2), torch.randn(1, 1, 5, 2),
        torch.zeros(1, 4), 0.5, 0.0,
    )  # fmt: skip
    assert out.kept_indices.tolist() == [[0, 1, 2, -1]]
    torch.testing.assert_close(out.hidden_states[0, -1], hidden[0, 3:].mean(0))


def test_cls_attention_ignores_padding() -> None:
    _, mask, query, key, _ = make_inputs(4, 9)
    attention = cls_attention(query, key, mask)
    torch.testing.assert_close(attention.sum(1), torch.ones(4))
    assert bool((attention[mask == 0] == 0).all())
    length = int(mask[1].sum())
    one_row = cls_attention(query[1:2], key[1:2, :, :length], mask[1:2, :length])
    torch.testing.assert_close(attention[1:2, :length], one_row)


@pytest.mark.parametrize("keep_ratio", KEEP_RATIOS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_reference_invariants(seq_len: int, keep_ratio: float) -> None:
    """Per row: [CLS] first, ceil(r c) kept in order, fusion iff a token was dropped, padding
    never kept, memory gathered with the kept indices, memory total preserved."""
    hidden, mask, query, key, memory = make_inputs(13, seq_len)
    beta = 0.5
    out = token_prune_reference(hidden, mask, query, key, memory, keep_ratio, beta)
    updated = 0.5 * memory + 0.5 * cls_attention(query, key, mask)[:, 1:]
    assert out.hidden_states.shape == (13, pruned_length(seq_len, keep_ratio), 83)
    for row in range(13):
        count = int(mask[row].sum()) - 1
        kept = math.ceil(keep_ratio * count)
        length = pruned_length(count + 1, keep_ratio)
        indices = out.kept_indices[row].tolist()
        assert indices[0] == 0
        assert out.attention_mask[row].tolist() == [1] * length + [0] * (len(indices) - length)
        positions = indices[1 : 1 + kept]
        assert positions == sorted(positions) and all(1 <= p <= count for p in positions)
        assert indices[1 + kept :] == [-1] * (len(indices) - 1 - kept)
        torch.testing.assert_close(out.hidden_states[row, : 1 + kept], hidden[row, [0, *positions]])
        torch.testing.assert_close(out.memory[row, :kept], updated[row, [p - 1 for p in positions]])
        torch.testing.assert_close(out.memory[row].sum(), updated[row, :count].sum())
        assert bool((out.hidden_states[row, length:] == 0).all())
        dropped = sorted(set(range(1, count + 1)) - set(positions))
        if dropped:  # every dropped token ranks below (or ties after) every kept one
            lowest_kept = min(updated[row, [p - 1 for p in positions]].tolist(), default=math.inf)
            assert lowest_kept >= max(updated[row, [p - 1 for p in dropped]].tolist())


def test_keep_ratio_one_is_the_identity() -> None:
    hidden, mask, query, key, memory = make_inputs(13, 11)
    out = token_prune_reference(hidden, mask, query, key, memory, 1.0, 0.5)
    assert torch.equal(out.hidden_states, hidden * mask[..., None])
    assert torch.equal(out.attention_mask, mask)
    assert torch.equal(out.kept_indices, torch.where(mask.bool(), torch.arange(11), -1))


def test_padding_is_never_kept_nor_fused() -> None:
    """Garbage in the padding (huge hidden states, keys that would win the attention) changes
    nothing."""
    hidden, mask, query, key, memory = make_inputs(13, 17)
    ref = token_prune_reference(hidden, mask, query, key, memory, 0.6, 0.5)
    pad = mask == 0
    hidden[pad] = 1e4
    key.transpose(1, 2)[pad] = query.unsqueeze(1).expand(-1, 17, -1, -1)[pad] * 100
    memory[pad[:, 1:]] = 10.0
    got = token_prune_reference(hidden, mask, query, key, memory, 0.6, 0.5)
    assert torch.equal(got.kept_indices, ref.kept_indices)
    torch.testing.assert_close(got.hidden_states, ref.hidden_states)
    torch.testing.assert_close(got.memory, ref.memory)


def test_gradients_reach_kept_and_fused_tokens() -> None:
    hidden, mask, query, key, memory = make_inputs(2, 9)
    hidden.requires_grad_(True)
    out = token_prune_reference(hidden, mask, query, key, memory, 0.5, 1.0)
    out.hidden_states.sum().backward()
    reached = hidden.grad.abs().sum(-1) > 0
    assert torch.equal(reached, mask.bool())  # kept ones directly, dropped ones via fusion


# --- the schedule ----------------------------------------------------------------------------


def test_schedule_json_round_trip_and_tokens_per_layer() -> None:
    schedule = TokenPruning.from_json({"layers": [2, 4], "keep_ratio": 0.7, "beta": [1, 0.5]}, 6)
    assert schedule == TokenPruning((2, 4), 0.7, (1.0, 0.5))
    assert TokenPruning.from_json(schedule.to_json(), 6) == schedule
    assert schedule.beta_at(4) == 0.5 and schedule.beta_at(3) is None
    # 21 tokens: layer 2 keeps ceil(0.7 * 20) = 14 + [CLS] + fusion = 16; layer 4 keeps
    # ceil(0.7 * 15) = 11 + 2 = 13.
    assert schedule.tokens_per_layer(21, 6) == [21, 16, 16, 13, 13, 13]
    assert schedule.tokens_per_layer(4, 6) == [4] * 6  # ceil(0.7 * 3) = 3: nothing dropped


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([2, 4], "keys layers, keep_ratio, beta"),
        ({"layers": [4, 2], "keep_ratio": 0.7, "beta": [1, 1]}, "token_pruning.layers"),
        ({"layers": [2, 7], "keep_ratio": 0.7, "beta": [1, 1]}, r"layers in \[1, 6\]"),
        ({"layers": [2], "keep_ratio": 0.0, "beta": [1]}, "keep_ratio must be in"),
        ({"layers": [2], "keep_ratio": 0.7, "beta": [1, 1]}, "one value in"),
        ({"layers": [2], "keep_ratio": 0.7, "beta": [1.5]}, "token_pruning.beta"),
    ],
)
def test_schedule_rejects_bad_values(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenPruning.from_json(value, 6)


# --- the C++ op against the reference --------------------------------------------------------


@requires_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep_ratio", KEEP_RATIOS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@torch.inference_mode()
def test_op_matches_reference(seq_len: int, keep_ratio: float, dtype: torch.dtype) -> None:
    inputs = make_inputs(13, seq_len, dtype=dtype)
    for beta in (1.0, 0.5):
        ref = token_prune_reference(*inputs, keep_ratio, beta)
        assert_same(token_prune(*inputs, keep_ratio, beta), ref, dtype)


@requires_c
@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@torch.inference_mode()
def test_op_shapes_match_reference(batch_size: int, hidden_size: int) -> None:
    inputs = make_inputs(batch_size, 23, hidden_size, heads=4, head_size=8)
    assert_same(
        token_prune(*inputs, 0.7, 0.5), token_prune_reference(*inputs, 0.7, 0.5), torch.float32
    )


@requires_c
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32])
@torch.inference_mode()
def test_op_mask_dtypes_and_short_rows(mask_dtype: torch.dtype) -> None:
    hidden, mask, query, key, memory = make_inputs(6, 9)
    mask[1:, :] = 0
    mask[1:, 0] = 1  # only [CLS]
    mask[2:, 1] = 1  # [CLS] + 1 token
    mask[4:, 2] = 1  # [CLS] + 2 tokens
    inputs = (hidden, mask.to(mask_dtype), query, key, memory)
    for keep_ratio in (0.0, 0.5, 1.0):
        ref = token_prune_reference(*inputs, keep_ratio, 0.5)
        assert_same(token_prune(*inputs, keep_ratio, 0.5), ref, torch.float32)


@requires_c
@torch.inference_mode()
def test_op_ties_and_identity() -> None:
    hidden, mask, query, key, memory = make_inputs(5, 12)
    key[:] = key[:, :, :1]  # every key equal: exact ties everywhere
    ref = token_prune_reference(hidden, mask, query, key, memory * 0, 0.5, 1.0)
    got = token_prune(hidden, mask, query, key, memory * 0, 0.5, 1.0)
    assert_same(got, ref, torch.float32)
    assert got.kept_indices[0, :7].tolist() == list(range(7))
    identity = token_prune(hidden, mask, query, key, memory, 1.0, 0.5)
    assert torch.equal(identity.hidden_states, hidden * mask[..., None])
    assert torch.equal(identity.attention_mask, mask)


def strided_inputs() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Non-contiguous inputs as the runtime passes them: keys and [CLS] query as SDPA head views
    of (B, N, H), sliced hidden states and memory; rows of 10, 3, 7, 10 and 1 tokens."""
    gen = torch.Generator().manual_seed(SEED)
    batch_size, seq_len, heads, head_size = 5, 10, 4, 8
    projected = torch.randn(batch_size, seq_len, heads * head_size, generator=gen)
    heads_view = projected.view(batch_size, seq_len, heads, head_size).transpose(1, 2)
    hidden = torch.randn(batch_size, 12, 83, generator=gen)[:, 1:11]
    mask = (torch.arange(seq_len) < torch.tensor([10, 3, 7, 10, 1])[:, None]).long()
    memory = torch.rand(batch_size, 12, generator=gen)[:, : seq_len - 1]
    inputs = (hidden, mask, heads_view[:, :, 0], heads_view, memory)
    assert not any(t.is_contiguous() for t in (hidden, heads_view, memory))
    return inputs


@requires_c
@torch.inference_mode()
def test_op_strided_inputs() -> None:
    """The layouts the runtime passes: keys and [CLS] query as SDPA head views of (B, N, H)."""
    inputs = strided_inputs()
    assert_same(
        token_prune(*inputs, 0.6, 0.5), token_prune_reference(*inputs, 0.6, 0.5), torch.float32
    )


@requires_c
def test_batch_of_zero_rows() -> None:
    out = token_prune(
        torch.randn(0, 5, 8), torch.ones(0, 5), torch.randn(0, 2, 4), torch.randn(0, 2, 5, 4),
        torch.zeros(0, 4), 0.5, 1.0,
    )  # fmt: skip
    assert out.hidden_states.shape == (0, 4, 8) and out.kept_indices.shape == (0, 4)


def good_args() -> dict:
    return {
        "hidden_states": torch.randn(3, 6, 8),
        "attention_mask": torch.ones(3, 6, dtype=torch.long),
        "cls_query": torch.randn(3, 2, 4),
        "key": torch.randn(3, 2, 6, 4),
        "memory": torch.rand(3, 5),
        "keep_ratio": 0.5,
        "beta": 0.5,
    }


BAD_ARGS = [
    ("hidden_states", torch.randn(3, 6), "hidden_states must have shape"),
    ("hidden_states", torch.randn(3, 6, 8).double(), "hidden_states must be float32"),
    ("attention_mask", torch.ones(3, 5), "attention_mask must have shape"),
    ("cls_query", torch.randn(3, 2), "cls_query must have shape"),
    ("key", torch.randn(3, 2, 5, 4), "key must have shape"),
    ("key", torch.randn(3, 2, 6, 4).half(), "cls_query and key must have the dtype"),
    ("memory", torch.rand(3, 6), "memory must have shape"),
    ("memory", torch.rand(3, 5).double(), "memory must be float32"),
    ("keep_ratio", 1.5, "keep_ratio must be in"),
    ("beta", -0.1, "beta must be in"),
]


@requires_c
@pytest.mark.parametrize(("arg", "value", "message"), BAD_ARGS)
def test_bad_arguments_are_named(arg: str, value: object, message: str) -> None:
    token_prune(**good_args())  # the good arguments pass
    args = good_args()
    args[arg] = value
    with pytest.raises(RuntimeError, match=message):
        token_prune(**args)


@requires_c
@pytest.mark.parametrize("keep_ratio", [0.5, 1.0])
def test_opcheck(keep_ratio: float) -> None:
    args = good_args()
    args["attention_mask"][1, 3:] = 0
    args["keep_ratio"] = keep_ratio
    torch.library.opcheck(torch.ops.eeengine.token_prune.default, tuple(args.values()))


@requires_c
def test_torch_compile_fullgraph() -> None:
    """The fake impl's static output width lets the op trace into one graph."""
    inputs = make_inputs(4, 9)

    def step(hidden: Tensor, memory: Tensor) -> tuple[Tensor, ...]:
        return tuple(token_prune(hidden * 1.0, inputs[1], inputs[2], inputs[3], memory, 0.6, 0.5))

    expected = step(inputs[0], inputs[4])
    got = torch.compile(step, fullgraph=True)(inputs[0], inputs[4])
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
