"""The fused seeded dropout (csrc/seeded_dropout.cpp) against its plain-torch twin, the
dropout contract (keep rate, expectation, gradient = the same mask) and the module's fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eeengine import _custom_ops, dropout
from eeengine.dropout import Dropout, seeded_dropout_reference

needs_c = pytest.mark.skipif(not _custom_ops.HAS_C, reason=str(_custom_ops.LOAD_ERROR))

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (2, 3, 7), (64, 33, 40)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 12345, -(1 << 63), (1 << 63) - 1])
def test_op_equals_reference(dtype: torch.dtype, shape: tuple, p: float, seed: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(_custom_ops.seeded_dropout(x, p, seed), seeded_dropout_reference(x, p, seed))


@needs_c
def test_non_contiguous_input_and_special_values() -> None:
    x = torch.randn(6, 10).t()  # a strided view
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -0.0
    out = _custom_ops.seeded_dropout(x, 0.5, 7)
    assert out.is_contiguous() and out.shape == x.shape
    torch.testing.assert_close(out, seeded_dropout_reference(x, 0.5, 7), equal_nan=True)
    assert _custom_ops.seeded_dropout(torch.empty(0, 3), 0.1, 1).shape == (0, 3)


@needs_c
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_keep_rate_and_expectation_per_lane(p: float) -> None:
    """Each of the four lanes of a 64-bit draw keeps ~1 - p of its elements (binomial, 250k
    draws per lane: 5 standard deviations ~ 0.003), and the mean of ones is kept."""
    ones = torch.ones(1_000_000)
    out = _custom_ops.seeded_dropout(ones, p, 2024)
    kept = (out != 0).view(-1, 4).float().mean(dim=0)
    torch.testing.assert_close(kept, torch.full((4,), 1 - p), atol=0.003, rtol=0)
    assert abs(out.mean().item() - 1.0) < 0.005
    kept_values = out[out != 0]
    torch.testing.assert_close(
        kept_values, torch.full_like(kept_values, 1 / (1 - p)), rtol=1e-4, atol=0
    )


@needs_c
def test_seed_decides_the_mask() -> None:
    x = torch.randn(4096)
    same = _custom_ops.seeded_dropout(x, 0.5, 3), _custom_ops.seeded_dropout(x, 0.5, 3)
    assert torch.equal(*same)
    other = _custom_ops.seeded_dropout(x, 0.5, 4)
    assert ((same[0] == 0) != (other == 0)).float().mean() > 0.4  # ~half differ for p = 0.5


@needs_c
def test_op_rejects_bad_arguments() -> None:
    with pytest.raises(RuntimeError, match="p must be in"):
        _custom_ops.seeded_dropout(torch.ones(3), 1.5, 0)


@needs_c
def test_gradient_is_the_forward_mask() -> None:
    x = torch.randn(8, 9, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    out = dropout.dropout(x, 0.4, True)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = out != 0
    torch.testing.assert_close(x.grad, torch.where(kept, grad / 0.6, 0.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(out, torch.where(kept, x.detach() / 0.6, 0.0), rtol=1e-4, atol=0)
    seeded = lambda t: dropout._SeededDropout.apply(t, 0.4, 99)  # noqa: E731
    assert torch.autograd.gradcheck(
        seeded, (torch.randn(5, 6, dtype=torch.float64, requires_grad=True),)
    )


@needs_c
def test_manual_seed_reproduces_and_eval_is_identity() -> None:
    layer = Dropout(0.1)
    x = torch.randn(32, 64)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(first, layer(x))
    assert not torch.equal(first, layer(x))  # a fresh seed per call
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0).train()(x) is x


def test_falls_back_to_torch_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension (or off the CPU) the module is ``F.dropout``: same draws."""
    monkeypatch.setattr(_custom_ops, "HAS_C", False)
    x = torch.randn(50, 50)
    torch.manual_seed(3)
    ours = Dropout(0.2)(x)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.2, True))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout.dropout(x, 1.5, True)


@needs_c
def test_fused_path_rejects_bad_probability() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout.dropout(torch.ones(3), -0.1, True)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_training_attention_is_sdpa_with_the_seeded_mask(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, padded: bool
) -> None:
    """CPU training attention = softmax(q k^T / sqrt(d), masked) -> seeded dropout -> @ v: the
    seeded mask applied to SDPA's probabilities, and SDPA itself when the mask keeps all."""
    from eeengine import modeling_bert

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 2, 5, 4, generator=generator).to(dtype) for _ in "qkv")
    bias = None
    if padded:
        bias = torch.ones(3, 1, 1, 5, dtype=torch.bool)
        bias[1, ..., 3:] = False
    monkeypatch.setattr(modeling_bert, "dropout", lambda x, p, training: x)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    got = modeling_bert.attention(query, key, value, bias, 0.1)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, expected, **tolerance)

    seen = []
    monkeypatch.setattr(
        modeling_bert,
        "dropout",
        lambda x, p, training: seen.append((x.dtype, p)) or seeded_dropout_reference(x, p, 7),
    )
    got = modeling_bert.attention(query.float(), key.float(), value.float(), bias, 0.3)
    scores = query.float() @ key.float().transpose(-1, -2) / 2.0
    if padded:
        scores = scores.masked_fill(~bias, float("-inf"))
    mask = seeded_dropout_reference(torch.ones(3, 2, 5, 5), 0.3, 7)
    torch.testing.assert_close(got, (scores.softmax(-1) * mask) @ value.float())
    assert seen == [(torch.float32, 0.3)]
