"""Unlearning recipes: one module each, one registry (RECIPES)."""

from cleanse.recipes import act_edit, anp, clp, fine_prune, finetune, grad_prune, i_bau, nad, sau, tar_ewc, ulrl  # noqa: F401  (registration)
from cleanse.recipes.base import RECIPES, Recipe, RecipeContext, RecipeResult

__all__ = ["RECIPES", "Recipe", "RecipeContext", "RecipeResult"]
