"""Unlearning recipes: one module each, one registry (RECIPES)."""
from cleanse.recipes import finetune, tar_ewc  # noqa: F401  (registration)
from cleanse.recipes.base import RECIPES, Recipe, RecipeContext, RecipeResult

__all__ = ["RECIPES", "Recipe", "RecipeContext", "RecipeResult"]
