"""RoBERTa (Liu et al. 2019): BERT's layers with other position ids.

The layers, attention and state-dict names are BERT's (Hugging Face ``RobertaLayer`` is
``BertLayer`` renamed), so :class:`RobertaModel` only swaps the embeddings: position ids start
at ``padding_idx + 1`` and skip padding, as in fairseq's ``make_positions``::

    position_ids = cumsum(input_ids != pad) * (input_ids != pad) + pad

so a padding token gets position ``pad`` and the t-th real token ``pad + t``. A Hugging Face
``RobertaModel`` state dict loads without key remapping.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import RobertaConfig

from eeengine.modeling_bert import BertEmbeddings, BertModel


class RobertaEmbeddings(BertEmbeddings):
    """Word + position + token-type embeddings with RoBERTa's position ids, then LayerNorm."""

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """Embed token ids.

        Args:
            input_ids: (batch_size, seq_len) int64; padding is ``config.pad_token_id``.
            token_type_ids: (batch_size, seq_len) int64 (all 0 for RoBERTa tokenizers).

        Returns:
            hidden_states: (batch_size, seq_len, hidden_size).
        """
        real = input_ids.ne(self.padding_idx).long()
        positions = torch.cumsum(real, dim=1) * real + self.padding_idx
        embeddings = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(positions)
        )
        return self.dropout(self.LayerNorm(embeddings))


class RobertaModel(BertModel):
    """:class:`BertModel` with :class:`RobertaEmbeddings`."""

    def __init__(self, config: RobertaConfig) -> None:
        super().__init__(config)
        self.embeddings = RobertaEmbeddings(config)

    @property
    def max_positions(self) -> int:
        """Positions 0 … pad are never given to real tokens."""
        return self.config.max_position_embeddings - self.config.pad_token_id - 1
