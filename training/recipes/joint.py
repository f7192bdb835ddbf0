"""The ``joint`` recipe: every exit's loss, summed (BERxiT, Xin et al. 2021, eq. 3; RTJ,
Schwartz et al. 2020).

    L_total = Σ_{l=1..L} L_l

The last exit is the final classifier.
"""

from __future__ import annotations

from torch import Tensor

from eeengine.training.recipes.base import Recipe


class JointRecipe(Recipe):
    name = "joint"

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """Σ_l L_l; a scalar float32 tensor."""
        return self.exit_losses(all_logits, labels).sum()
