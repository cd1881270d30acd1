"""The base of a recipe step, and the helpers steps share to parse their YAML. Each verb is one
subclass in `steps.py`; nothing here knows the verbs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from surgery.errors import RecipeError, SurgeryError, did_you_mean, validation_problems
from surgery.lazy import torch
from surgery.recipes.state import RunContext


@dataclasses.dataclass
class Seen:
    """What earlier steps provide, for the ordering rules."""

    evals: set[str] = dataclasses.field(default_factory=set)
    saved: bool = False
    pushed: dict[str, int] = dataclasses.field(default_factory=dict)  # resolved path -> index of the push naming it


def build(cls: type[BaseModel], where: str, params: Any, problems: list[str]) -> Any:
    """`cls(**params)`, or None with every problem appended to `problems`."""
    try:
        return cls(**params)
    except ValidationError as err:
        problems.extend(validation_problems(err, list(cls.model_fields), where))
    except TypeError as err:  # non-string keys
        problems.append(f"{where}: {err}")
    return None


def registered(
    registry: dict[str, type[BaseModel]], verb: str, index: int, value: Any, rest: dict, problems: list[str]
) -> Any:
    """The registered patch or eval named `value`, built from the step's other keys."""
    if not isinstance(value, str) or value not in registry:
        hint = did_you_mean(str(value), list(registry)) if isinstance(value, str) else ""
        problems.append(f"steps.{index}.{verb}: unknown {verb} {value!r}{hint}")
        return None
    return build(registry[value], f"steps.{index}", rest, problems)


def settings(
    cls: type[BaseModel], verb: str, key: str, example: str, index: int, value: Any, rest: dict, problems: list[str]
) -> Any:
    """Settings given as one string (`save: out/x`, read as `key`) or as a mapping."""
    where = f"steps.{index}.{verb}"
    params = {key: value} if isinstance(value, str) else value
    if not isinstance(params, dict):
        problems.append(f"{where}: give {example}")
        return None
    return build(cls, where, {**params, **rest}, problems)


class Step(BaseModel):
    """Base of every step: its position and its typed settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    verb: ClassVar[str]
    needs_model: ClassVar[bool] = True  # False: runs on results or on the checkpoint on disk
    index: int

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        """The step from its YAML value (`rest` holds the step's other keys), or None with problems."""
        raise NotImplementedError

    @classmethod
    def note(cls, value: Any, seen: Seen) -> None:
        """Record what this step provides to later ones (called even when its settings are invalid)."""

    def order(self, seen: Seen, problems: list[str]) -> None:
        """Append a problem when an earlier step this one needs is missing."""

    @property
    def label(self) -> str:
        raise NotImplementedError

    def outputs(self) -> list[tuple[Path, bool]]:
        """Directories this step will write, with whether it may replace them (checked up front)."""
        return []

    def dry_run(self, skeleton: torch.nn.Module, source: str, before: list[Step]) -> str | None:
        """Simulate the step on a meta-device model (`skeleton`, built from the model `source` and
        carrying the steps `before` this one); a line to show, or None for steps without effect."""
        return None

    def run(self, ctx: RunContext) -> bool:
        """Run the step; True when the model changed (so the runner checkpoints it)."""
        raise NotImplementedError


def dry_run(recipe: Any, model: str | None = None) -> list[str]:
    """Apply the recipe's patches to a meta-device skeleton of `model` (default: the recipe's),
    without loading weights; returns one line per patch, or raises RecipeError naming the step."""
    from surgery.models import load_config, skeleton

    skeleton_model = skeleton(load_config(model or recipe.model))
    lines = []
    for i, step in enumerate(recipe.compiled):
        try:
            line = step.dry_run(skeleton_model, model or recipe.model, recipe.compiled[:i])
        except SurgeryError as err:
            raise RecipeError(model or recipe.model, [str(err)]) from None
        if line:
            lines.append(line)
    return lines
