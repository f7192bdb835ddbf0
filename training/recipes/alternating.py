"""The ``alternating`` recipe (BERxiT, Xin et al. 2021, Sec. 3, eqs. 6-7).

    even steps (0, 2, …):  L_L                   (the final classifier, as in plain fine-tuning)
    odd steps  (1, 3, …):  Σ_{l=1..L} L_l         (every exit, the final one included)

Steps count from 0 here, so BERxiT's odd-numbered iterations (1, 3, … counted from 1) are the
even steps. Every parameter trains at every step; the exits get no gradient on even steps.
"""

from __future__ import annotations

from torch import Tensor

from eeengine.training.recipes.base import Recipe


class AlternatingRecipe(Recipe):
    name = "alternating"

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """L_L on even steps, Σ_l L_l on odd steps; a scalar float32 tensor."""
        losses = self.exit_losses(all_logits, labels)
        return losses[-1] if step % 2 == 0 else losses.sum()
