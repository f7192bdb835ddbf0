"""Exit heads: one classifier per encoder layer.

Layout "per_layer" (DeeBERT, BERxiT, MPEE): every layer l has its own pooling + linear head.
Pooling is either the masked mean of the layer's hidden states (the default for
all-MiniLM-L6-v2, whose [CLS] pooler was never trained) or [CLS] followed by a dense + tanh
pooler as in BERT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("mean", "cls")


def mean_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the hidden states of real tokens.

    Args:
        hidden_states: (batch_size, seq_len, hidden_size).
        attention_mask: (batch_size, seq_len), 1 for real tokens, 0 for padding.

    Returns:
        (batch_size, hidden_size), the mean over each row's real tokens.
    """
    mask = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class BertPooler(nn.Module):
    """[CLS] hidden state through dense + tanh, as in BERT's pooler."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class ExitHead(nn.Module):
    """Pooling, dropout and a linear classifier on one layer's hidden states."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        self.pooling = pooling
        self.pooler = BertPooler(hidden_size) if pooling == "cls" else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """(batch_size, seq_len, hidden_size) -> (batch_size, hidden_size)."""
        if self.pooler is not None:
            return self.pooler(hidden_states)
        return mean_pool(hidden_states, attention_mask)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Args:
            hidden_states: (batch_size, seq_len, hidden_size), one layer's output.
            attention_mask: (batch_size, seq_len), 1 for real tokens.

        Returns:
            logits: (batch_size, num_labels) float, the dtype of the head.
        """
        return self.classifier(self.dropout(self.pool(hidden_states, attention_mask)))
