"""Multi-exit training losses by name: ``loss(all_logits, labels) -> scalar``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from eeengine.training.recipes.weighted import weighted_loss

RECIPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"weighted": weighted_loss}


def get_recipe(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Raises ValueError for an unknown recipe name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
