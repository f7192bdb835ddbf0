"""MPEE token-wise exit: the pruning schedule and the plain-torch ``token_prune`` reference.

At each pruning layer l of the schedule, after the layer's attention sublayer and before its
feed-forward sublayer (Kong et al. 2022, MPEE, section 3.1), every row:

1. recomputes the [CLS] row of the attention, softmax over the row's real keys of
   q_cls · K / sqrt(d), averaged over heads: a_l (MPEE eq. 5), over the non-[CLS] tokens;
2. updates the class-attention memory m_l = (1 - β_l) · m_{l-1} + β_l · a_l (eq. 6);
3. keeps the k = ceil(r · c) tokens with the highest memory, c being the row's real
   non-[CLS] tokens (eq. 7 with r = 1 - R_ee); ties go to the lower position. Padding is never
   kept and never fused;
4. folds the c - k dropped tokens into one fusion token (eq. 8),
   h_fuse = Σ_{j dropped} w_j · h_j with w_j = m_j / Σ_{i dropped} m_i, i.e. the memory
   **renormalised to sum to 1 over the dropped tokens** (uniform weights 1 / (c - k) if that
   sum is 0). MPEE and EViT weight by the raw attention, which shrinks the fusion token towards
   zero as more tokens are dropped; renormalised, it is a convex combination of real hidden
   states and stays on their scale (they come out of a LayerNorm). The fusion token's memory is
   Σ_{dropped} m_j, the attention mass it stands for, so pruning preserves the memory's total.
   A later pruning layer treats the fusion token like any other token (as EViT does);
5. lays the row out as [CLS], the kept tokens in their original order, the fusion token (only
   if a token was dropped), then right padding. The memory is gathered with the same indices
   (MPEE's code does not gather it, so its memory no longer lines up with the tokens).

Keep ratio r = 1 drops nothing and appends no fusion token: the layer is unchanged.

The output width is static, :func:`pruned_length` of the input width (the length of a row whose
tokens are all real); in the runtime the widest row always fills its batch, so the output is
padded to the batch maximum exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

# The default schedule for a 6-layer model (DESIGN.md, "Training recipes"): MPEE's 12-layer
# setting (prune in more layers, keep 70 %, β = 0.5) rescaled to 6 layers.
DEFAULT_TOKEN_PRUNING = {"layers": [2, 4], "keep_ratio": 0.7, "beta": [1.0, 0.5]}


@dataclass(frozen=True)
class TokenPruning:
    """A token-pruning schedule (``eeengine.json`` field ``token_pruning``).

    Attributes:
        layers: 1-based layers after whose attention sublayer tokens are pruned, ascending.
        keep_ratio: r in (0, 1], the share of each row's real non-[CLS] tokens kept.
        beta: β_l of the class-attention memory, one per pruning layer.
    """

    layers: tuple[int, ...]
    keep_ratio: float
    beta: tuple[float, ...]

    @classmethod
    def from_json(cls, value: Mapping, num_layers: int) -> TokenPruning:
        """Parse and validate the ``token_pruning`` field of ``eeengine.json``.

        Args:
            value: ``{"layers": [int, ...], "keep_ratio": float, "beta": [float, ...]}``.
            num_layers: depth of the model.

        Raises:
            ValueError: a missing or bad entry (named).
        """
        if not isinstance(value, Mapping) or set(value) != {"layers", "keep_ratio", "beta"}:
            raise ValueError(
                f"token_pruning must be null or an object with keys layers, keep_ratio, beta; "
                f"got {value!r}"
            )
        layers, ratio, beta = value["layers"], value["keep_ratio"], value["beta"]
        if (
            not isinstance(layers, Sequence)
            or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or list(layers) != sorted(set(layers))
            or not 1 <= layers[0] <= layers[-1] <= num_layers
        ):
            raise ValueError(
                f"token_pruning.layers must be distinct ascending layers in [1, {num_layers}], "
                f"got {layers!r}"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"token_pruning.keep_ratio must be in (0, 1], got {ratio!r}")
        if (
            not isinstance(beta, Sequence)
            or len(beta) != len(layers)
            or not all(
                isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b <= 1 for b in beta
            )
        ):
            raise ValueError(
                f"token_pruning.beta must hold one value in [0, 1] per pruning layer "
                f"({len(layers)}), got {beta!r}"
            )
        return cls(tuple(layers), float(ratio), tuple(float(b) for b in beta))

    def to_json(self) -> dict:
        """The ``eeengine.json`` form, the inverse of :meth:`from_json`."""
        return {"layers": list(self.layers), "keep_ratio": self.keep_ratio, "beta": list(self.beta)}

    @property
    def indices(self) -> tuple[int, ...]:
        """The pruning layers 0-based (the executors' and ``backbone.layers``' indexing)."""
        return tuple(layer - 1 for layer in self.layers)

    def beta_at(self, layer: int) -> float | None:
        """β of ``layer`` (1-based), or None where the layer does not prune."""
        return self.beta[self.layers.index(layer)] if layer in self.layers else None

    def tokens_per_layer(self, length: int, num_layers: int) -> list[int]:
        """Real tokens of a row of ``length`` tokens after each layer (its feed-forward's input
        width), layer 1 first. Pruning depends only on the row's own length."""
        tokens = []
        for layer in range(1, num_layers + 1):
            if layer in self.layers:
                length = pruned_length(length, self.keep_ratio)
            tokens.append(length)
        return tokens


def num_kept(num_candidates: int, keep_ratio: float) -> int:
    """k = ceil(r · c): the non-[CLS] tokens kept out of c (in float64, as the C++ op)."""
    return math.ceil(keep_ratio * num_candidates)


def pruned_length(length: int, keep_ratio: float) -> int:
    """Tokens of a row of ``length`` real tokens ([CLS] included) after pruning:
    1 + k + (1 if k < length - 1, the fusion token), k = :func:`num_kept` of length - 1."""
    if length <= 1:
        return length
    kept = num_kept(length - 1, keep_ratio)
    return 1 + kept + int(kept < length - 1)


class TokenPruneOutput(NamedTuple):
    """Result of ``token_prune`` (reference and op).

    Attributes:
        hidden_states: (batch_size, out_len, hidden_size), the input dtype; [CLS], kept
            tokens in order, fusion token, zero padding.
        attention_mask: (batch_size, out_len), the input mask's dtype, 1 for real tokens.
        memory: (batch_size, out_len - 1) float32, the class-attention memory of every
            non-[CLS] output token (0 on padding).
        kept_indices: (batch_size, out_len) int64, the input position of every output token:
            0 for [CLS], -1 for the fusion token and for padding.
    """

    hidden_states: Tensor
    attention_mask: Tensor
    memory: Tensor
    kept_indices: Tensor


def cls_attention(cls_query: Tensor, key: Tensor, attention_mask: Tensor) -> Tensor:
    """The head-averaged [CLS] attention row (MPEE eq. 5), in fp32.

    a_n = mean_h softmax_{n real}(q_cls,h · K_h,n · d^-1/2); 0 on padding (and on a row with no
    real token).

    Args:
        cls_query: (batch_size, num_heads, head_size), the [CLS] query.
        key: (batch_size, num_heads, seq_len, head_size).
        attention_mask: (batch_size, seq_len), 1 for real tokens.

    Returns:
        (batch_size, seq_len) float32, [CLS] itself at position 0.
    """
    padding = ~attention_mask.bool()[:, None, :]
    scores = (key.float() * cls_query.float().unsqueeze(2)).sum(-1) * (
        1.0 / math.sqrt(key.shape[-1])
    )
    probs = scores.masked_fill(padding, -math.inf).softmax(-1).masked_fill(padding, 0.0)
    return probs.mean(1)


def token_prune_reference(
    hidden_states: Tensor,
    attention_mask: Tensor,
    cls_query: Tensor,
    key: Tensor,
    memory: Tensor,
    keep_ratio: float,
    beta: float,
) -> TokenPruneOutput:
    """MPEE token pruning in plain torch (see the module docstring for the rule): the twin of
    :func:`eeengine._custom_ops.token_prune` and the ground truth it is tested against.
    Differentiable in ``hidden_states`` (kept tokens and fusion token) for training.

    Args:
        hidden_states: (batch_size, seq_len, hidden_size), the attention sublayer's output.
        attention_mask: (batch_size, seq_len), 1 for real tokens, any dtype; [CLS] at 0.
        cls_query: (batch_size, num_heads, head_size), the layer's query of [CLS].
        key: (batch_size, num_heads, seq_len, head_size), the layer's keys.
        memory: (batch_size, seq_len - 1) float32, m_{l-1} of the non-[CLS] tokens (zeros
            before the first pruning layer).
        keep_ratio: r in [0, 1].
        beta: β_l in [0, 1].

    Returns:
        :class:`TokenPruneOutput`, ``out_len = pruned_length(seq_len, keep_ratio)``.
    """
    batch_size, seq_len, hidden_size = hidden_states.shape
    out_len = pruned_length(seq_len, keep_ratio)
    real = attention_mask.bool()
    candidates = real[:, 1:]
    memory = torch.where(
        candidates,
        (1 - beta) * memory + beta * cls_attention(cls_query, key, attention_mask)[:, 1:],
        0.0,
    )

    # Top-k by memory; a stable descending sort puts the lower position first among ties.
    kept_count = torch.ceil(keep_ratio * candidates.sum(1).double()).long()
    order = memory.masked_fill(~candidates, -math.inf).argsort(dim=1, descending=True, stable=True)
    rank_kept = torch.arange(seq_len - 1, device=memory.device) < kept_count[:, None]
    kept = torch.zeros_like(candidates).scatter(1, order, rank_kept)
    dropped = candidates & ~kept

    # Fusion token: memory renormalised over the dropped tokens (uniform if it sums to 0).
    weights = memory * dropped
    total = weights.sum(1, keepdim=True)
    uniform = dropped / dropped.sum(1, keepdim=True).clamp_min(1)
    weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), uniform)
    fusion = torch.einsum("bn,bnh->bh", weights, hidden_states[:, 1:].float())
    has_fusion = dropped.any(1)

    # source[b, j]: input position of output token j; seq_len marks the fusion token, -1
    # padding. Tokens that are not kept are scattered into a spare last column.
    positions = torch.arange(1, seq_len, device=memory.device).expand(batch_size, -1)
    source = torch.full((batch_size, out_len + 1), -1, device=memory.device)
    source[:, 0] = 0
    source.scatter_(1, torch.where(kept, kept.cumsum(1), out_len), positions)
    fusion_slot = torch.where(has_fusion, 1 + kept_count, out_len)[:, None]
    source.scatter_(1, fusion_slot, seq_len)
    source = source[:, :out_len]
    valid = source >= 0
    index = source.clamp_min(0)

    extended = torch.cat([hidden_states, fusion.to(hidden_states.dtype)[:, None]], 1)
    out_hidden = extended.gather(1, index[..., None].expand(-1, -1, hidden_size))
    out_hidden = out_hidden.masked_fill(~valid[..., None], 0)
    zero = memory.new_zeros(batch_size, 1)
    out_memory = torch.cat([zero, memory, total], 1).gather(1, index).masked_fill(~valid, 0.0)
    out_mask = valid.clone()
    out_mask[:, 0] = real[:, 0]
    kept_indices = source.masked_fill(source == seq_len, -1)
    return TokenPruneOutput(
        out_hidden, out_mask.to(attention_mask.dtype), out_memory[:, 1:], kept_indices
    )
