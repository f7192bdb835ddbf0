"""The ``weighted`` recipe: deeper exits weigh more (PABEE, Zhou et al. 2020, eq. 5;
PCEE-BERT, Zhang et al. 2022, Sec. 3.3, the "asc" weighting).

    L_total = Σ_{l=1..L} l · L_l / Σ_{l=1..L} l

with L_l the cross-entropy (classification) or mean squared error (regression, num_labels = 1)
of exit l.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eeengine.training.recipes.base import Recipe, exit_losses


def weighted_loss(all_logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Σ l·L_l / Σ l over the exits; a scalar float32 tensor.

    Args:
        all_logits: (num_layers, batch_size, num_labels).
        labels: (batch_size,) int64 classes, or float targets when num_labels == 1.
        label_smoothing: ε of the cross-entropy (:func:`exit_losses`).
    """
    losses = exit_losses(all_logits, labels, label_smoothing)
    weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)
    return (weights * losses).sum() / weights.sum()


class WeightedRecipe(Recipe):
    name = "weighted"

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        return weighted_loss(all_logits, labels, self.label_smoothing)
