"""The ``lte`` recipe: BERxiT's learning-to-exit module on top of any other recipe (Xin et al.
2021, Sec. 4.2, eqs. 8-11).

The model carries one LTE module shared by all layers, s_l = σ(w·pooled_l + b) on each exit
head's pooled vector (:class:`eeengine.heads.LteHead`), trained jointly with the base recipe:

    L_total = L_base + (1/L) Σ_{l=1..L} mean_batch (s_l − y_l)²
    y_l = 1 − 1[argmax z_l = y]          classification: 1 when exit l is wrong
    y_l = tanh(|z_l − y|)                regression

BERxiT writes the module as the certainty u = 1 − s with target 1 − y_l; the two are the
same. The targets are constants (no gradient flows through them); the score's gradient does
reach the pooled vector, as in BERxiT's joint training. The LTE module trains in every stage of
the base recipe. At inference the ``lte`` policy exits when s_l < τ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eeengine.training.recipes.base import Recipe


def lte_targets(all_logits: Tensor, labels: Tensor) -> Tensor:
    """What s_l should predict.

    Args:
        all_logits: (num_layers, batch_size, num_labels).
        labels: (batch_size,) int64 classes, or float targets when num_labels == 1.

    Returns:
        (num_layers, batch_size) float32 in [0, 1], without gradient.
    """
    logits = all_logits.detach().float()
    if logits.shape[-1] == 1:
        return torch.tanh((logits[..., 0] - labels.float()).abs())
    return (logits.argmax(-1) != labels).float()


def lte_loss(lte_score: Tensor, all_logits: Tensor, labels: Tensor) -> Tensor:
    """(1/L) Σ_l mean_batch (s_l − y_l)²; a scalar float32 tensor.

    Args:
        lte_score: (num_layers, batch_size), s_l of every exit.
        all_logits, labels: as in :func:`lte_targets`.
    """
    return ((lte_score.float() - lte_targets(all_logits, labels)) ** 2).mean()


class LteRecipe(Recipe):
    """A base recipe plus the LTE loss; stages and trained parameters are the base's, plus
    the LTE module (``lte.*``) always.

    Args:
        base: the recipe underneath (BERxiT trains LTE on top of ``alternating``).
    """

    name = "lte"
    needs_lte = True

    def __init__(self, base: Recipe) -> None:
        super().__init__(base.num_layers, base.num_labels, base.layout)
        self.base = base
        self.lr = base.lr

    def stage(self, step: int, total_steps: int) -> int:
        return self.base.stage(step, total_steps)

    def trains(self, name: str, stage: int) -> bool:
        return name.startswith("lte.") or self.base.trains(name, stage)

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """L_base + the LTE loss; a scalar float32 tensor."""
        base = self.base.loss(step, stage, all_logits, labels, signals)
        return base + lte_loss(signals["lte_score"], all_logits, labels)

    def hyperparameters(self) -> dict:
        return {"base": self.base.name, **self.base.hyperparameters()}

    def learned(self) -> dict:
        return self.base.learned()
