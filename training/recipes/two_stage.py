"""The ``two_stage`` recipe (DeeBERT, Xin et al. 2020; BERxiT, Xin et al. 2021, eqs. 4-5).

    stage 1 (the first ``stage1_fraction`` of the steps): min over θ_1…θ_L, w_L of  L_L
    stage 2 (the rest):                                   min over w_1…w_{L−1}  of  Σ_{l<L} L_l

Stage 1 is plain fine-tuning of the backbone and the final classifier (the last exit); stage 2
freezes them and trains the other exits, so the final classifier keeps its stage-1 quality.
Both stages share one optimizer and learning-rate schedule. Needs separate heads: with layout
``shared`` the final classifier is every exit's classifier. A shared [CLS] pooler
(``shared_pooler``) belongs to the final classifier and is frozen in stage 2.
"""

from __future__ import annotations

from torch import Tensor

from eeengine.training.recipes.base import Recipe


class TwoStageRecipe(Recipe):
    """Args: see :class:`Recipe`; ``stage1_fraction``: share of the steps in stage 1.

    Raises:
        ValueError: layout ``shared``.
    """

    name = "two_stage"

    def __init__(
        self, num_layers: int, num_labels: int, layout: str, stage1_fraction: float = 0.5
    ) -> None:
        super().__init__(num_layers, num_labels, layout)
        if layout == "shared":
            raise ValueError(
                "recipe 'two_stage' keeps the final classifier fixed in stage 2, so it needs "
                "separate exit heads: use layout 'per_layer' or 'shared_pooler'"
            )
        self.stage1_fraction = stage1_fraction

    def stage(self, step: int, total_steps: int) -> int:
        return 0 if step < round(self.stage1_fraction * total_steps) else 1

    def trains(self, name: str, stage: int) -> bool:
        """Stage 1: all but exits 1 … L−1; stage 2: only exits 1 … L−1 (and the LTE module,
        which :class:`~eeengine.training.recipes.lte.LteRecipe` adds)."""
        early_exit = any(name.startswith(f"exit_heads.{i}.") for i in range(self.num_layers - 1))
        return early_exit == (stage == 1)

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """Stage 1: L_L; stage 2: Σ_{l<L} L_l. A scalar float32 tensor."""
        losses = self.exit_losses(all_logits, labels)
        return losses[-1] if stage == 0 else losses[:-1].sum()

    def hyperparameters(self) -> dict:
        return {"stage1_fraction": self.stage1_fraction}
