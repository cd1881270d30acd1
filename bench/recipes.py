"""The regression table: run every example recipe on the embedded model and print, for each, the
gate outcome (and whether it is the expected one), the metrics before and after, and wall time.

    python bench/recipes.py [--only yarn,kv] [--out runs/bench]

Each recipe runs as a fresh `surgery run` process with its save step redirected under --out (so
nothing outside it is touched). Recipes whose name says they must fail (see EXPECTED_TO_FAIL) count
as correct when their gate fails."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_TO_FAIL = {"smollm2-sliding-window"}


def save_overrides(recipe: Path, out: Path) -> list[str]:
    steps = yaml.safe_load(recipe.read_text())["steps"]
    sets = []
    for i, step in enumerate(steps):
        if "save" in step:
            target = out / "saved" / recipe.stem
            sets += ["--set", f"steps.{i}={json.dumps({'save': str(target), 'force': True})}"]
    return sets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated substrings of recipe names")
    parser.add_argument("--out", default="runs/bench", type=Path)
    args = parser.parse_args()
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    if args.only:
        recipes = [r for r in recipes if any(s in r.stem for s in args.only.split(","))]
    table = ["| recipe | gates | expected | metric | before | after | wall |", "|---|---|---|---|---:|---:|---:|"]
    for recipe in recipes:
        out = args.out / recipe.stem
        cmd = [sys.executable, "-m", "surgery.cli", "run", str(recipe), "--out", str(out), "--force"]
        start = time.perf_counter()
        proc = subprocess.run(cmd + save_overrides(recipe, args.out), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            print(proc.stderr[-2000:])
            raise SystemExit(f"{recipe.name}: exit {proc.returncode}")
        passed = proc.returncode == 0
        expected = passed != (recipe.stem in EXPECTED_TO_FAIL)
        state = json.loads((out / "state.json").read_text())
        first, last = {}, {}
        for result in state["results"]:
            for k, v in result["metrics"].items():
                first.setdefault(k, v)
                last[k] = v
        gated = {g["metric"] for g in state["gates"]}
        print(
            f"{recipe.stem}: {'pass' if passed else 'FAIL'} ({'as expected' if expected else 'UNEXPECTED'}), {wall:.0f} s"
        )
        for i, metric in enumerate(sorted(gated)):
            head = (
                f"| {recipe.stem} | {'pass' if passed else 'fail'} | {'yes' if expected else 'NO'} |"
                if i == 0
                else "| | | |"
            )
            table.append(
                f"{head} {metric} | {first[metric]:.4g} | {last[metric]:.4g} | {f'{wall:.0f} s' if i == 0 else ''} |"
            )
        for ft in state["finetunes"]:
            print(f"  finetune: {len(ft['losses'])} steps, {ft['tokens']:,} tokens, {ft['seconds']:.0f} s")
    print("\n".join(table))


if __name__ == "__main__":
    main()
