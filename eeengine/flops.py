"""FLOPs per sample, for MPEE's acceleration ratio (Kong et al. 2022, eq. 15).

ρ = FLOPs executed / FLOPs of the full model, summed over the samples; MPEE reports 1/ρ as the
acceleration. A sample is counted at its own real token count (padding is not work the model
needs), as MPEE does at batch size 1. One FLOP is a multiply or an add, so a matrix product
(m × k) · (k × n) costs 2·m·k·n. With H the hidden size, I the feed-forward size, C the
classes, n the tokens entering a layer and n' the tokens its feed-forward runs on (n' < n after
token pruning):

- attention: Q, K, V and output projections 8·n·H², scores Q·Kᵀ and context P·V 4·n²·H;
- feed-forward: 4·n'·H·I;
- token pruning (MPEE section 3.1): the [CLS] attention row 2·n·H, the fusion token 2·p·H
  for p dropped tokens;
- exit head on n' tokens: mean pooling n'·H (or a [CLS] pooler 2·H²), classifier 2·H·C.

Softmax, LayerNorm, GELU and the exit policy are elementwise or O(C) and not counted (MPEE's
O(12·N·D² + 2·N²·D) counts the matrix products only).

The full model is the original one: every layer at the sample's length, and one exit head
(the last layer's). The executed FLOPs count every layer the sample ran, at its actual token
counts, and the exit head of each of those layers; so a multi-exit model run to full depth
without pruning has ρ slightly above 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from eeengine.modeling_multiexit import MultiExitBert
from eeengine.token_pruning import TokenPruning, num_kept


@dataclass(frozen=True)
class FlopCounter:
    """FLOPs of one sample through a multi-exit model.

    Attributes:
        hidden_size: H.
        intermediate_size: I, the feed-forward width.
        num_layers: L.
        num_labels: C.
        pooling: the exit heads' pooling, "mean" or "cls".
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_labels: int
    pooling: str

    @classmethod
    def for_model(cls, model: MultiExitBert) -> FlopCounter:
        config = model.config
        return cls(
            config.hidden_size,
            config.intermediate_size,
            model.num_layers,
            model.num_labels,
            model.exit_heads[0].pooling,
        )

    def layer(self, tokens_in: int, tokens_out: int) -> int:
        """One encoder layer: attention on ``tokens_in`` tokens, feed-forward on
        ``tokens_out``."""
        h = self.hidden_size
        return (
            8 * tokens_in * h * h
            + 4 * tokens_in**2 * h
            + 4 * tokens_out * h * self.intermediate_size
        )

    def token_prune(self, tokens_in: int, keep_ratio: float) -> int:
        """[CLS] attention row and fusion token of a row of ``tokens_in`` real tokens."""
        dropped = tokens_in - 1 - num_kept(tokens_in - 1, keep_ratio)
        return 2 * tokens_in * self.hidden_size + 2 * dropped * self.hidden_size

    def head(self, tokens: int) -> int:
        """One exit head on ``tokens`` tokens."""
        h = self.hidden_size
        pooling = 2 * h * h if self.pooling == "cls" else tokens * h
        return pooling + 2 * h * self.num_labels

    def full(self, length: int) -> int:
        """The original model on a sample of ``length`` tokens: L layers and one head."""
        return self.num_layers * self.layer(length, length) + self.head(length)

    def executed(self, length: int, exit_layer: int, token_pruning: TokenPruning | None) -> int:
        """What the engine ran for a sample of ``length`` tokens that exited at ``exit_layer``
        (1-based) under ``token_pruning`` (None: no pruning), with an exit head at every layer
        as the papers count. (Policies ``none`` and ``budget`` skip the heads before their
        layer, :meth:`eeengine.policies.ExitPolicy.decides_at`: 2·H·C + n·H each, under 0.1 %
        of a layer; not subtracted.)"""
        return _cumulative(self, length, token_pruning)[exit_layer - 1]

    def cumulative(self, length: int, token_pruning: TokenPruning | None) -> list[int]:
        """:meth:`executed` for every exit layer: entry l - 1 is what a sample of ``length``
        tokens costs when it exits at layer l (layers 1..l, their pruning and their heads)."""
        return list(_cumulative(self, length, token_pruning))

    def tables(
        self, lengths: Sequence[int], token_pruning: TokenPruning | None
    ) -> tuple[Tensor, Tensor]:
        """The FLOPs tables :func:`eeengine.evaluation.sweep` takes, for samples of ``lengths``
        tokens.

        Returns:
            executed: (num_layers, len(lengths)) float64, :meth:`cumulative` of each sample.
            full: (len(lengths),) float64, :meth:`full` of each sample.
        """
        executed = torch.tensor(
            [self.cumulative(n, token_pruning) for n in lengths], dtype=torch.float64
        )
        full = torch.tensor([self.full(n) for n in lengths], dtype=torch.float64)
        return executed.reshape(len(lengths), self.num_layers).T, full


@functools.lru_cache(maxsize=4096)
def _cumulative(
    counter: FlopCounter, length: int, token_pruning: TokenPruning | None
) -> tuple[int, ...]:
    """:meth:`FlopCounter.cumulative`, computed once per length and schedule (a prediction
    asks for it per input)."""
    if token_pruning is None:
        tokens = [length] * counter.num_layers
    else:
        tokens = token_pruning.tokens_per_layer(length, counter.num_layers)
    flops, total = [], 0
    layers = zip([length, *tokens], tokens, strict=False)
    for layer, (tokens_in, tokens_out) in enumerate(layers, start=1):
        if token_pruning is not None and layer in token_pruning.layers:
            total += counter.token_prune(tokens_in, token_pruning.keep_ratio)
        total += counter.layer(tokens_in, tokens_out) + counter.head(tokens_out)
        flops.append(total)
    return tuple(flops)
