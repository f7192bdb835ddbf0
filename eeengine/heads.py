"""Exit heads: one classifier per encoder layer, in one of three layouts.

=================  ======================================  ===============================
layout             parameters                              papers
=================  ======================================  ===============================
``per_layer``      a pooler and a linear layer per layer   DeeBERT, BERxiT, MPEE
``shared_pooler``  one pooler, a linear layer per layer    PABEE, PCEE-BERT
``shared``         one pooler and linear layer for all     ELBERT
=================  ======================================  ===============================

Pooling is either the masked mean of the layer's hidden states (the default for
all-MiniLM-L6-v2, whose [CLS] pooler was never trained; it has no parameters, so with mean
pooling ``per_layer`` and ``shared_pooler`` are the same) or [CLS] followed by a dense + tanh
pooler as in BERT.

State-dict keys: ``exit_heads.{l}.classifier.*`` (and ``exit_heads.{l}.pooler.*`` for
``per_layer`` with [CLS] pooling), ``exit_heads.0.*`` only for ``shared``, and the shared pooler
of ``shared_pooler`` at ``exit_pooler.*``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eeengine.dropout import Dropout

POOLINGS = ("mean", "cls")
LAYOUTS = ("per_layer", "shared_pooler", "shared")


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
    """Pooling, dropout and a linear classifier on one layer's hidden states.

    Args:
        hidden_size, num_labels: input and output width.
        pooling: "mean" or "cls".
        dropout: dropout probability before the classifier.
        shared_pooler: the model's shared [CLS] pooler (layout ``shared_pooler``); None gives
            the head its own pooler when ``pooling == "cls"``. A shared pooler is held outside
            this module's parameters, so its weights appear once in the state dict (the model
            registers it as ``exit_pooler``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        pooling: str,
        dropout: float,
        shared_pooler: BertPooler | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        self.pooling = pooling
        own = pooling == "cls" and shared_pooler is None
        self.pooler = BertPooler(hidden_size) if own else None
        self._shared_pooler = (shared_pooler,)  # a tuple: not registered as a submodule
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """(batch_size, seq_len, hidden_size) -> (batch_size, hidden_size)."""
        if self.pooling == "mean":
            return mean_pool(hidden_states, attention_mask)
        pooler = self.pooler if self.pooler is not None else self._shared_pooler[0]
        return pooler(hidden_states)

    def classify(self, pooled: Tensor) -> Tensor:
        """(batch_size, hidden_size) pooled vector -> (batch_size, num_labels) logits."""
        return self.classifier(self.dropout(pooled))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Args:
            hidden_states: (batch_size, seq_len, hidden_size), one layer's output.
            attention_mask: (batch_size, seq_len), 1 for real tokens.

        Returns:
            logits: (batch_size, num_labels) float, the dtype of the head.
        """
        return self.classify(self.pool(hidden_states, attention_mask))


def make_exit_heads(
    layout: str, hidden_size: int, num_labels: int, num_layers: int, pooling: str, dropout: float
) -> tuple[nn.ModuleList, BertPooler | None]:
    """Build the exit heads of a layout.

    Returns:
        The heads (num_layers of them, or one for ``shared``) and the shared pooler
        (``shared_pooler`` with [CLS] pooling, else None).

    Raises:
        ValueError: unknown layout or pooling.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"exit head layout {layout!r} is not one of {LAYOUTS}")
    shared = BertPooler(hidden_size) if layout == "shared_pooler" and pooling == "cls" else None
    count = 1 if layout == "shared" else num_layers
    heads = nn.ModuleList(
        ExitHead(hidden_size, num_labels, pooling, dropout, shared) for _ in range(count)
    )
    return heads, shared


class LteHead(nn.Module):
    """BERxiT's learning-to-exit module (Xin et al. 2021, Sec. 4.2, eq. 8), one for all layers.

        s_l = sigmoid(w · pooled_l + b)

    on the exit head's pooled vector of layer l. Trained towards 1 − correct_l, so s predicts
    "not yet correct" and the ``lte`` policy exits when s_l < τ (BERxiT's certainty is 1 − s).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, 1)

    def forward(self, pooled: Tensor) -> Tensor:
        """(batch_size, hidden_size) -> (batch_size,) float32 scores in [0, 1]."""
        return torch.sigmoid(self.dense(pooled).float()).squeeze(-1)
