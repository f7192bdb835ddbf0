"""The reference executor: eeengine's own torch encoders (BERT, RoBERTa, ALBERT)."""

from __future__ import annotations

from torch import Tensor

from eeengine.modeling_bert import attention_bias
from eeengine.modeling_multiexit import MultiExitBert


class TorchExecutor:
    """Runs ``model.backbone`` one layer at a time, with the query/key/value projections fused
    into one matmul when the model is in eval mode (fused once: a second executor on the same
    model reuses the fused weights, so a CUDA graph captured earlier still reads live memory).

    Args:
        model: the multi-exit model, on any device.
    """

    name = "torch"

    def __init__(self, model: MultiExitBert) -> None:
        self.model = model
        if not model.training and not model.backbone.qkv_fused:
            model.backbone.fuse_qkv()

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch_size, seq_len) int64 ids -> (batch_size, seq_len, hidden_size)."""
        return self.model.backbone.embed(input_ids, token_type_ids)

    def mask(self, attention_mask: Tensor) -> Tensor | None:
        """The SDPA mask of :func:`eeengine.modeling_bert.attention_bias`."""
        return attention_bias(attention_mask)

    def layer(self, index: int, hidden_states: Tensor, mask: Tensor | None) -> Tensor:
        """Layer ``index`` (0-based): (batch_size, seq_len, hidden_size) -> the same shape."""
        return self.model.backbone.layers[index](hidden_states, mask)
