"""The package's layering: no import cycles, counting imports inside functions too, and every module
importable on its own (nothing else of surgery loaded first)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The surgery modules `path` imports anywhere in its body (functions included), plus the
    subpackages whose __init__ such an import runs first (not the module's own packages, which
    are already running, nor the root facade unless it is named)."""
    explicit: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            known = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES]
            if parts[0] == "surgery" and known:
                explicit.add(known[0])
    own = module_name(path)
    implicit = {".".join(m.split(".")[:i]) for m in explicit for i in range(2, m.count(".") + 1)}
    implicit = {p for p in implicit if not own.startswith(p + ".")}
    return (explicit | implicit) - {own}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_even_inside_functions():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert graph["surgery.patch"] >= {"surgery.arch", "surgery.errors"}  # the graph sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# the README's layout, bottom up: a module may import its own layer and the ones before it
LAYERS = [
    "surgery.lazy",
    "surgery.errors",
    "surgery.keys",
    "surgery.arch",
    "surgery.patch",
    "surgery.io",
    "surgery.checkpoint",
    "surgery.info",
    "surgery.models",
    "surgery.data",
    "surgery.evaluate",
    "surgery.patches",
    "surgery.hub",
    "surgery.config_data",
    "surgery.streaming",
    "surgery.routes",
    "surgery.export",
    "surgery",  # the public facade (surgery.load_model, surgery.save, ...)
    "surgery.check",
    "surgery.recipes",
    "surgery.cli_apply",
    "surgery.cli",
]


def layer(module: str) -> int:
    """The layer of a module: its own entry, or its package's (the root facade counts only itself)."""
    return max(
        i
        for i, prefix in enumerate(LAYERS)
        if module == prefix or (prefix != "surgery" and module.startswith(prefix + "."))
    )


def test_no_module_imports_a_layer_above_its_own():
    assert {layer(m) for m in MODULES} == set(range(len(LAYERS)))  # every layer exists, every module has one
    upward = [(m, i) for m, path in MODULES.items() if m != "surgery" for i in imports_of(path) if layer(i) > layer(m)]
    assert upward == [], upward


def test_every_module_imports_on_its_own():
    """Each module imported first, with no other surgery module loaded before it (one interpreter,
    surgery's modules dropped between imports; third-party libraries stay loaded, for speed)."""
    script = f"""
import importlib, sys
failed = []
for name in {sorted(MODULES)!r}:
    for loaded in [m for m in sys.modules if m == "surgery" or m.startswith("surgery.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{{name}}: {{type(err).__name__}}: {{err}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


QUICK = [
    ["--help"],
    ["list"],
    ["validate", "recipes/smollm2-mqa-heal.yaml"],
    ["apply", "yarn", "--help"],
    ["inspect"],
    ["apply", "yarn"],
]


@pytest.mark.parametrize("args", QUICK, ids=lambda a: " ".join(a))
def test_the_quick_commands_import_neither_torch_nor_transformers(args, tmp_path):
    """`surgery --help`, `list`, `validate` (no --model), `inspect` of a local checkpoint and a
    config-only `apply` start in about a second: torch and transformers (seconds each) are bound
    lazily (surgery.lazy) and loaded by the commands that touch a tensor or need a config class."""
    if args in (["inspect"], ["apply", "yarn"]):
        from tests.conftest import tiny_model

        tiny_model("qwen2").save_pretrained(tmp_path / "src")
        args = [*args, str(tmp_path / "src")]
        if args[0] == "apply":
            args += ["--factor", "4", "-o", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "surgery.cli", *args],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "scipy", "accelerate", "peft"))
    assert heavy == [], heavy[:10]
    if args[0] == "inspect":
        assert "GQA-2" in result.stdout and "(90,688)" in result.stdout, result.stdout
    elif args[:2] == ["apply", "yarn"] and "--help" not in args:
        assert "config only" in result.stdout, result.stdout
        assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]["factor"] == 4
    else:
        assert "surgery.patches.rope" in imported and "surgery.evaluate.ruler" in imported  # the registries loaded
