"""The reference executor: eeengine's own torch encoders (BERT, RoBERTa, ALBERT)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from eeengine.executors.base import LayerExecutor
from eeengine.modeling_bert import attention_bias
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.token_pruning import TokenPruneOutput

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# LayerExecutor.split_cost on CPU (benchmarks/padding_split.py; a GPU pass is bound by
# launches: it never cuts). fp32: SST-2 dev in calls of 32 sentences (padded to 1.9x the real
# tokens), full depth 1.22x and early exit 1.07x faster at 256 (1.23x / 1.07x at 128; 1.07x /
# 0.94x at 32). bf16 has a larger fixed cost per pass: in calls of 32 sentences every cut lost
# (0.63-0.98x), and at 1024 none is made (a call of 32 sentences cannot save that much); calls
# of 128 sentences ran 1.44x faster at 1024, of 32 long movie reviews 2.01x.
CPU_SPLIT_COST = {"fp32": 256.0, "bf16": 1024.0}


class TorchExecutor(LayerExecutor):
    """Runs ``model.backbone`` one layer at a time, with the query/key/value projections fused
    into one matmul when the model is in eval mode (fused once: a second executor on the same
    model reuses the fused weights, so a CUDA graph captured earlier still reads live memory).

    With ``precision="bf16"`` the encoder layers run in bf16: they are cast in place (one
    copy of the weights; the model given is changed), hidden states are rounded to bf16 at
    each layer's input and returned as float32, so the embeddings, exit heads and policy step
    stay float32.

    Args:
        model: the multi-exit model, on any device.
        precision: "fp32" (the reference) or "bf16".
        fp32_layers: 0-based layers left in float32 at bf16 (token-pruning layers, see
            :meth:`pruned_layer`).
    """

    name = "torch"

    def __init__(
        self,
        model: MultiExitBert,
        precision: str = "fp32",
        fp32_layers: frozenset[int] = frozenset(),
    ) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"the torch executor runs {' or '.join(_DTYPES)}, not {precision!r}")
        self.model = model
        self.precision = precision
        cpu = next(model.parameters()).device.type == "cpu"
        self.split_cost = CPU_SPLIT_COST[precision] if cpu else math.inf
        dtype = _DTYPES[precision]
        # Each layer's dtype: fp32_layers stay float32.
        self._dtypes = [
            torch.float32 if index in fp32_layers else dtype
            for index in range(len(model.backbone.layers))
        ]
        if dtype != torch.float32:
            for layer, layer_dtype in zip(model.backbone.layers, self._dtypes, strict=True):
                layer.to(layer_dtype)
            if model.backbone.qkv_fused:
                model.backbone.fuse_qkv()  # again, from the cast weights
        if not model.training and not model.backbone.qkv_fused:
            model.backbone.fuse_qkv()

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch_size, seq_len) int64 ids -> (batch_size, seq_len, hidden_size)."""
        return self.model.backbone.embed(input_ids, token_type_ids)

    def mask(self, attention_mask: Tensor) -> Tensor | None:
        """The SDPA mask of :func:`eeengine.modeling_bert.attention_bias`."""
        return attention_bias(attention_mask)

    def layer(self, index: int, hidden_states: Tensor, mask: Tensor | None) -> Tensor:
        """Layer ``index`` (0-based): (batch_size, seq_len, hidden_size) -> the same shape,
        float32 (computed in the layer's dtype)."""
        layer = self.model.backbone.layers[index]
        dtype = self._dtypes[index]
        if dtype == torch.float32:
            return layer(hidden_states, mask)
        return layer(hidden_states.to(dtype), mask).float()

    def pruned_layer(
        self,
        index: int,
        hidden_states: Tensor,
        mask: Tensor | None,
        attention_mask: Tensor,
        memory: Tensor,
        keep_ratio: float,
        beta: float,
        prune: Callable[..., TokenPruneOutput],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The layer's own :meth:`eeengine.modeling_bert.PrunableLayer.pruned_forward` (a
        pruning layer stays float32 at bf16: build with it in ``fp32_layers``)."""
        layer = self.model.backbone.layers[index]
        return layer.pruned_forward(
            hidden_states, mask, attention_mask, memory, keep_ratio, beta, prune
        )

    def release_scratch(self) -> None:
        """Nothing to do: torch's CPU allocator frees each buffer when it is released."""
