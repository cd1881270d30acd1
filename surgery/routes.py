"""Patches applied to a checkpoint on disk by the cheapest route that can do each one:

- `config`: the patch changes the config alone (RoPE scaling, attention backend): it runs on a
  meta-device skeleton, and the weight files are cloned (reflink where the file system has them);
  no weight is read.
- `stream`: the patch rewrites tensors one at a time (mean GQA pooling): shard by shard, tensor by
  tensor, so memory holds one tensor, not the model.
- `memory`: the patch needs the whole model (data-aware pooling, runtime caches, a dtype change):
  it is loaded, and every patch after it is applied in memory too.

`auto` takes, patch by patch, the first route that can do it; the disk steps run first, each into
a hidden stage beside the output, and the output appears only when every step has succeeded."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from surgery.errors import SurgeryError
from surgery.io import hidden_name, reserve
from surgery.patch import Patch, PatchRecord

log = logging.getLogger(__name__)

Route = Literal["config", "stream", "memory"]
ROUTES = ("auto", "config", "stream", "memory")
CONFIG_ONLY = "changes the config only: no weight is read"  # why a patch takes the config route


@dataclass
class Step:
    patch: Patch
    route: Route
    why: str

    def describe(self) -> str:
        return f"{self.patch.name}: {self.route} ({self.why})"


@dataclass
class Plan:
    steps: list[Step]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps] + [f"note: {n}" for n in self.notes]


@dataclass
class Applied:
    out: Path
    records: list[PatchRecord]
    plan: Plan
    seconds: float


def plan_routes(
    config: Any,
    patches: Sequence[Patch],
    route: str = "auto",
    *,
    on_disk: bool = True,
    dtype: str = "auto",
    large: bool = False,
) -> Plan:
    """The route of each patch, on the config as the patches before it leave it (simulated on a
    meta-device skeleton: a patch the model cannot take is refused here, before any weight is
    read). `on_disk`: the checkpoint is a local directory (a hub model is loaded); `large`: it
    would not fit in memory (a memory route then comes with a warning)."""
    from surgery.models import skeleton

    if route not in ROUTES:
        raise SurgeryError(f"unknown route '{route}'; choose from {', '.join(ROUTES)}")
    if not patches:
        raise SurgeryError("no patch to apply")
    model = skeleton(config)
    steps: list[Step] = []
    loaded = None  # why the model is in memory, once it is
    if route == "memory":
        loaded = "asked for"
    elif not on_disk:
        loaded = "a hub model is loaded; download it to a directory for the disk routes"
    elif dtype != "auto":
        loaded = f"dtype {dtype} converts every tensor"
    for patch in patches:
        if loaded is None:
            if patch.config_only:
                steps.append(Step(patch, "config", CONFIG_ONLY))
            elif type(patch).streamable and route != "config":
                try:
                    patch.tensor_transform(model.config)
                    steps.append(Step(patch, "stream", "rewrites tensors one at a time"))
                except SurgeryError as err:
                    loaded = f"{patch.name} cannot stream: {err}"
            else:
                loaded = f"{patch.name} {'rewrites weights' if route == 'config' else 'needs the loaded model'}"
            if loaded is None:
                probe = patch.model_copy()
                probe.supports(model)
                probe.apply(model)  # on meta: the next patch plans on the config this one leaves
                continue
            patch.supports(model)  # refused now, not after minutes of loading
            steps.append(Step(patch, "memory", loaded))
        else:
            steps.append(Step(patch, "memory", loaded if not steps else "the model is loaded by then"))
        if route in ("config", "stream") and steps[-1].route == "memory":
            raise SurgeryError(f"route {route} cannot apply {patch.name}: {loaded}")
    notes = []
    if large and any(s.route == "memory" for s in steps):
        notes.append("the checkpoint may not fit in memory, and a memory route loads it whole")
    return Plan(steps, notes)


def apply_to_checkpoint(
    src: str | Path,
    patches: Sequence[Patch | str],
    out: str | Path,
    *,
    route: str = "auto",
    dtype: str = "auto",
    force: bool = False,
    say: Callable[[str], None] = log.info,
) -> Applied:
    """Apply `patches` (instances or registered names) in order to the checkpoint `src` and write
    the result to `out`, each by the cheapest route that can do it (see the module docstring),
    saying which route and why. `route` forces one: `config`, `stream` (config-only patches still
    take the config route) or `memory`; a patch the forced route cannot do is refused before any
    work. The output is written whole or not at all."""
    import time

    from surgery.config_data import apply_config_data
    from surgery.hub import apply_config_only, save
    from surgery.models import load_config, load_model, local_dir, resolve
    from surgery.patch import make_patch
    from surgery.streaming import apply_streaming, should_stream

    start = time.perf_counter()
    patches = [make_patch(p) if isinstance(p, str) else p for p in patches]
    source = resolve(str(src))
    out = Path(out)
    with reserve(out, force, source.paths()):  # checked and locked before any work
        here = local_dir(source)
        on_disk = here is not None and source.kind != "hub"
        if on_disk and dtype == "auto" and route != "memory":
            records = apply_config_data(patches, here, out, base_model=source.base_model, force=force)
            if records is not None:  # config-only patches on a config read as data: torch never imported
                plan = Plan([Step(p, "config", CONFIG_ONLY) for p in patches])
                for line in plan.describe():
                    say(line)
                return Applied(out, records, plan, time.perf_counter() - start)
        plan = plan_routes(
            load_config(str(src)),
            patches,
            route,
            on_disk=on_disk,
            dtype=dtype,
            large=on_disk and should_stream(here),
        )
        for line in plan.describe():
            say(line)
        disk = [s for s in plan.steps if s.route != "memory"]
        memory = [s for s in plan.steps if s.route == "memory"]
        records: list[PatchRecord] = []
        staged = len(disk) > 1 or (disk and memory)  # a single step on disk writes `out` itself
        # "tmp-" leads the name: a writer killed midway leaves debris the next one removes
        stages = Path(tempfile.mkdtemp(prefix=hidden_name(out, "tmp-stages-"), dir=out.parent)) if staged else None
        try:
            current = here
            for i, step in enumerate(disk):
                last = i == len(disk) - 1 and not memory
                target = out if last else stages / str(i)
                run = apply_config_only if step.route == "config" else apply_streaming
                kwargs = {"consume": current != here} if step.route == "config" else {}
                _, record = run(step.patch, current, target, base_model=source.base_model, force=force, **kwargs)
                records.append(record)
                if current != here:
                    shutil.rmtree(current, ignore_errors=True)  # a stage of ours, no longer needed
                current = target
            if memory:
                model, tokenizer = load_model(str(current) if disk else str(src), dtype=dtype)
                for step in memory:
                    records.append(step.patch.apply(model, tokenizer=tokenizer))
                save(model, tokenizer, out, base_model=source.base_model, force=force, sources=source.paths())
        finally:
            if stages is not None:
                shutil.rmtree(stages, ignore_errors=True)
    return Applied(out, records, plan, time.perf_counter() - start)
