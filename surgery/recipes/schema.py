"""The recipe file: a model, a dtype, a seed, and an ordered list of steps, each with exactly one
verb (`patch`, `finetune`, `eval`, `gate`, `save`, `push`).

Validation collects every problem of a file before reporting, each with its location
(`steps.2.factor`) and a did-you-mean, so a user fixes a recipe in one pass. The raw mapping is
kept as written (for the YAML round trip and the copy saved next to the output); `compile_steps`
turns it into typed steps: patch and eval steps are the registered pydantic classes themselves."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from surgery.errors import SurgeryError
from surgery.patch import PATCHES, Patch, did_you_mean

VERBS = ("patch", "finetune", "eval", "gate", "save", "push")


class RecipeError(SurgeryError):
    """Every problem found in a recipe, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems" + "".join(f"\n  {p}" for p in problems))


class Header(BaseModel):
    """Top-level keys of a recipe."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="hub id, local directory, .gguf file or smollm2")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="load dtype")
    seed: int = Field(0, description="seed for everything random (fine-tune data order, LoRA init)")
    device: str | None = Field(None, description="device or device_map for loading (default: CPU)")
    steps: list[Any] = Field(min_length=1, description="ordered steps, one verb each")


class SaveStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, pattern=r"\S", description="output directory (written atomically)")
    force: bool = Field(False, description="replace the directory if it exists")


class PushStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="user/name on the Hub")
    private: bool = Field(False, description="create the repository private")
    revision: str | None = Field(None, description="branch to push to (created if missing)")
    path: str | None = Field(None, description="directory to upload (default: the last save)")


class Step(BaseModel):
    """One compiled step: the verb and its typed payload."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    verb: str
    payload: Any

    @property
    def label(self) -> str:
        p = self.payload
        if self.verb == "patch":
            return f"patch {p.slug()}"
        if self.verb == "eval":
            return f"eval {p.name}"
        if self.verb == "finetune":
            return f"finetune {p.method} {p.max_steps} steps"
        if self.verb == "gate":
            return "gate " + "; ".join(g.text for g in p)
        if self.verb == "save":
            return f"save {p.path}"
        return f"push {p.repo_id}"


class Recipe(BaseModel):
    """A validated recipe: the header and the raw steps as written, plus the compiled steps."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    dtype: str = "float32"
    seed: int = 0
    device: str | None = None
    steps: list[dict[str, Any]]
    compiled: list[Step] = Field(default_factory=list, exclude=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def pydantic_problems(where: str, err: ValidationError, fields: list[str]) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = f"{where}.{loc}" if loc else where
        if e["type"] == "extra_forbidden":
            out.append(f"{path}: unknown key{did_you_mean(str(e['loc'][-1]), fields)}")
        elif e["type"] == "missing":
            out.append(f"{path}: required")
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
            message = e["msg"].removeprefix("Value error, ")
            out.append(f"{path}: {message}{got}")
    return out


def build(cls: type[BaseModel], where: str, params: dict[str, Any], problems: list[str]) -> Any:
    try:
        return cls(**params)
    except ValidationError as err:
        problems.extend(pydantic_problems(where, err, list(cls.model_fields)))
    except TypeError as err:  # non-string keys
        problems.append(f"{where}: {err}")
    return None


def compile_step(index: int, raw: Any, problems: list[str]) -> Step | None:
    from surgery.evaluate import EVALS
    from surgery.evaluate.gates import GateError, parse_gate
    from surgery.recipes.finetune import Finetune

    where = f"steps.{index}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: a step is a mapping such as {{patch: yarn, factor: 4}}; got {raw!r}")
        return None
    verbs = [k for k in raw if k in VERBS]
    if len(verbs) != 1:
        if not verbs:
            unknown = next((str(k) for k in raw), "")
            problems.append(
                f"{where}: no verb; each step has exactly one of {', '.join(VERBS)}"
                + (did_you_mean(unknown, list(VERBS)) if unknown else "")
            )
        else:
            problems.append(f"{where}: {' and '.join(verbs)} in one step; give each its own step")
        return None
    verb = verbs[0]
    value = raw[verb]
    rest = {k: v for k, v in raw.items() if k != verb}
    if verb in ("patch", "eval"):
        registry = PATCHES if verb == "patch" else EVALS
        if not isinstance(value, str) or value not in registry:
            hint = did_you_mean(str(value), list(registry)) if isinstance(value, str) else ""
            problems.append(f"{where}.{verb}: unknown {verb} {value!r}{hint}")
            return None
        payload = build(registry[value], where, rest, problems)
    elif verb == "finetune":
        params = dict(value or {}) if isinstance(value, dict) or value is None else {"method": value}
        if not isinstance(value, (dict, str)) and value is not None:
            problems.append(f"{where}.finetune: give a mapping of settings or a method name (lora, full)")
            return None
        payload = build(
            Finetune, f"{where}.finetune" if isinstance(value, dict) else where, {**params, **rest}, problems
        )
    elif verb == "gate":
        texts = value if isinstance(value, list) else [value]
        if rest or not texts or not all(isinstance(t, str) for t in texts):
            problems.append(
                f"{where}.gate: write METRIC:RULE=VALUE (or a list of them), e.g. perplexity.ppl@2048:max=15"
            )
            return None
        payload = []
        for t in texts:
            try:
                payload.append(parse_gate(t))
            except GateError as err:
                problems.append(f"{where}.gate: {err}")
    elif verb == "save":
        params = {"path": value} if isinstance(value, str) else value
        if not isinstance(params, dict):
            problems.append(f"{where}.save: give an output directory, e.g. save: out/my-model")
            return None
        payload = build(SaveStep, f"{where}.save", {**params, **rest}, problems)
    else:
        params = {"repo_id": value} if isinstance(value, str) else value
        if not isinstance(params, dict):
            problems.append(f"{where}.push: give a repository id, e.g. push: user/my-model")
            return None
        payload = build(PushStep, f"{where}.push", {**params, **rest}, problems)
    return Step(index=index, verb=verb, payload=payload) if payload is not None else None


def check_order(raw_steps: list[Any], compiled: dict[int, Step], problems: list[str]) -> None:
    """What a step needs must come before it: gates need their eval, push needs a save. Steps whose
    own settings are invalid still count by their verb, so one mistake does not cascade."""
    evals_so_far: set[str] = set()
    saved = False
    for index, raw in enumerate(raw_steps):
        verbs = [k for k in raw if k in VERBS] if isinstance(raw, dict) else []
        if len(verbs) != 1:
            continue
        verb, where = verbs[0], f"steps.{index}"
        if verb == "eval":
            evals_so_far.add(str(raw["eval"]))
        elif verb == "save":
            saved = True
        elif verb == "gate" and index in compiled:
            for gate in compiled[index].payload:
                family = gate.metric.split(".", 1)[0]
                if family not in evals_so_far and not any(ch in family for ch in "*?["):
                    problems.append(
                        f"{where}.gate: '{gate.metric}' needs an earlier '{family}' eval step"
                        + (f" (evals so far: {', '.join(sorted(evals_so_far))})" if evals_so_far else "")
                    )
        elif verb == "push" and not saved and not (isinstance(raw["push"], dict) and raw["push"].get("path")):
            problems.append(f"{where}.push: nothing saved yet; put a save step before push (or give push a path)")


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader (plain data, no tags that build objects), refusing duplicate keys, where
    PyYAML would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; give each key once", key_node.start_mark
                )
            seen.add(key if isinstance(key, (str, int, float, bool)) else id(key_node))
        return super().construct_mapping(node, deep=deep)


MAX_DEPTH = 64  # deeper nesting is not a recipe; refusing it also keeps the parser off the recursion limit


def nesting(text: str) -> int:
    """How deeply flow collections ([ and {) nest in `text`, ignoring quoted strings roughly."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


MAX_VALUES = 100_000  # values in a recipe once aliases are expanded (a "billion laughs" stays small on disk)


def expanded_size(data: Any, memo: dict[int, int] | None = None) -> int:
    """How many values `data` holds with every alias expanded, in time linear in what was parsed
    (aliases are shared objects: each is sized once)."""
    memo = {} if memo is None else memo
    if id(data) in memo:
        return memo[id(data)]
    children = list(data.values()) if isinstance(data, dict) else data if isinstance(data, list) else []
    size = 1 + sum(expanded_size(child, memo) for child in children)
    memo[id(data)] = size
    return size


def safe_yaml(text: str) -> Any:
    """Parse YAML as plain data: duplicate keys, object tags, runaway nesting and alias bombs are
    errors."""
    if nesting(text) > MAX_DEPTH:
        raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep") from None
    if expanded_size(data) > MAX_VALUES:
        raise yaml.YAMLError(f"more than {MAX_VALUES:,} values once aliases are expanded; write the recipe out")
    return data


def parse_yaml(text: str, source: str) -> Any:
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "could not determine a constructor" in problem:
            problem = "tags that build Python objects (!!python/...) are not allowed; write plain values"
        raise RecipeError(source, [f"YAML error{where}: {problem}"]) from None
    if data is None:
        raise RecipeError(source, ["the file is empty (or only comments); a recipe needs model: and steps:"])
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """`steps.1.factor=8` style overrides (values parsed as YAML) applied before validation."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            problems.append(f"--set {item!r}: write KEY=VALUE, e.g. steps.1.factor=8")
            continue
        parts = key.split(".")
        node: Any = data
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            last = parts[-1]
            value = safe_yaml(raw) if raw else None
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            if "could not determine a constructor" in reason:
                reason = "tags that build Python objects (!!python/...) are not allowed"
            problems.append(f"--set {key}: {reason}; write a plain value")
        except (KeyError, IndexError, ValueError, TypeError):
            problems.append(f"--set {item!r}: no '{key}' in the recipe")
    if problems:
        raise RecipeError(source, problems)
    return data


def validate_data(data: Any, source: str) -> Recipe:
    """A Recipe from parsed YAML, or RecipeError listing every problem."""
    if not isinstance(data, dict):
        raise RecipeError(
            source, [f"the top level must be a mapping with model: and steps:; got {type(data).__name__}"]
        )
    problems: list[str] = []
    header = build(Header, "", data, problems)
    problems = [p.lstrip(".") for p in problems]
    steps = data.get("steps")
    compiled: list[Step] = []
    if isinstance(steps, list):
        for i, raw in enumerate(steps):
            step = compile_step(i, raw, problems)
            if step is not None:
                compiled.append(step)
        check_order(steps, {s.index: s for s in compiled}, problems)
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


def patches_of(recipe: Recipe) -> list[Patch]:
    return [s.payload for s in recipe.compiled if s.verb == "patch"]
