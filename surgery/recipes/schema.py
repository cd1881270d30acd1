"""The recipe file: a model, a dtype, a seed, and an ordered list of steps, each with exactly one
verb (`patch`, `finetune`, `eval`, `gate`, `save`, `push`).

Validation collects every problem of a file before reporting, each with its location
(`steps.2.factor`) and a did-you-mean, so a user fixes a recipe in one pass. The raw mapping is
kept as written (for the YAML round trip and the copy saved next to the output); `compile_steps`
(`steps.py`) turns it into typed steps, one class per verb."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import RecipeError, SurgeryError
from surgery.recipes.loading import apply_overrides, parse_yaml
from surgery.recipes.step import build
from surgery.recipes.steps import AnyStep, compile_steps, trained_sources


class Header(BaseModel):
    """Top-level keys of a recipe."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="hub id, local directory, .gguf file or smollm2")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="load dtype")
    seed: int = Field(0, description="seed for everything random (fine-tune data order, LoRA init)")
    device: str | None = Field(None, description="device or device_map for loading (default: CPU)")
    steps: list[Any] = Field(min_length=1, description="ordered steps, one verb each")


class Recipe(BaseModel):
    """A validated recipe: the header and the raw steps as written, plus the compiled steps."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    dtype: str = "float32"
    seed: int = 0
    device: str | None = None
    steps: list[dict[str, Any]]
    compiled: list[AnyStep] = Field(default_factory=list, exclude=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def validate_data(data: Any, source: str) -> Recipe:
    """A Recipe from parsed YAML, or RecipeError listing every problem."""
    if not isinstance(data, dict):
        raise RecipeError(
            source, [f"the top level must be a mapping with model: and steps:; got {type(data).__name__}"]
        )
    problems: list[str] = []
    header = build(Header, "", data, problems)
    steps = data.get("steps")
    compiled = compile_steps(steps, problems) if isinstance(steps, list) else []
    if problems or header is None:
        raise RecipeError(source, problems)
    return Recipe(
        model=header.model,
        dtype=header.dtype,
        seed=header.seed,
        device=header.device,
        steps=steps,
        compiled=compiled,
    )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"no recipe at {path}; pass a YAML file (see recipes/ for examples)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(str(path), [f"not UTF-8 text (byte {err.start}); save the recipe as UTF-8"]) from None
    except OSError as err:
        raise SurgeryError(f"cannot read {path}: {err.strerror}") from None
    data = parse_yaml(text, str(path))
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(str(path), ["--set needs a recipe whose top level is a mapping"])
        data = apply_overrides(data, overrides, str(path))
    return validate_data(data, str(path))


def recipe_trained(model: str) -> tuple[set[str], str | None]:
    """The text sources the recipe saved beside a local model (`recipe.yaml`) trained or calibrated
    on, and a note when that recipe cannot be read (nothing is assumed then). Read as YAML data
    and validated like any recipe; nothing in it runs."""
    from surgery.models import resolve

    where = resolve(model).paths()[0]
    path = where / "recipe.yaml" if where.is_dir() else None
    if path is None or not path.is_file():
        return set(), None
    try:
        recipe = validate_data(parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path))
    except Exception as err:  # noqa: BLE001 - whatever is wrong with it, the check goes on without it
        return set(), f"could not read {path} to see what the model trained on ({str(err).splitlines()[0]})"
    return set(trained_sources(recipe.compiled)), None
