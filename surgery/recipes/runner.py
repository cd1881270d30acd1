"""Running a recipe: load, then each step in order with progress; the first occurrence of a metric
is its baseline, the last its final value; a failed gate stops the run before anything is saved or
pushed.

Work happens in `OUT.partial/` (a state file after every step, a checkpoint after every step that
changes the model); the report lands in `OUT` by an atomic rename at the end. A killed run leaves
no half-written output, and `resume=True` continues after the last completed step. Under
`accelerate launch` every process runs the steps (fine-tunes are data-parallel); only the main
process writes files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from surgery.errors import OutputExists, SurgeryError
from surgery.evaluate.base import EvalResult
from surgery.evaluate.gates import GateOutcome, evaluate_gates
from surgery.recipes.schema import Recipe, Step

log = logging.getLogger(__name__)

STATE = "state.json"
CHECKPOINT = "checkpoint"


class RunState(BaseModel):
    """Everything a resumed run needs, rewritten atomically after each step."""

    fingerprint: str
    completed: int = 0
    results: list[EvalResult] = []
    gates: list[GateOutcome] = []
    finetunes: list[dict[str, Any]] = []
    saved: list[str] = []
    pushed: list[str] = []
    failed: bool = False
    checkpoint: bool = False
    seconds: dict[str, float] = Field(default_factory=dict)

    def metrics(self, first: bool) -> dict[str, float]:
        """First (baseline) or last value of every metric, in the order the results came."""
        out: dict[str, float] = {}
        for r in self.results:
            for k, v in r.metrics.items():
                if not first or k not in out:
                    out[k] = v
        return out


class RunOutcome(BaseModel):
    out: Path
    passed: bool
    table: str
    state: RunState


def fingerprint(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:16]


def write_state(partial: Path, state: RunState) -> None:
    tmp = partial / f".{STATE}.tmp"
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(partial / STATE)


def start_state(recipe: Recipe, out: Path, partial: Path, resume: bool, force: bool) -> RunState:
    if resume:
        if not (partial / STATE).is_file():
            raise SurgeryError(f"nothing to resume: {partial} has no {STATE}; run without --resume")
        state = RunState.model_validate_json((partial / STATE).read_text())
        if state.fingerprint != fingerprint(recipe):
            raise SurgeryError(
                f"{partial} was started from a different recipe (or other --set values); "
                "run it with the same ones, or start over with --force"
            )
        return state
    if out.exists() and not force:
        raise OutputExists(f"{out} already exists; pass --force to overwrite it or choose another --out")
    if partial.exists():
        if not force:
            raise OutputExists(
                f"{partial} holds an interrupted run; continue it with --resume or start over with --force"
            )
        shutil.rmtree(partial)
    return RunState(fingerprint=fingerprint(recipe))


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
    api: Any = None,
) -> RunOutcome:
    """Run every step of `recipe`; the report goes to `out`. Returns whether all gates passed."""
    import torch
    from accelerate import PartialState

    import surgery
    from surgery.hub import check_output

    process = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo across processes
    main = process.is_main_process
    say = echo if main else (lambda _msg: None)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    state = start_state(recipe, out, partial, resume, force)
    for step in recipe.compiled:  # a save target that exists fails now, not after an hour of work
        if step.verb == "save" and step.index >= state.completed and not step.payload.force:
            check_output(Path(step.payload.path), False)
    source = str(partial / CHECKPOINT) if state.checkpoint else recipe.model
    say(f"loading {source}" + (f" (resuming after step {state.completed})" if resume else ""))
    model, tokenizer = surgery.load_model(
        source, dtype=recipe.dtype, device=recipe.device
    )  # a bad model: no state left
    if main:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "recipe.yaml").write_text(recipe.to_yaml())
        write_state(partial, state)
    process.wait_for_everyone()
    total = len(recipe.compiled)
    for step in recipe.compiled:
        if step.index < state.completed:
            continue
        if state.failed:
            say(f"[{step.index + 1}/{total}] {step.label}: skipped (a gate failed)")
            continue
        say(f"[{step.index + 1}/{total}] {step.label}")
        start = time.perf_counter()
        changed = run_step(step, recipe, model, tokenizer, state, partial, say, api, main)
        state.seconds[str(step.index)] = time.perf_counter() - start
        state.completed = step.index + 1
        if changed and main and step.index + 1 < total:  # resume restarts from this checkpoint
            surgery.save(model, tokenizer, partial / CHECKPOINT, base_model=recipe.model, force=True)
            state.checkpoint = True
        if main:
            write_state(partial, state)
        process.wait_for_everyone()
    table = final_table(state)
    say(table)
    if main:
        finish(recipe, out, partial, state, table, force)
    process.wait_for_everyone()
    passed = not state.failed
    say(f"{'all gates passed' if passed else 'a gate FAILED'}; report: {out / 'report.md'}")
    return RunOutcome(out=out, passed=passed, table=table, state=state)


def run_step(
    step: Step,
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    state: RunState,
    partial: Path,
    say: Callable[[str], None],
    api: Any,
    main: bool,
) -> bool:
    """Run one step, updating `state`; True when the model changed (so it is checkpointed)."""
    import surgery
    from surgery.recipes.finetune import run_finetune

    payload = step.payload
    if step.verb == "patch":
        record = surgery.apply(model, payload, tokenizer=tokenizer)
        for note in record.notes:
            say(f"    {note}")
        return True
    if step.verb == "finetune":
        result = run_finetune(model, tokenizer, payload, seed=recipe.seed)
        losses = result["losses"]
        state.finetunes.append({"step": step.index, **result})
        say(
            f"    loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps, "
            f"{result['tokens']:,} tokens, {result['seconds']:.0f} s"
        )
        return True
    if step.verb == "eval":
        result = payload.run(model, tokenizer)
        result.details["step"] = step.index
        state.results.append(result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        say(f"    {shown} ({result.seconds:.0f} s)")
        return False
    if step.verb == "gate":
        outcomes = evaluate_gates(payload, state.metrics(first=True), state.metrics(first=False))
        state.gates.extend(outcomes)
        for o in outcomes:
            say(f"    {'pass' if o.passed else 'FAIL'}  {o.metric}: {o.message}")
        state.failed = state.failed or not all(o.passed for o in outcomes)
        return False
    if step.verb == "save":
        if main:
            surgery.save(
                model,
                tokenizer,
                payload.path,
                base_model=recipe.model,
                force=payload.force,
                card_extra=card_section(recipe, state),
                files={"recipe.yaml": recipe.to_yaml()},
            )
        state.saved.append(payload.path)
        say(f"    saved {payload.path}")
        return False
    from surgery.hub import push

    folder = payload.path or state.saved[-1]
    if main:
        url = push(folder, payload.repo_id, private=payload.private, revision=payload.revision, api=api)
        state.pushed.append(url)
        say(f"    pushed {folder} to {url}")
    return False


def rows(state: RunState) -> list[Any]:
    from surgery.evaluate.report import Row

    before, after = state.metrics(first=True), state.metrics(first=False)
    return [Row(metric=k, before=before[k], after=after[k]) for k in after]


def final_table(state: RunState) -> str:
    from surgery.evaluate.report import markdown_table

    return markdown_table(rows(state), state.gates or None) if state.results else "(no evaluations)"


def card_section(recipe: Recipe, state: RunState) -> str:
    return "\n## Recipe\n\n```yaml\n" + recipe.to_yaml() + "```\n\n## Before / after\n\n" + final_table(state) + "\n"


def finish(recipe: Recipe, out: Path, partial: Path, state: RunState, table: str, force: bool) -> None:
    """Write the report into `out` atomically and drop the partial run."""
    from surgery.evaluate.report import Report, plot_needle, plot_perplexity
    from surgery.hub import atomic_dir

    with atomic_dir(out, force) as tmp:
        (tmp / "results.json").write_text(Report(model=recipe.model, results=state.results).model_dump_json(indent=2))
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / STATE).write_text(state.model_dump_json(indent=2))
        by_step = {f"step {r.details['step'] + 1}": Report(model=recipe.model, results=[r]) for r in state.results}
        lines = [f"# Recipe run: {recipe.model}", "", table, ""]
        if state.failed:
            lines += ["**A gate failed: later save and push steps were skipped.**", ""]
        for name, plot in (("perplexity", plot_perplexity), ("needle", plot_needle)):
            if plot(by_step, tmp / f"{name}.png"):
                lines += [f"![{name}]({name}.png)", ""]
        if state.finetunes and plot_losses(state.finetunes, tmp / "loss.png"):
            lines += ["![fine-tune loss](loss.png)", ""]
        lines += ["| step | seconds |", "|---|---:|"]
        lines += [f"| {int(i) + 1}. {recipe.compiled[int(i)].label} | {s:.1f} |" for i, s in state.seconds.items()]
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
        if state.finetunes:
            (tmp / "finetune.json").write_text(json.dumps(state.finetunes, indent=2))
    shutil.rmtree(partial, ignore_errors=True)


def plot_losses(finetunes: list[dict[str, Any]], path: Path) -> Path | None:
    from surgery.evaluate.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in finetunes:
        steps, losses = range(1, len(run["losses"]) + 1), run["losses"]
        (raw,) = ax.plot(steps, losses, alpha=0.3, linewidth=0.8)
        smooth, average = [], losses[0]
        for loss in losses:  # exponential moving average over ~10 steps: the trend through the noise
            average = 0.9 * average + 0.1 * loss
            smooth.append(average)
        ax.plot(steps, smooth, color=raw.get_color(), label=f"recipe step {run['step'] + 1} (moving average)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
