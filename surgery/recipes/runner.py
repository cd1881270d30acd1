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
the lock on `OUT`. Under `accelerate launch` every process runs the steps (fine-tunes are data-parallel); only the main
process writes files."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from surgery.errors import OutputExists, SurgeryError, UnsafeOutput
from surgery.io import check_target, clear_stale_lock, fault_point, hidden_name, permit, remove_stale, reserve
from surgery.recipes.report import STATE, final_table, run_of, write_report
from surgery.recipes.schema import Recipe
from surgery.recipes.state import RunContext, RunState
from surgery.recipes.step import Step, dry_run
from surgery.recipes.steps import domain_warnings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


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


def prepare(recipe: Recipe, out: Path, partial: Path, resume: bool, force: bool, sources: list[Path]) -> RunState:
    """Check the whole plan before anything is loaded or removed: the report directory, the
    interrupted run, every save target still to be written, and (for a fresh run) every patch on a
    meta-device skeleton of the model. Returns the state to start from."""
    fp = fingerprint(recipe)
    if resume and not (partial / STATE).is_file():
        if run_of(out).get("fingerprint") == fp:
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
    for target, force_it in outputs(recipe, state):  # an output that exists fails now, not after an hour of work
        try:
            check_target(target, force_it, sources)
        except OutputExists:
            raise OutputExists(
                f"{target} already exists (a save step of the recipe); give that step force: true or another path"
            ) from None
    if state.completed == 0:
        dry_run(recipe)  # a patch the model cannot take fails now, before any weight is read
    return state


def outputs(recipe: Recipe, state: RunState) -> list[tuple[Path, bool]]:
    """(directory, may it be replaced) for every output the remaining steps write; what this run
    wrote itself before a kill may be replaced."""
    return [
        (target, force_it or run_of(target).get("id") == state.run_id)
        for step in recipe.compiled[state.completed :]
        for target, force_it in step.outputs()
    ]


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
    tmp = Path(tempfile.mkdtemp(prefix=hidden_name(partial, "tmp-"), dir=partial.parent))
    try:
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        write_state(tmp, state)
        permit(tmp)
        if partial.exists():
            drop(partial)
        tmp.rename(partial)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fault_point("run-started")


def drop(directory: Path) -> None:
    """Remove a directory so that a kill midway leaves either all of it or none under its name."""
    trash = Path(tempfile.mkdtemp(prefix=hidden_name(directory, "old-"), dir=directory.parent))
    directory.rename(trash / directory.name)
    shutil.rmtree(trash, ignore_errors=True)


def kept_or_dropped(err: SurgeryError, partial: Path, completed: int, main: bool) -> SurgeryError:
    """A user error midway: OUT.partial goes when no step completed (nothing to resume); completed
    steps (a heal may have taken an hour) are kept for --resume, and the error says so."""
    if not main or not partial.exists():
        return err
    if completed == 0:
        drop(partial)
        return err
    return SurgeryError(
        f"{err} (the {completed} completed step{'s' if completed > 1 else ''} are kept in {partial}: "
        "fix this and continue with --resume, or start over with --force)"
    )


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

    from surgery.models import resolve

    process = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo across processes
    main = process.is_main_process
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    sources = resolve(recipe.model).paths()
    earlier = read_state(partial) if resume and (partial / STATE).is_file() else None
    replace_report = force or (earlier is not None and run_of(out).get("id") == earlier.run_id)
    # only the main process writes, so only it holds the locks: on OUT and on every save target,
    # for the whole run (a second run writing any of them is refused before it loads anything)
    with contextlib.ExitStack() as locks:
        if main:
            locks.enter_context(reserve(out, replace_report, sources))
            remove_stale(partial)
        state = prepare(recipe, out, partial, resume, force, sources)
        if main:
            for target, force_it in outputs(recipe, state):
                locks.enter_context(reserve(target, force_it, sources))
            for step in recipe.compiled[: state.completed]:  # written before a kill: their locks died with it
                for target, _ in step.outputs():
                    clear_stale_lock(target)
        if resume and not (partial / STATE).is_file():
            resume = False
            if main:
                echo(f"nothing to resume in {partial}: starting from the first step")
        say = echo if main else (lambda _msg: None)
        for warning in domain_warnings(recipe.compiled):
            say(f"warning: {warning}")
        opened = False
        if state.completed == 0 and process.num_processes == 1:
            opened = run_on_disk(recipe, partial, state, say)
        ctx = start(recipe, partial, state, resume or opened, say, main, api, opened=opened)
        ctx.sources = sources
        process.wait_for_everyone()
        try:
            for step in recipe.compiled:
                if step.index >= state.completed:
                    run_step_and_record(step, ctx, partial, process)
        except SurgeryError as err:
            raise kept_or_dropped(err, partial, state.completed, main) from None
        table = final_table(state)
        say(table)
        if main:
            write_report(recipe, out, state, table, replace_report)
            drop(partial)
        process.wait_for_everyone()
    passed = not state.failed
    shown = {"pass": "all gates passed", "fail": "a gate FAILED", "inconclusive": "a gate was INCONCLUSIVE"}
    say(f"{shown[state.status]}; report: {out / 'report.md'}")
    return RunOutcome(out=out, passed=passed, table=table, state=state)


def disk_steps(recipe: Recipe, model: str | None = None) -> list[Any]:
    """The route plan of the recipe's leading patch steps that can run on the checkpoint on disk
    (config-only or streamable), before anything is loaded: none when the recipe starts with
    another step, when its model is not a local checkpoint, or when it loads in another dtype
    than the checkpoint's (the disk routes keep every tensor's dtype). `model` replaces the
    recipe's (validate --model)."""
    from surgery.models import load_config, resolve
    from surgery.recipes.steps import PatchStep
    from surgery.routes import plan_routes

    lead = []
    for step in recipe.compiled:
        if not isinstance(step, PatchStep):
            break
        lead.append(step)
    model = model or recipe.model
    if not lead or resolve(model).kind == "hub":
        return []
    config = load_config(model)
    stored = str(getattr(config, "dtype", None) or "").replace("torch.", "")
    if recipe.dtype not in ("auto", stored):
        return []
    plan = plan_routes(config, [s.payload for s in lead])
    return [step for step in plan.steps[: len(lead)] if step.route != "memory"]


def run_on_disk(recipe: Recipe, partial: Path, state: RunState, say: Callable[[str], None]) -> bool:
    """Run the recipe's leading config-only and streamable patch steps on the checkpoint on disk
    (surgery.apply_to_checkpoint) into OUT.partial's first checkpoint, and point the state at it;
    False (nothing done) when there are none."""
    from surgery.routes import apply_to_checkpoint

    steps = disk_steps(recipe)
    if not steps:
        return False
    open_partial(recipe, partial, state, resume=False)
    name = f"{CHECKPOINT}-{len(steps)}"
    began = time.perf_counter()
    done = apply_to_checkpoint(recipe.model, [s.patch for s in steps], partial / name, say=lambda _line: None)
    total = len(recipe.compiled)
    for i, (step, record) in enumerate(zip(steps, done.records, strict=True)):
        say(f"[{i + 1}/{total}] patch {step.patch.short()}: on disk, {step.route} route ({step.why})")
        for note in record.notes:
            say(f"    {note}")
        state.changes.append(step.patch.short())
        state.seconds[str(i)] = (time.perf_counter() - began) / len(steps)
    state.completed, state.checkpoint = len(steps), name
    write_state(partial, state)
    return True


def start(
    recipe: Recipe,
    partial: Path,
    state: RunState,
    resume: bool,
    say: Callable[[str], None],
    main: bool,
    api: Any,
    opened: bool = False,
) -> RunContext:
    """Load the model (from the state's checkpoint when resuming, or after steps run on disk) and
    open OUT.partial (`opened`: already open)."""
    import surgery

    source = str(partial / state.checkpoint) if state.checkpoint else recipe.model
    rest = recipe.compiled[state.completed :]
    if state.checkpoint and not any(step.needs_model for step in rest):  # save and push clone it
        from surgery.models import checked_skeleton

        checked_skeleton(Path(source))  # a damaged stage is refused in one line, not cloned
        say(f"not loading {source}: the remaining steps read it on disk")
        if main and not opened:
            open_partial(recipe, partial, state, resume)
        return RunContext(recipe, None, None, state, say, main, api, on_disk=Path(source))
    after = "after the steps on disk" if opened else f"resuming after step {state.completed}"
    say(f"loading {source}" + (f" ({after})" if resume else ""))
    model, tokenizer = surgery.load_model(source, dtype=recipe.dtype, device=recipe.device)  # fails: no state left
    if main and not opened:
        open_partial(recipe, partial, state, resume)
    return RunContext(recipe=recipe, model=model, tokenizer=tokenizer, state=state, say=say, main=main, api=api)


def run_step_and_record(step: Step, ctx: RunContext, partial: Path, process: Any) -> None:
    """Run one step (or skip it after a failed gate), checkpoint a changed model in a new
    directory, then point the state at it."""
    import surgery

    state, total = ctx.state, len(ctx.recipe.compiled)
    if state.failed:
        ctx.say(
            f"[{step.index + 1}/{total}] {step.label}: skipped (a gate {'was inconclusive' if state.status == 'inconclusive' else 'failed'})"
        )
        return
    ctx.say(f"[{step.index + 1}/{total}] {step.label}")
    began = time.perf_counter()
    changed = run_step(step, ctx)
    state.seconds[str(step.index)] = time.perf_counter() - began
    state.completed = step.index + 1
    previous = state.checkpoint
    if changed and ctx.main and step.index + 1 < total:  # resume restarts from this checkpoint
        state.checkpoint = f"{CHECKPOINT}-{state.completed}"
        surgery.save(ctx.model, ctx.tokenizer, partial / state.checkpoint, base_model=ctx.recipe.model, force=True)
    if ctx.main:
        write_state(partial, state)  # now, and only now, the state points at the new checkpoint
        if previous and previous != state.checkpoint:
            shutil.rmtree(partial / previous, ignore_errors=True)
    process.wait_for_everyone()


def run_step(step: Step, ctx: RunContext) -> bool:
    """Run one step; True when the model changed (so it is checkpointed)."""
    return step.run(ctx)
