"""Reading recipe YAML as plain data: the safe loader (no tags that build objects), duplicate keys
refused, nesting and alias expansion bounded, `--set KEY=VALUE` overrides applied before
validation. Every problem is a `RecipeError` naming its place."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from surgery.errors import RecipeError


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


def expanded_size(data: Any) -> int:
    """How many values `data` holds with every alias expanded, in time linear in what was parsed
    (aliases are shared objects: each is sized once). An alias inside its own anchor is an error."""
    memo: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: Any) -> int:
        if id(node) in memo:
            return memo[id(node)]
        if id(node) in open_:
            raise yaml.YAMLError("an alias refers to the mapping or list that contains it; write the value out")
        children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
        open_.add(id(node))
        total = 1 + sum(size(child) for child in children)
        open_.discard(id(node))
        memo[id(node)] = total
        return total

    return size(data)


def safe_yaml(text: str) -> Any:
    """Parse YAML as plain data: duplicate keys, object tags, runaway nesting and alias bombs are
    errors."""
    if nesting(text) > MAX_DEPTH:
        raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        values = expanded_size(data)
    except RecursionError:
        raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep") from None
    if values > MAX_VALUES:
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
    problems: list[str] = []
    keys = [item.partition("=")[0] for item in overrides]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        problems.append(f"--set {key} is given {keys.count(key)} times; give it once")
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            problems.append(f"--set {item!r}: write KEY=VALUE, e.g. steps.1.factor=8")
            continue
        parts = key.split(".")
        if any(p.startswith("-") and p[1:].isdigit() for p in parts):
            problems.append(
                f"--set {key}: list positions count from 0 (steps.0 is the first step); negative ones are not taken"
            )
            continue
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
