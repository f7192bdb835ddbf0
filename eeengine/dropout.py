"""Dropout for CPU training: a counter-based mask, fused in C++.

torch's CPU dropout draws one Bernoulli sample per element and then multiplies twice; on the
default checkpoint's SST-2 batches (128 rows, bf16 autocast) the hidden-state dropouts took
about 18 % of a training step. :class:`Dropout` keeps ``nn.Dropout``'s meaning (inverted
dropout, identity in eval mode) and, on CPU with the compiled extension, draws the mask from a
counter-based hash (splitmix64 of the seed and the element's index) in one parallel pass.
Backward needs no stored mask: it recomputes it from the seed. The seed of each call comes from
torch's default CPU generator, so ``torch.manual_seed`` makes a run reproducible. Elsewhere (CUDA,
or no extension) it is ``nn.Dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eeengine import _custom_ops

GOLDEN = 0x9E3779B97F4A7C15
MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
UINT64 = 1 << 64


def _as_int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - UINT64 if value >= 1 << 63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def seeded_dropout_reference(input: Tensor, p: float, seed: int) -> Tensor:
    """Plain-torch twin of :func:`eeengine._custom_ops.seeded_dropout` (same mask, same values).

    Element ``i`` of the flattened tensor is kept when bits ``[16 * (i % 4), 16 * (i % 4) + 16)``
    of ``splitmix64(seed + (i // 4 + 1) * 0x9E3779B97F4A7C15)`` (Steele et al. 2014's finalizer)
    are, as an unsigned number, at least ``t = round(p * 65536)``. Each element is multiplied,
    in fp32 (fp64 for fp64 input), by ``65536 / (65536 - t)`` if kept and by 0 if dropped (a
    dropped NaN stays NaN, as in ``F.dropout``), and rounded once to ``input``'s dtype. int64
    arithmetic wraps modulo 2^64, as the C++ uint64 arithmetic does.

    Args:
        input: any shape, floating point.
        p: drop probability in [0, 1].
        seed: any int64.

    Returns:
        ``input``'s shape and dtype.
    """
    numel = input.numel()
    groups = torch.arange(1, (numel + 3) // 4 + 1, dtype=torch.int64)
    z = groups * _as_int64(GOLDEN) + _as_int64(seed % UINT64)
    for shift, multiplier in zip((30, 27), MIX, strict=True):
        z = (z ^ _shift_right(z, shift)) * _as_int64(multiplier)
    z = z ^ _shift_right(z, 31)
    lanes = torch.stack([_shift_right(z, 16 * lane) & 0xFFFF for lane in range(4)], dim=1)
    draws = lanes.reshape(-1)[:numel].reshape(input.shape)
    threshold = round(p * 65536)
    scale = 0.0 if threshold >= 65536 else 65536 / (65536 - threshold)
    opmath = torch.promote_types(input.dtype, torch.float32)
    factor = torch.where(draws >= threshold, torch.tensor(scale, dtype=opmath), 0.0)
    return (input.to(opmath) * factor).to(input.dtype)


class _SeededDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return _custom_ops.seeded_dropout(input, p, seed)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        return _custom_ops.seeded_dropout(grad_output, ctx.p, ctx.seed), None, None


def dropout(input: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(input, p, training)``, with the fused seeded mask on CPU where the extension
    is built (a fresh seed per call from torch's default CPU generator).

    Args:
        input: any shape, floating point.
        p: drop probability in [0, 1].
        training: False (or ``p == 0``) returns ``input`` unchanged.

    Returns:
        ``input``'s shape and dtype.

    Raises:
        ValueError: ``p`` outside [0, 1] (``F.dropout``'s check).
    """
    if not training or p == 0.0:
        return input
    if input.device.type != "cpu" or not _custom_ops.HAS_C:
        return F.dropout(input, p, True)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
    return _SeededDropout.apply(input, p, seed)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same state dict: none) running :func:`dropout`."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training)
