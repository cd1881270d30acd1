"""A recipe run's report: the before/after table, the model card section, plots that say what
they show ("before", "after yarn ×2", "after full heal") and the report directory itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery.evaluate.report import (
    Report,
    Row,
    compare_rows,
    markdown_table,
    plot_divergence,
    plot_needle,
    plot_perplexity,
    plot_ruler,
    pyplot,
)
from surgery.io import MARKER, atomic_dir
from surgery.recipes.state import RunState

STATE = "state.json"


def run_of(directory: Path) -> dict[str, Any]:
    """The recipe run that wrote `directory` (a save or a report): its `fingerprint` (the recipe)
    and `id` (the run itself, kept across resumes); {} for anything else."""
    try:
        run = json.loads((directory / MARKER).read_text()).get("run") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return run if isinstance(run, dict) else {}


def stamp(state: RunState, **extra: Any) -> dict[str, Any]:
    """What a run records in the outputs it writes, so that only it may replace them on resume."""
    return {"fingerprint": state.fingerprint, "id": state.run_id, **extra}


def rows(state: RunState) -> list[Row]:
    intervals = (state.estimates(first=True), state.estimates(first=False))
    return compare_rows(state.metrics(first=True), state.metrics(first=False), intervals)


def final_table(state: RunState) -> str:
    return markdown_table(rows(state), state.gates or None) if state.results else "(no evaluations)"


def card_section(recipe: Any, state: RunState) -> str:
    return "\n## Recipe\n\n```yaml\n" + recipe.to_yaml() + "```\n\n## Before / after\n\n" + final_table(state) + "\n"


def labelled(recipe: Any, state: RunState) -> dict[str, Report]:
    """The results grouped by what the model was when they were measured ("before", "after yarn
    ×2"): one report per stage, holding each eval family once; a second eval of one family at the
    same stage gets its own entry, told apart by its step number."""
    out: dict[str, Report] = {}
    for r in state.results:
        step = r.details["step"]
        label = r.details.get("label") or state.labels.get(str(step), f"step {step + 1}")
        if label in out and any(x.name == r.name for x in out[label].results):
            label = f"{label} (step {step + 1})"
        out.setdefault(label, Report(model=recipe.model, results=[])).results.append(r)
    return out


def write_report(recipe: Any, out: Path, state: RunState, table: str, force: bool) -> None:
    """Write the report directory `out` atomically: results, recipe, state, plots, report.md."""
    with atomic_dir(out, force) as tmp:
        (tmp / MARKER).write_text(json.dumps({"run": stamp(state)}, indent=2) + "\n")
        (tmp / "results.json").write_text(Report(model=recipe.model, results=state.results).model_dump_json(indent=2))
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / STATE).write_text(state.model_dump_json(indent=2))
        by_step = labelled(recipe, state)
        lines = [f"# Recipe run: {recipe.model}", "", table, ""]
        if state.failed:
            what = "could not tell (inconclusive)" if state.status == "inconclusive" else "failed"
            lines += [f"**A gate {what}: later save and push steps were skipped.**", ""]
        plots = (
            ("perplexity", plot_perplexity),
            ("needle", plot_needle),
            ("divergence", plot_divergence),
            ("ruler", plot_ruler),
        )
        for name, plot in plots:
            if plot(by_step, tmp / f"{name}.png"):
                lines += [f"![{name}]({name}.png)", ""]
        if state.finetunes and plot_losses(state.finetunes, tmp / "loss.png"):
            lines += ["![fine-tune loss](loss.png)", ""]
        lines += ["| step | seconds |", "|---|---:|"]
        lines += [f"| {int(i) + 1}. {recipe.compiled[int(i)].label} | {s:.1f} |" for i, s in state.seconds.items()]
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
        if state.finetunes:
            (tmp / "finetune.json").write_text(json.dumps(state.finetunes, indent=2))


def plot_losses(finetunes: list[dict[str, Any]], path: Path) -> Path | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in finetunes:
        steps, losses = range(1, len(run["losses"]) + 1), run["losses"]
        (raw,) = ax.plot(steps, losses, alpha=0.3, linewidth=0.8)
        smooth, average = [], losses[0]
        for loss in losses:  # exponential moving average over ~10 steps: the trend through the noise
            average = 0.9 * average + 0.1 * loss
            smooth.append(average)
        name = run.get("label") or f"finetune at step {run['step'] + 1}"
        ax.plot(steps, smooth, color=raw.get_color(), label=f"{name} (moving average)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
