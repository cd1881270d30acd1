"""Running a recipe: load, then each step in order with progress; the first occurrence of a metric
is its baseline, the last its final value; a failed gate stops the run before anything is saved or
pushed.

Work happens in `OUT.partial/` (a state file after every step, a checkpoint after every step that
changes the model); the report lands in `OUT` by an atomic rename at the end. A killed run leaves
no half-written output, and `resume=True` continues after the last completed step.

Resuming is exact because the state names the checkpoint it describes: a step's checkpoint goes
to a new directory (`checkpoint-N`, N steps done) and only then does `state.json` (renamed into
place) point at it, so a kill between the two leaves the state at the previous step with the
previous checkpoint, and the step runs again from there. Checkpoints no state points at are
removed on resume. Saves and the report record the run's fingerprint in their `surgery.json`, so a
resumed run may replace what it wrote itself before a kill, and nothing else. The whole run holds
the lock on `OUT`. Under
`accelerate launch` every process runs the steps (fine-tunes are data-parallel); only the main
process writes files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from surgery.errors import OutputExists, SurgeryError, UnsafeOutput
from surgery.evaluate.base import EvalResult
from surgery.evaluate.gates import GateOutcome, evaluate_gates
from surgery.io import MARKER, atomic_dir, check_target, fault_point, remove_stale, reserve
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
    checkpoint: str | None = None  # directory in OUT.partial holding the model after `completed` steps
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
    """Replace state.json atomically and durably (written, flushed to disk, renamed)."""
    tmp = partial / f".{STATE}.tmp"
    with open(tmp, "w") as f:
        f.write(state.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(partial / STATE)
    fault_point("state-written")


def read_state(partial: Path) -> RunState:
    try:
        return RunState.model_validate_json((partial / STATE).read_bytes())
    except (ValidationError, ValueError, OSError):
        raise SurgeryError(
            f"{partial / STATE} is corrupt or from another version of surgery; start over with --force"
        ) from None


def run_of(directory: Path) -> str | None:
    """The fingerprint of the recipe run that wrote `directory` (a save or a report), if any."""
    try:
        run = json.loads((directory / MARKER).read_text()).get("run") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return run.get("fingerprint") if isinstance(run, dict) else None


def prepare(recipe: Recipe, out: Path, partial: Path, resume: bool, force: bool, sources: list[Path]) -> RunState:
    """Check the whole plan before anything is loaded or removed: the report directory, the
    interrupted run, and every save target still to be written. Returns the state to start from."""
    fp = fingerprint(recipe)
    if resume and not (partial / STATE).is_file():
        if run_of(out) == fp:
            raise SurgeryError(f"nothing to resume: {out} holds this run's finished report")
        resume = False  # killed before its first state was written: start from the first step
    if resume:
        state = read_state(partial)
        if state.fingerprint != fp:
            raise SurgeryError(
                f"{partial} was started from a different recipe (or other --set values); "
                "run it with the same ones, or start over with --force"
            )
    else:
        state = RunState(fingerprint=fp)
        if partial.exists():
            if not force:
                raise OutputExists(
                    f"{partial} holds an interrupted run; continue it with --resume or start over with --force"
                )
            if not (partial / STATE).is_file() and any(partial.iterdir()):
                raise UnsafeOutput(
                    f"{partial} is not an interrupted surgery run (no {STATE}); --force will not remove it: "
                    "remove it yourself or choose another --out"
                )
    for step in recipe.compiled:  # a save target that exists fails now, not after an hour of work
        if step.verb == "save" and step.index >= state.completed:
            target = Path(step.payload.path)
            check_target(target, step.payload.force or (resume and run_of(target) == fp), sources)
    return state


def open_partial(recipe: Recipe, partial: Path, state: RunState, resume: bool) -> None:
    """A fresh run: OUT.partial appears whole (recipe and state) by one rename, replacing an old
    one. A resumed run: remove what no state points at (a checkpoint written just before a kill,
    temporary directories)."""
    remove_stale(partial)
    if resume:
        keep = {STATE, "recipe.yaml", state.checkpoint}
        for p in partial.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{partial.name}.tmp-", dir=partial.parent))
    try:
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        write_state(tmp, state)
        if partial.exists():
            drop(partial)
        tmp.rename(partial)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fault_point("run-started")


def drop(directory: Path) -> None:
    """Remove a directory so that a kill midway leaves either all of it or none under its name."""
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
    directory.rename(trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)


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

    from surgery.models import source_paths

    process = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo across processes
    main = process.is_main_process
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    sources = source_paths(recipe.model)
    replace_report = force or (resume and run_of(out) == fingerprint(recipe))
    # only the main process writes, so only it holds the lock on OUT (for the whole run)
    lock = reserve(out, replace_report, sources) if main else contextlib.nullcontext()
    with lock:
        if main:
            remove_stale(partial)
        state = prepare(recipe, out, partial, resume, force, sources)
        if resume and not (partial / STATE).is_file():
            resume = False
            if main:
                echo(f"nothing to resume in {partial}: starting from the first step")
        return run_steps(recipe, out, partial, state, resume, replace_report, process, echo, api)


def run_steps(
    recipe: Recipe,
    out: Path,
    partial: Path,
    state: RunState,
    resume: bool,
    replace_report: bool,
    process: Any,
    echo: Callable[[str], None],
    api: Any,
) -> RunOutcome:
    import surgery

    main = process.is_main_process
    say = echo if main else (lambda _msg: None)
    source = str(partial / state.checkpoint) if state.checkpoint else recipe.model
    say(f"loading {source}" + (f" (resuming after step {state.completed})" if resume else ""))
    model, tokenizer = surgery.load_model(
        source, dtype=recipe.dtype, device=recipe.device
    )  # a bad model: no state left
    if main:
        open_partial(recipe, partial, state, resume)
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
        previous = state.checkpoint
        if changed and main and step.index + 1 < total:  # resume restarts from this checkpoint
            state.checkpoint = f"{CHECKPOINT}-{state.completed}"
            surgery.save(model, tokenizer, partial / state.checkpoint, base_model=recipe.model, force=True)
        if main:
            write_state(partial, state)  # now, and only now, the state points at the new checkpoint
            if previous and previous != state.checkpoint:
                shutil.rmtree(partial / previous, ignore_errors=True)
        process.wait_for_everyone()
    table = final_table(state)
    say(table)
    if main:
        finish(recipe, out, partial, state, table, replace_report)
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
            from surgery.models import source_paths

            ours = run_of(Path(payload.path)) == state.fingerprint  # written by this run before a kill
            surgery.save(
                model,
                tokenizer,
                payload.path,
                base_model=recipe.model,
                force=payload.force or ours,
                card_extra=card_section(recipe, state),
                files={"recipe.yaml": recipe.to_yaml()},
                sources=source_paths(recipe.model),
                run={"fingerprint": state.fingerprint, "step": step.index},
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

    with atomic_dir(out, force) as tmp:
        (tmp / MARKER).write_text(json.dumps({"run": {"fingerprint": state.fingerprint}}, indent=2) + "\n")
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
    drop(partial)


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
