"""User-facing errors, and the one formatter for validation problems. Each message says what was
found and what to do; the CLI prints it as one line and exits 2. `assert` stays for internal
invariants only."""

from __future__ import annotations

import difflib
from typing import Any


def reason(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (cut to `limit` characters), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


class SurgeryError(Exception):
    """Base of every error a user can cause and fix."""


class UnsupportedModel(SurgeryError):
    """A patch cannot run on this model; the message says why and what would work."""


class ModelNotFound(SurgeryError):
    """A model reference could not be resolved to weights or a config."""


class OutputExists(SurgeryError):
    """An output path exists and overwriting was not asked for."""


class InvalidParams(SurgeryError):
    """Patch, eval or command parameters failed validation."""


class PatchDidNotTakeEffect(SurgeryError):
    """A patch ran but the model does not show its effect (a bug, never silent)."""


class UnknownPatch(SurgeryError):
    """No patch is registered under the name given."""


class UnknownEval(SurgeryError):
    """No eval is registered under the name given."""


class GateError(SurgeryError):
    """A gate expression that cannot be parsed."""


class UnsafeOutput(SurgeryError):
    """An output cannot be written where asked (it is the source, an ancestor of the working
    directory, something surgery did not write, or the location is not writable)."""


class OutputBusy(SurgeryError):
    """Another process holds the lock on an output."""


class UnsafeInput(SurgeryError):
    """A checkpoint is corrupt, incomplete, or would need foreign code (remote code, pickles)."""


class RecipeError(SurgeryError):
    """Every problem found in a recipe: one line for one problem, else a count and one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems" + "".join(f"\n  {p}" for p in problems))


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(sorted(choices))}"


def validation_problems(
    err: Any, fields: list[str], where: str = "", rename: dict[str, str] | None = None
) -> list[str]:
    """One line per problem of a pydantic ValidationError: `where.field: message (got value)`, with
    a did-you-mean for unknown keys. `rename` shows fields as the user typed them (`--factor`)."""
    out = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and rename and loc[0] in rename:
            loc[0] = rename[loc[0]]
        path = ".".join(p for p in [where, *loc] if p)
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            out.append(f"{path}: unknown key{did_you_mean(str(e['loc'][-1]), fields)}")
        elif e["type"] == "missing":
            out.append(f"{path}: required")
        elif not path:  # a check across fields: the message says which
            out.append(message)
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
            out.append(f"{path}: {message}{got}")
    return out


def numbers_not_bools(cls: Any, data: Any) -> Any:
    """A pydantic `mode="before"` model validator: refuse true/false given for a numeric field
    (pydantic would read them as 1 and 0)."""
    if isinstance(data, dict):
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if isinstance(value, bool) and field is not None and bool not in _types(field.annotation):
                raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
    return data


def _types(annotation: Any) -> set[Any]:
    import typing

    args = typing.get_args(annotation)
    return {t for a in args for t in _types(a)} if args else {annotation}
