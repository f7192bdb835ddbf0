"""What every training recipe shares: the :class:`Recipe` interface and the per-exit loss.

A recipe is more than a loss: it may own parameters (ELBERT's loss weights, MPEE's teacher
attention) trained with their own learning rate, train only part of the model in a stage
(two-stage fine-tuning), change its objective from step to step (alternating), or need a
module in the model (the LTE module). The trainer asks it, at every step:

    stage = recipe.stage(step, total_steps)  # `name` trains if recipe.trains(name, stage)
    loss = recipe.loss(step, stage, all_logits, labels, signals)

Per-exit loss L_l is the cross-entropy of exit l (classification; with label smoothing ε the
target is the one-hot label times 1 − ε plus ε/C on every class, Szegedy et al. 2016, Sec. 7)
or its mean squared error (regression, num_labels = 1), averaged over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def exit_losses(all_logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-exit loss L_l.

    Args:
        all_logits: (num_layers, batch_size, num_labels).
        labels: (batch_size,) int64 class indices, or float targets when num_labels == 1.
        label_smoothing: ε of the cross-entropy's smoothed target (ignored for regression).

    Returns:
        (num_layers,) float32: mean cross-entropy (or MSE) of each exit over the batch.
    """
    num_layers, batch_size, num_labels = all_logits.shape
    if num_labels == 1:
        return ((all_logits[..., 0].float() - labels.float()) ** 2).mean(1)
    return (
        F.cross_entropy(
            all_logits.float().reshape(-1, num_labels),
            labels.repeat(num_layers),
            reduction="none",
            label_smoothing=label_smoothing,
        )
        .view(num_layers, batch_size)
        .mean(1)
    )


class Recipe(nn.Module):
    """Base class: one stage, every parameter trains, subclasses define :meth:`loss`.

    The recipe's own parameters (its ``nn.Module`` parameters) train in a separate AdamW group
    without weight decay, at :attr:`lr` (None: the exit heads' learning rate).

    Args:
        num_layers: exits L.
        num_labels: classes C (1 for regression).
        layout: the exit-head layout (see :mod:`eeengine.heads`).

    Class attributes:
        name: the registry name, recorded in ``eeengine.json`` (``training.recipe``).
        needs_lte: the model must carry the LTE module.
        lr: learning rate of the recipe's own parameters.
        label_smoothing: ε of every cross-entropy against the labels (set by
            :func:`~eeengine.training.recipes.make_recipe`).
    """

    name: str = ""
    needs_lte: bool = False
    lr: float | None = None
    label_smoothing: float = 0.0

    def __init__(self, num_layers: int, num_labels: int, layout: str) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.num_labels = num_labels
        self.layout = layout

    def exit_losses(self, all_logits: Tensor, labels: Tensor) -> Tensor:
        """:func:`exit_losses` with this recipe's label smoothing; (num_layers,) float32."""
        return exit_losses(all_logits, labels, self.label_smoothing)

    def stage(self, step: int, total_steps: int) -> int:
        """The stage of 0-based ``step`` out of ``total_steps`` (always 0 unless overridden)."""
        return 0

    def trains(self, name: str, stage: int) -> bool:
        """Whether the model parameter ``name`` (a state-dict key) trains in ``stage``."""
        return True

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """The training loss of one batch.

        Args:
            step: 0-based optimizer step.
            stage: :meth:`stage` of that step.
            all_logits: (num_layers, batch_size, num_labels), layer 1 first.
            labels: (batch_size,) int64 classes, or float targets for regression.
            signals: the model's extra per-layer outputs, e.g. ``lte_score`` (num_layers,
                batch_size).

        Returns:
            A scalar float32 tensor.
        """
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """The recipe's settings, recorded in ``eeengine.json`` (``training.recipe_params``)."""
        return {}

    def learned(self) -> dict:
        """What the recipe learned that is worth reading later (``training.recipe_learned``),
        e.g. ELBERT's loss weights."""
        return {}
