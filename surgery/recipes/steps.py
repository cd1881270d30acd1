"""The recipe verbs, one typed step class each (the base is in `step.py`). A step knows how to be
parsed from YAML (`parse`), what it needs before it (`note` and `order`), how to show itself
(`label`), what it would write (`outputs`), what it does to a meta-device skeleton (`dry_run`) and
how it runs (`run`). Validation, ordering, the dry run and the runner each dispatch once, through
`STEPS`: adding a verb is adding a class here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from surgery.errors import GateError, SurgeryError, did_you_mean
from surgery.evaluate.base import EVALS, Eval
from surgery.evaluate.gates import Gate, evaluate_gates, parse_gate
from surgery.lazy import torch
from surgery.patch import PATCHES, Patch
from surgery.recipes.finetune import Finetune
from surgery.recipes.report import card_section, labelled, run_of, stamp
from surgery.recipes.state import RunContext
from surgery.recipes.step import Seen, Step, build, registered, settings


class PatchStep(Step):
    verb: ClassVar[str] = "patch"
    kind: Literal["patch"] = "patch"
    payload: Patch

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        payload = registered(PATCHES, "patch", index, value, rest, problems)
        return cls(index=index, payload=payload) if payload is not None else None

    @property
    def label(self) -> str:
        return f"patch {self.payload.slug()}"

    def dry_run(self, skeleton: torch.nn.Module, source: str, before: list[Step]) -> str | None:
        try:
            record = self.payload.dry_run().apply(skeleton)
        except SurgeryError as err:
            raise SurgeryError(f"steps.{self.index}.patch ({self.payload.name}): {err}") from None
        return f"steps.{self.index} {self.payload.slug()}: " + ("; ".join(record.notes) or "ok")

    def run(self, ctx: RunContext) -> bool:
        record = self.payload.apply(ctx.model, tokenizer=ctx.tokenizer)
        for note in record.notes:
            ctx.say(f"    {note}")
        ctx.state.changes.append(self.payload.short())
        return True


class EvalStep(Step):
    verb: ClassVar[str] = "eval"
    kind: Literal["eval"] = "eval"
    payload: Eval

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        payload = registered(EVALS, "eval", index, value, rest, problems)
        return cls(index=index, payload=payload) if payload is not None else None

    @classmethod
    def note(cls, value: Any, seen: Seen) -> None:
        seen.evals.add(str(value))

    @property
    def label(self) -> str:
        return f"eval {self.payload.name}"

    def run(self, ctx: RunContext) -> bool:
        result = self.payload.for_recipe(ctx.recipe.model).run(ctx.model, ctx.tokenizer)
        result.details["step"] = self.index
        ctx.state.results.append(result)
        changes = ctx.state.changes
        ctx.state.labels[str(self.index)] = "after " + ", ".join(changes) if changes else "before"
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        ctx.say(f"    {shown} ({result.seconds:.0f} s)")
        return False


class CheckSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    original: str | None = Field(None, description="the model to check against (default: the recipe's model)")
    budget: float | None = Field(None, gt=0, le=1e5, description="minutes; sample counts scale to the measured speed")
    length: int | None = Field(None, ge=16, description="tokens checked (default: min(original context, 4096))")
    gate: list[str] = Field([], description="extra gates, e.g. divergence.docs.kl@2048:max=0.05,confidence=0.95")


class CheckStep(Step):
    """`surgery check` inside a recipe: the model as it is now against the recipe's model."""

    verb: ClassVar[str] = "check"
    kind: Literal["check"] = "check"
    payload: CheckSettings

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        where = f"steps.{index}.check"
        if value is not None and not isinstance(value, dict):
            problems.append(f"{where}: give settings as a mapping, e.g. check: {{budget: 10}}, or nothing")
            return None
        payload = build(CheckSettings, where, {**(value or {}), **rest}, problems)
        if payload is not None:
            for text in payload.gate:
                try:
                    parse_gate(text)
                except GateError as err:
                    problems.append(f"{where}.gate: {err}")
                    return None
        return cls(index=index, payload=payload) if payload is not None else None

    @classmethod
    def note(cls, value: Any, seen: Seen) -> None:
        seen.evals |= {"divergence", "ruler", "perplexity"}

    @property
    def label(self) -> str:
        return "check against " + (self.payload.original or "the recipe's model")

    def dry_run(self, skeleton: torch.nn.Module, source: str, before: list[Step]) -> str | None:
        """The battery the check will run on the model as the patches before it leave it: a missing
        original, or a gate the battery cannot answer, is found before any weights load."""
        from surgery.check import context_of, patch_records, plan, preflight
        from surgery.models import load_config

        p = self.payload
        try:
            original = load_config(p.original or source)
            records = patch_records(skeleton.config)
            battery = plan(
                original,
                records,
                p.length,
                trained=set(trained_sources(before)),
                patched_context=context_of(skeleton.config),
            )
            preflight(battery, [parse_gate(g) for g in p.gate])
        except SurgeryError as err:
            raise SurgeryError(f"steps.{self.index}.check: {err}") from None
        return f"steps.{self.index} check: " + ", ".join(it.eval.name for it in battery.items)

    def run(self, ctx: RunContext) -> bool:
        from surgery.check import context_of, patch_records, run_check

        p, state = self.payload, ctx.state
        outcome = run_check(
            p.original or ctx.recipe.model,
            patch_records(ctx.model.config),
            lambda: (ctx.model, ctx.tokenizer),
            length=p.length,
            budget=p.budget,
            extra_gates=p.gate,
            trained=set(trained_sources(ctx.recipe.compiled[: self.index])),
            dtype=ctx.recipe.dtype,
            patched_context=context_of(ctx.model.config),
            patched_tokenizer=ctx.tokenizer,
            say=lambda line: ctx.say(f"    {line}"),
        )
        assert outcome is not None  # not a dry run
        for result in outcome.before:  # the original's side first: the table's "before"
            result.details.update(step=self.index, label="original")
        for result in outcome.after:
            result.details["step"] = self.index
        state.results += outcome.before + outcome.after
        changes = state.changes
        state.labels[str(self.index)] = "after " + ", ".join(changes) if changes else "checked"
        state.record_gates(outcome.outcomes)
        ctx.say(f"    {outcome.verdict_line()}")
        return False


class FinetuneStep(Step):
    verb: ClassVar[str] = "finetune"
    kind: Literal["finetune"] = "finetune"
    payload: Finetune

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        where = f"steps.{index}"
        if not isinstance(value, (dict, str)) and value is not None:
            problems.append(f"{where}.finetune: give a mapping of settings or a method name (lora, full)")
            return None
        params = dict(value or {}) if isinstance(value, dict) or value is None else {"method": value}
        inner = f"{where}.finetune" if isinstance(value, dict) else where
        payload = build(Finetune, inner, {**params, **rest}, problems)
        return cls(index=index, payload=payload) if payload is not None else None

    @property
    def label(self) -> str:
        p = self.payload
        objective = (
            ""
            if p.loss == "ce"
            else f", kl toward {p.teacher or 'the recipe model'}"
            + (f" (weight {p.kl_weight:g})" if p.kl_weight < 1 else "")
        )
        return f"finetune {p.method} {p.max_steps} steps on {p.text}{objective}"

    def dry_run(self, skeleton: torch.nn.Module, source: str, before: list[Step]) -> str | None:
        """A named teacher is found and shares the model's vocabulary before any weight loads (the
        recipe's own model is the teacher otherwise, and matches by construction)."""
        p = self.payload
        if p.loss != "kl" or p.teacher is None:
            return None
        from surgery.arch import text_config
        from surgery.models import load_config

        where = f"steps.{self.index}.finetune.teacher"
        try:
            teacher = text_config(load_config(p.teacher))
        except SurgeryError as err:
            raise SurgeryError(f"{where}: {err}") from None
        vocab = skeleton.get_output_embeddings().weight.shape[0]
        if getattr(teacher, "vocab_size", None) != vocab:
            raise SurgeryError(
                f"{where}: {p.teacher} has a vocabulary of {getattr(teacher, 'vocab_size', '?')}, the model {vocab}; "
                "distil a teacher with the same tokenizer"
            )
        return None

    def run(self, ctx: RunContext) -> bool:
        from surgery.recipes.finetune import run_finetune

        result = run_finetune(ctx.model, ctx.tokenizer, self.payload, seed=ctx.recipe.seed, teacher=ctx.recipe.model)
        losses = result["losses"]
        heal = f"{self.payload.method} heal" + (" (kl)" if self.payload.loss == "kl" else "")
        ctx.state.finetunes.append({"step": self.index, "label": f"{heal}, {self.payload.max_steps} steps", **result})
        ctx.state.changes.append(heal)
        where = {"fsdp": ", sharded (FSDP)", "data": ", data-parallel"}.get(result["parallel"], "")
        processes = f" over {result['processes']} processes{where}" if result["processes"] > 1 else ""
        ctx.say(
            f"    loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps, "
            f"{result['tokens']:,} tokens, {result['seconds']:.0f} s{processes}"
        )
        return True


class GateStep(Step):
    verb: ClassVar[str] = "gate"
    kind: Literal["gate"] = "gate"
    needs_model: ClassVar[bool] = False
    payload: list[Gate]

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        where = f"steps.{index}.gate"
        texts = value if isinstance(value, list) else [value]
        if rest or not texts or not all(isinstance(t, str) for t in texts):
            problems.append(f"{where}: write METRIC:RULE=VALUE (or a list of them), e.g. perplexity.ppl@2048:max=15")
            return None
        gates, before = [], len(problems)
        for text in texts:
            try:
                gates.append(parse_gate(text))
            except GateError as err:
                problems.append(f"{where}: {err}")
        return cls(index=index, payload=gates) if len(problems) == before else None

    def order(self, seen: Seen, problems: list[str]) -> None:
        for gate in self.payload:
            family = gate.metric.split(".", 1)[0]
            if family not in seen.evals and not any(ch in family for ch in "*?["):
                problems.append(
                    f"steps.{self.index}.gate: '{gate.metric}' needs an earlier '{family}' eval step"
                    + (f" (evals so far: {', '.join(sorted(seen.evals))})" if seen.evals else "")
                )

    @property
    def label(self) -> str:
        return "gate " + "; ".join(g.text for g in self.payload)

    def run(self, ctx: RunContext) -> bool:
        state = ctx.state
        intervals = (state.estimates(first=True), state.estimates(first=False))
        outcomes = evaluate_gates(self.payload, state.metrics(first=True), state.metrics(first=False), intervals)
        state.record_gates(outcomes)
        for o in outcomes:
            ctx.say(f"    {o.status.upper() if o.status != 'pass' else 'pass'}  {o.metric}: {o.message}")
        return False


class SaveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, pattern=r"\S", description="output directory (written atomically)")
    force: bool = Field(False, description="replace the directory if surgery wrote it")


class SaveStep(Step):
    verb: ClassVar[str] = "save"
    kind: Literal["save"] = "save"
    needs_model: ClassVar[bool] = False  # a checkpoint on disk is cloned
    payload: SaveSettings

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        example = "an output directory, e.g. save: out/my-model"
        payload = settings(SaveSettings, "save", "path", example, index, value, rest, problems)
        return cls(index=index, payload=payload) if payload is not None else None

    @classmethod
    def note(cls, value: Any, seen: Seen) -> None:
        seen.saved = True

    def order(self, seen: Seen, problems: list[str]) -> None:
        early = seen.pushed.get(str(Path(self.payload.path).expanduser().resolve()))
        if early is not None:
            problems.append(
                f"steps.{early}.push uploads {self.payload.path}, which steps.{self.index}.save writes only after it; "
                "move the push after the save"
            )

    @property
    def label(self) -> str:
        return f"save {self.payload.path}"

    def outputs(self) -> list[tuple[Path, bool]]:
        return [(Path(self.payload.path), self.payload.force)]

    def run(self, ctx: RunContext) -> bool:
        import surgery
        from surgery.hub import save_from_disk

        path, state = self.payload.path, ctx.state
        if ctx.main:
            how = dict(
                base_model=ctx.recipe.model,
                # a resumed run replaces what it wrote itself before a kill, and nothing else
                force=self.payload.force or run_of(Path(path)).get("id") == state.run_id,
                card_extra=card_section(ctx.recipe, state),
                evals=[(label, r) for label, report in labelled(ctx.recipe, state).items() for r in report.results],
                files={"recipe.yaml": ctx.recipe.to_yaml()},
                sources=ctx.sources,
                run=stamp(state, step=self.index),
            )
            if ctx.model is None:  # the steps so far ran on disk: their checkpoint is cloned
                save_from_disk(ctx.on_disk, path, **how)
            else:
                surgery.save(ctx.model, ctx.tokenizer, path, **how)
        state.saved.append(path)
        ctx.say(f"    saved {path}")
        return False


class PushSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="user/name on the Hub")
    private: bool = Field(False, description="create the repository private")
    revision: str | None = Field(None, description="branch to push to (created if missing)")
    create_pr: bool = Field(False, description="open a pull request instead of committing to the branch")
    path: str | None = Field(None, description="directory to upload (default: the last save)")


class PushStep(Step):
    verb: ClassVar[str] = "push"
    kind: Literal["push"] = "push"
    needs_model: ClassVar[bool] = False
    payload: PushSettings

    @classmethod
    def parse(cls, index: int, value: Any, rest: dict[str, Any], problems: list[str]) -> Step | None:
        example = "a repository id, e.g. push: user/my-model"
        payload = settings(PushSettings, "push", "repo_id", example, index, value, rest, problems)
        return cls(index=index, payload=payload) if payload is not None else None

    def order(self, seen: Seen, problems: list[str]) -> None:
        if not seen.saved and not self.payload.path:
            problems.append(
                f"steps.{self.index}.push: nothing saved yet; put a save step before push (or give push a path)"
            )
        if self.payload.path:
            seen.pushed[str(Path(self.payload.path).expanduser().resolve())] = self.index

    @property
    def label(self) -> str:
        return f"push {self.payload.repo_id}"

    def run(self, ctx: RunContext) -> bool:
        from surgery.hub import push

        folder = self.payload.path or ctx.state.saved[-1]
        if ctx.main:
            p = self.payload
            url = push(folder, p.repo_id, private=p.private, revision=p.revision, api=ctx.api, create_pr=p.create_pr)
            ctx.state.pushed.append(url)
            ctx.say(f"    pushed {folder} to {url}")
        return False


AnyStep = Annotated[
    PatchStep | EvalStep | FinetuneStep | GateStep | CheckStep | SaveStep | PushStep, Field(discriminator="kind")
]
STEPS: dict[str, type[Step]] = {
    cls.verb: cls for cls in (PatchStep, FinetuneStep, EvalStep, GateStep, CheckStep, SaveStep, PushStep)
}


def trained_sources(compiled: list[Step]) -> dict[str, str]:
    """The single text sources (labels) that the recipe's fine-tunes and data-aware patches trained
    or calibrated on, each with the first step that did."""
    from surgery.data import components

    trained: dict[str, str] = {}
    for step in compiled:
        if isinstance(step, FinetuneStep):
            for part in components(step.payload.text):
                trained.setdefault(part, f"steps.{step.index}.finetune")
        elif isinstance(step, PatchStep):
            for text in step.payload.calibration_sources():
                for part in components(text):
                    trained.setdefault(part, f"steps.{step.index}.patch ({step.payload.name})")
    return trained


def domain_warnings(compiled: list[Step]) -> list[str]:
    """Gates that judge the model on the text a fine-tune or a data-aware patch of the recipe
    trained or calibrated on before them (another part of it, but the same domain; for mixes, any
    source they share), unless a gate of the same step judges text none of them saw: their pass
    says little about text the model did not see."""
    from surgery.data import NAMED, components

    measured: dict[str, str | None] = {}  # eval family -> the text of its latest eval step
    out = []
    for step in compiled:
        if isinstance(step, EvalStep):
            measured[step.payload.name] = getattr(step.payload, "text", None)
        elif isinstance(step, GateStep):
            trained = trained_sources(compiled[: step.index])
            texts = [measured.get(gate.metric.split(".", 1)[0]) for gate in step.payload]
            if any(text and not components(text) & set(trained) for text in texts):
                continue  # the same step also judges text no step trained on
            for gate, text in zip(step.payload, texts, strict=True):
                seen = sorted(components(text) & set(trained)) if text else []
                if seen:
                    unseen = [t for t in NAMED if t not in trained]
                    other = f"another text (text: {unseen[0]})" if unseen else "text no step trained on"
                    out.append(
                        f"steps.{step.index}.gate '{gate.metric}' is measured on {text}, the text {trained[seen[0]]} "
                        f"trained or calibrated on (its held-out part, but the same domain): add a gate on {other} "
                        "or a check step, which always measures a domain the recipe did not train on"
                    )
    return out


def verb_of(raw: Any, index: int, problems: list[str] | None = None) -> str | None:
    """The one verb of a raw step, or None (with a problem when `problems` is given)."""
    where = f"steps.{index}"
    if not isinstance(raw, dict):
        if problems is not None:
            problems.append(f"{where}: a step is a mapping such as {{patch: yarn, factor: 4}}; got {raw!r}")
        return None
    verbs = [k for k in raw if k in STEPS]
    if len(verbs) == 1:
        return verbs[0]
    if problems is not None and not verbs:
        unknown = next((str(k) for k in raw), "")
        problems.append(
            f"{where}: no verb; each step has exactly one of {', '.join(STEPS)}"
            + (did_you_mean(unknown, list(STEPS)) if unknown else "")
        )
    elif problems is not None:
        problems.append(f"{where}: {' and '.join(verbs)} in one step; give each its own step")
    return None


def compile_steps(raw_steps: list[Any], problems: list[str]) -> list[Step]:
    """Typed steps from the raw list, then the ordering rules; every problem appended. A step whose
    own settings are invalid still counts by its verb, so one mistake does not cascade."""
    compiled: list[Step] = []
    seen = Seen()
    for index, raw in enumerate(raw_steps):
        verb = verb_of(raw, index, problems)
        if verb is None:
            continue
        cls = STEPS[verb]
        step = cls.parse(index, raw[verb], {k: v for k, v in raw.items() if k != verb}, problems)
        if step is not None:
            step.order(seen, problems)
            compiled.append(step)
        cls.note(raw[verb], seen)
    return compiled
