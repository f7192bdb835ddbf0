"""The ``weighted`` recipe: deeper exits weigh more (PABEE, Zhou et al. 2020, eq. 5;
PCEE-BERT, Zhang et al. 2022, Sec. 3.3, the "asc" weighting).

    L_total = Σ_{l=1..L} l · L_l / Σ_{l=1..L} l

with L_l the cross-entropy (classification) or mean squared error (regression, num_labels = 1)
of exit l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def exit_losses(all_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-exit loss.

    Args:
        all_logits: (num_layers, batch_size, num_labels).
        labels: (batch_size,) int64 class indices, or float targets when num_labels == 1.

    Returns:
        (num_layers,) float32: mean cross-entropy (or MSE) of each exit over the batch.
    """
    num_layers, batch_size, num_labels = all_logits.shape
    if num_labels == 1:
        return ((all_logits[..., 0].float() - labels.float()) ** 2).mean(1)
    return (
        F.cross_entropy(
            all_logits.float().reshape(-1, num_labels), labels.repeat(num_layers), reduction="none"
        )
        .view(num_layers, batch_size)
        .mean(1)
    )


def weighted_loss(all_logits: Tensor, labels: Tensor) -> Tensor:
    """Σ l·L_l / Σ l over the exits; a scalar float32 tensor."""
    losses = exit_losses(all_logits, labels)
    weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)
    return (weights * losses).sum() / weights.sum()
