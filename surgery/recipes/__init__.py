"""Recipes: YAML chains of patches, fine-tunes, evaluations, gates, save and push."""

from __future__ import annotations

from typing import Any

from surgery.errors import RecipeError, SurgeryError
from surgery.recipes.schema import Recipe, load_recipe, validate_data


def dry_run(recipe: Recipe, model: str | None = None) -> list[str]:
    """Apply the recipe's patches to a meta-device skeleton of `model` (default: the recipe's),
    without loading weights; returns one line per patch, or raises RecipeError naming the step."""
    from surgery.hub import skeleton
    from surgery.models import load_config

    skeleton_model = skeleton(load_config(model or recipe.model))
    lines = []
    for step in recipe.compiled:
        try:
            line = step.dry_run(skeleton_model)
        except SurgeryError as err:
            raise RecipeError(model or recipe.model, [str(err)]) from None
        if line:
            lines.append(line)
    return lines


def run_recipe(recipe: Recipe, out: Any, **kwargs: Any):
    from surgery.recipes.runner import run_recipe as run

    return run(recipe, out, **kwargs)


__all__ = ["Recipe", "RecipeError", "dry_run", "load_recipe", "run_recipe", "validate_data"]
