"""Multi-exit training recipes by name (see :class:`~eeengine.training.recipes.base.Recipe`).

==============  ====================================================  =====================
recipe          loss                                                  paper
==============  ====================================================  =====================
``joint``       Σ_l L_l                                               BERxiT, RTJ
``weighted``    Σ_l l·L_l / Σ_l l                                     PABEE, PCEE-BERT
``elbert``      Σ_{l<L} σ(t_l)·L_l + (L − Σσ(t))·L_L, t learnable      ELBERT
``two_stage``   stage 1: L_L; stage 2: Σ_{l<L} L_l, backbone frozen    DeeBERT, BERxiT
``alternating`` even steps L_L; odd steps Σ_l L_l                     BERxiT
``lte``         a base recipe + MSE of the LTE score to 1 − correct   BERxiT
``mpee``        (1−γ)Σ CE + γT²Σ KL(z_l/T ‖ t/T) + γ CE(t)             MPEE
==============  ====================================================  =====================
"""

from __future__ import annotations

from eeengine.training.recipes.alternating import AlternatingRecipe
from eeengine.training.recipes.base import Recipe
from eeengine.training.recipes.elbert import ElbertRecipe
from eeengine.training.recipes.joint import JointRecipe
from eeengine.training.recipes.lte import LteRecipe
from eeengine.training.recipes.mpee import MpeeRecipe
from eeengine.training.recipes.two_stage import TwoStageRecipe
from eeengine.training.recipes.weighted import WeightedRecipe

# Recipes that stand alone; "lte" wraps one of them.
BASE_RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls
    for cls in (
        JointRecipe,
        WeightedRecipe,
        ElbertRecipe,
        TwoStageRecipe,
        AlternatingRecipe,
        MpeeRecipe,
    )
}
RECIPES = (*BASE_RECIPES, LteRecipe.name)


def make_recipe(
    name: str,
    num_layers: int,
    num_labels: int,
    layout: str,
    lte_base: str = "alternating",
    label_smoothing: float = 0.0,
) -> Recipe:
    """Build a recipe for a model with ``num_layers`` exits and ``num_labels`` classes.

    Args:
        name: one of :data:`RECIPES`.
        lte_base: the recipe under ``lte`` (ignored for the others).
        label_smoothing: ε in [0, 1) of every cross-entropy against the labels (Szegedy et al.
            2016); classification only.

    Raises:
        ValueError: an unknown recipe, ``lte`` as its own base, a recipe that does not fit the
            task or layout (``mpee`` on regression, ``two_stage`` with a shared head), or label
            smoothing outside [0, 1) or on regression.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing and num_labels == 1:
        raise ValueError("label_smoothing applies to classification; this task is regression")
    recipe = _build(name, num_layers, num_labels, layout, lte_base)
    (recipe.base if isinstance(recipe, LteRecipe) else recipe).label_smoothing = label_smoothing
    return recipe


def _build(name: str, num_layers: int, num_labels: int, layout: str, lte_base: str) -> Recipe:
    if name == LteRecipe.name:
        if lte_base not in BASE_RECIPES:
            raise ValueError(
                f"unknown base recipe {lte_base!r} for 'lte'; available: {', '.join(BASE_RECIPES)}"
            )
        return LteRecipe(BASE_RECIPES[lte_base](num_layers, num_labels, layout))
    if name not in BASE_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return BASE_RECIPES[name](num_layers, num_labels, layout)


__all__ = ["BASE_RECIPES", "RECIPES", "Recipe", "make_recipe"]
