"""The ``elbert`` recipe: learnable loss weights (ELBERT, Xie et al. 2021, Sec. III-B, eqs. 2-3).

    w_l = σ(t_l)                      for l < L,  t_l learnable, initialised to 4
    w_L = L − Σ_{l<L} σ(t_l)
    L_total = Σ_{l=1..L} w_l · L_l

The weights always sum to L. ∂L_total/∂t_l = σ'(t_l)·(L_l − L_L): an exit whose loss exceeds
the final classifier's loses weight to it. The t_l train with their own learning rate (1e-2)
and no weight decay; the learned weights w_l are recorded in ``eeengine.json``
(``training.recipe_learned.loss_weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from eeengine.training.recipes.base import Recipe


class ElbertRecipe(Recipe):
    """Args: see :class:`Recipe`; ``init``: the initial t_l."""

    name = "elbert"
    lr = 1e-2

    def __init__(self, num_layers: int, num_labels: int, layout: str, init: float = 4.0) -> None:
        super().__init__(num_layers, num_labels, layout)
        self.init = init
        self.loss_weight_logits = nn.Parameter(torch.full((num_layers - 1,), init))

    def weights(self) -> Tensor:
        """(num_layers,) float32: w_1 … w_L."""
        sig = torch.sigmoid(self.loss_weight_logits.float())
        return torch.cat([sig, (self.num_layers - sig.sum()).unsqueeze(0)])

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """Σ_l w_l·L_l; a scalar float32 tensor."""
        return (self.weights() * self.exit_losses(all_logits, labels)).sum()

    def hyperparameters(self) -> dict:
        return {"init": self.init, "lr": self.lr}

    def learned(self) -> dict:
        return {"loss_weights": [round(w, 6) for w in self.weights().tolist()]}
