"""Recipes: YAML chains of patches, fine-tunes, evaluations, gates, save and push."""

from __future__ import annotations

from typing import Any

from surgery.errors import RecipeError
from surgery.recipes.schema import Recipe, load_recipe, validate_data
from surgery.recipes.step import dry_run


def run_recipe(recipe: Recipe, out: Any, **kwargs: Any):
    from surgery.recipes.runner import run_recipe as run

    return run(recipe, out, **kwargs)


__all__ = ["Recipe", "RecipeError", "dry_run", "load_recipe", "run_recipe", "validate_data"]
