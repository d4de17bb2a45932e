"""Unlearning recipes: one module each, one registry (RECIPES)."""

from cleanse.recipes import act_edit, finetune, grad_prune, sau, tar_ewc, ulrl  # noqa: F401  (registration)
from cleanse.recipes.base import RECIPES, Recipe, RecipeContext, RecipeResult

__all__ = ["RECIPES", "Recipe", "RecipeContext", "RecipeResult"]
