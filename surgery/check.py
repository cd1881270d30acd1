"""`surgery check ORIGINAL PATCHED`: does the patched model still do what the original did?

The battery is chosen from the patch records the patched model carries (`config.surgery`):
- always: divergence from the original (KL, top-1 agreement, perplexity ratio) at the checked
  length on two offline text domains, the language reference (`pydoc`) and library docstrings
  (`docs`), so a heal or a fit on one domain is judged on the other too;
- RoPE patches: long-context tasks (RULER-style) at the longest length checked, and perplexity by
  band past the original context when the new length allows it;
- kv-quant: divergence through the quantized cache (chunked) and the tasks (generation reads it);
- gqa / mqa / mla: the tasks at the checked length;
- sliding-window: the tasks, whose needles sit beyond the window.

Each check comes with default gates at 95% confidence, printed so they can be copied and
tightened; a gate given on a default gate's metric replaces it. The original's side (reference statistics, task scores) is cached by model and
settings, so checking ten candidates against one original pays for it once. `budget` (minutes)
scales the sample counts to the measured speed of one forward; too few samples give an
*inconclusive* verdict that says how many would tell, never a pass by default.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.arch import text_config
from surgery.data import NAMED
from surgery.errors import SurgeryError
from surgery.evaluate.base import Eval, EvalResult, make_eval
from surgery.evaluate.gates import Gate, GateOutcome, evaluate_gates, parse_gate, verdict
from surgery.evaluate.report import Report, compare_rows, estimates_of, interval_problem, markdown_table
from surgery.lazy import torch

log = logging.getLogger(__name__)

ROPE = {"yarn", "ntk", "dynamic-ntk", "linear", "llama3"}
DOMAINS = ("pydoc", "docs")
DIVERGENCE_WINDOWS = 8  # per domain at full budget
TASK_TRIALS = 9  # x 5 depths = 45 prompts per task: Wilson ±0.15
TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe"]
# default limits (all at 95% confidence); see README "Check" for the measured benign and damaging values
MAX_PPL_RATIO = 1.10  # at most 10% higher perplexity than the original on each domain
MAX_KL = 0.10  # nats per token, mean
MAX_TASK_DROP = 0.10  # absolute drop of the mean task score
MAX_LONG_PPL = 1.25  # band perplexity past the original context vs the original's within it


@dataclass
class Item:
    """One evaluation of the battery: on which model(s) it runs, and why it is there."""

    eval: Eval
    why: str
    original: bool = True  # also evaluated on the original (the baseline of its gates)


@dataclass
class Battery:
    items: list[Item]
    gates: list[str]
    length: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        lines = [f"  {it.eval.name} {params_text(it.eval)}  ({it.why})" for it in self.items]
        return lines + ["  gates (copy and tighten with --gate):"] + [f"    --gate '{g}'" for g in self.gates]


def params_text(e: Eval) -> str:
    defaults = type(e)().model_dump() if _has_defaults(type(e)) else {}
    shown = {k: v for k, v in e.model_dump().items() if defaults.get(k, object()) != v}
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in shown.items())


def _has_defaults(cls: type[Eval]) -> bool:
    return all(not f.is_required() for f in cls.model_fields.values())


def context_of(config: Any) -> int:
    return int(getattr(text_config(config), "max_position_embeddings", 0) or 0)


def plan(
    original_config: Any,
    records: list[dict[str, Any]],
    length: int | None = None,
    scale: float = 1.0,
    reference: str = "",
    trained: set[str] | frozenset[str] = frozenset(),
) -> Battery:
    """The battery for a patched model with these patch records, against an original with this
    config. `scale` (0-1] shrinks sample counts to a time budget. `trained`: the text sources the
    model's recipe trained or calibrated on; when it covers both default domains, the next offline
    domain joins them, so at least one domain is always one the model never saw."""
    native = context_of(original_config)
    new = max([native, *[_new_context(r) for r in records]])
    asked = length or 4096
    checked = min(native, asked) if native else asked  # the original is compared within its context
    longest = min(new, asked) if native else asked  # a RoPE patch is also judged past it, when asked
    names = [r["name"] for r in records]
    windows = max(2, round(DIVERGENCE_WINDOWS * scale))
    trials = max(1, round(TASK_TRIALS * scale))
    items: list[Item] = []
    gates: list[str] = []
    notes = []
    domains = list(DOMAINS)
    if set(domains) <= set(trained):
        unseen = [d for d in NAMED if d not in trained]
        if unseen:
            domains.append(unseen[0])
            notes.append(f"{unseen[0]} joins the domains: the recipe trained or calibrated on {' and '.join(DOMAINS)}")
        else:
            notes.append(
                f"the recipe trained or calibrated on every offline domain ({', '.join(NAMED)}): "
                "add an eval on a text it never saw"
            )
    for domain in domains:
        e = make_eval("divergence", reference=reference or None, length=checked, samples=windows, text=domain)
        items.append(Item(e, f"divergence from the original on {domain}", original=False))
        gates += [
            f"divergence.{domain}.ppl_ratio@{checked}:max={MAX_PPL_RATIO:g},confidence=0.95",
            f"divergence.{domain}.kl@{checked}:max={MAX_KL:g},confidence=0.95",
        ]
    if "kv-quant" in names:
        chunk = max(64, checked // 8)
        e = make_eval("divergence", reference=reference or None, length=checked, samples=windows, chunk=chunk)
        items.append(Item(e, f"the quantized cache read back ({chunk}-token chunks)", original=False))
        gates += [
            f"divergence.{e.domain}.ppl_ratio@{checked}:max={MAX_PPL_RATIO:g},confidence=0.95",
            f"divergence.{e.domain}.kl@{checked}:max={MAX_KL:g},confidence=0.95",
        ]
    windowed = [int(r["params"]["window"]) for r in records if r["name"] == "sliding-window"]
    why = {
        "kv-quant": "tasks through the quantized cache",
        "gqa": "tasks at the checked length",
        "mqa": "tasks at the checked length",
        "mla": "tasks at the checked length (the latent compresses the keys and values)",
        "sliding-window": f"tasks with needles beyond the {min(windowed, default=0)}-token window",
    }
    reasons = [why[n] for n in names if n in why] + (["tasks within the original context"] if ROPE & set(names) else [])
    depths = [0.1, 0.3, 0.5, 0.7, 0.9] if scale >= 0.5 else [0.2, 0.5, 0.8]  # a small budget: 3 depths
    if reasons:
        e = make_eval("ruler", lengths=[checked], depths=depths, trials=trials, batch=5)
        items.append(Item(e, "; ".join(dict.fromkeys(reasons))))
        gates.append(f"ruler.avg@{checked}:max_decrease={MAX_TASK_DROP:g},confidence=0.95")
    if ROPE & set(names) and new > native:
        if longest > native:  # past the original context: the patched model alone, gated against the original within it
            e = make_eval("ruler", lengths=[longest], depths=depths, trials=trials, batch=5)
            items.append(Item(e, f"tasks at {longest}, past the original {native}", original=False))
            e = make_eval("perplexity", lengths=[longest], band=native, samples=1)
            items.append(Item(e, f"perplexity by band past the original {native} tokens", original=False))
        if longest < new:
            notes.append(
                f"the new context ({new}) is beyond the checked length {longest}: check it with --length {new} "
                f"where time allows (perplexity past {native} and tasks at {new})"
            )
    return Battery(items=items, gates=gates, length=checked, notes=notes)


def preflight(battery: Battery, gates: list[Gate]) -> None:
    """Refuse, before anything loads, a user gate this battery cannot answer: a metric of an eval
    the check does not run, a divergence domain it does not measure, or a length it does not
    measure at (it would fail after the minutes the battery takes)."""
    evals = sorted({it.eval.name for it in battery.items})
    domains = {it.eval.domain for it in battery.items if it.eval.name == "divergence"}
    lengths = {battery.length}
    for it in battery.items:
        p = it.eval.model_dump()
        lengths |= {p["length"]} if "length" in p else set(p.get("lengths") or [])
    for g in gates:
        head = g.metric.split(".", 1)[0]
        if head not in evals:
            raise SurgeryError(
                f"gate {g.text!r}: this check runs no {head} eval (it runs {', '.join(evals)}); "
                "gate one of their metrics, e.g. divergence.pydoc.kl@LENGTH"
            )
        if head == "divergence":
            domain = (g.metric.split(".") + [""])[1].partition("@")[0]
            if not any(fnmatch.fnmatchcase(d, domain) for d in domains):
                raise SurgeryError(
                    f"gate {g.text!r}: this check measures divergence on {', '.join(sorted(domains))}, not "
                    f"{domain or '(no domain)'}; gate e.g. divergence.{sorted(domains)[0]}.kl@{battery.length}"
                )
        at = g.metric.rpartition("@")[2] if "@" in g.metric else ""
        if at.isascii() and at.isdigit() and int(at) not in lengths:
            shown = ", ".join(map(str, sorted(lengths)))
            raise SurgeryError(f"gate {g.text!r}: this check measures at {shown} tokens, not {at}; use one of those")


def _new_context(record: dict[str, Any]) -> int:
    diff = record["config_diff"].get("max_position_embeddings") or {}
    return int(diff.get("after") or 0) if isinstance(diff, dict) else 0


def patch_records(config: Any) -> list[dict[str, Any]]:
    """The patch records of a config, checked: a list of {name, params, config_diff} mappings (a
    hand-edited or foreign `surgery` entry is refused, not half-read)."""
    from surgery.patch import PATCHES, PatchRecord, construct

    raw = getattr(config, "surgery", None) or []
    if not isinstance(raw, list):
        raise SurgeryError("the patched model's config has a 'surgery' entry that is not a list of patch records")
    out = []
    for i, record in enumerate(raw):
        try:
            parsed = PatchRecord.model_validate(record)
            if parsed.name in PATCHES:  # its parameters as the patch itself would take them
                construct(PATCHES[parsed.name], parsed.name, parsed.params)
        except ValueError as err:
            lines = str(err).splitlines()
            raise SurgeryError(
                f"patch record {i} in the patched model's config is malformed ({(lines[1:] or lines)[0].strip()})"
            ) from None
        except SurgeryError as err:
            raise SurgeryError(f"patch record {i} in the patched model's config: {err}") from None
        out.append(parsed.model_dump())
    return out


# ---------------------------------------------------------------------- the original's results


def original_key(original: str, e: Eval, dtype: str) -> dict[str, Any]:
    """Everything the original's result for `e` depends on: the model's files, the eval and its
    parameters (text, lengths, samples, seed), the dtype and the code that computed it."""
    from surgery.evaluate.divergence import model_identity
    from surgery.keys import versions

    return {
        "version": 2,
        "model": model_identity(original),
        "eval": e.name,
        "params": e.model_dump(mode="json"),
        "dtype": dtype,
        "versions": versions(),
    }


def original_cache(key: dict[str, Any]) -> Path:
    from surgery.keys import digest
    from surgery.models import cache_dir

    return cache_dir() / "check" / f"{digest(key)}.json"


def cached_result(path: Path, key: dict[str, Any]) -> EvalResult | None:
    """The original's cached result stored at `path`, if it is the entry for `key` (which it
    carries inside) and its intervals hold their values; a refused entry is named in a warning."""
    from surgery.keys import mismatch

    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_bytes())
        problem = mismatch(entry.get("key") if isinstance(entry, dict) else None, key)
        result = EvalResult.model_validate(entry["result"]) if problem is None else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem, result = f"it is not a cached result ({type(err).__name__})", None
    if result is not None and (result.name != key["eval"] or result.params != key["params"]):
        problem = "its result is another eval's"
    elif result is not None and interval_problem(result):
        problem = interval_problem(result)
    if problem:
        log.warning("check: refusing the cached result %s: %s; recomputing it", path, problem)
        return None
    return result


def store(path: Path, key: dict[str, Any], result: EvalResult) -> None:
    """Cache a result with its key; an unwritable cache costs the next check a recompute, nothing else."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "result": result.model_dump(mode="json")}))
        os.replace(tmp, path)
    except OSError as err:
        log.warning("check: could not cache %s (%s)", path, err)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


# ---------------------------------------------------------------------- running


@dataclass
class CheckOutcome:
    status: str
    battery: Battery
    before: list[EvalResult]
    after: list[EvalResult]
    outcomes: list[GateOutcome]
    seconds: float

    @property
    def table(self) -> str:
        b = {k: v for r in self.before for k, v in r.metrics.items()}
        a = {k: v for r in self.after for k, v in r.metrics.items()}
        intervals = (estimates_of(self.before), estimates_of(self.after))
        return markdown_table(compare_rows(b, a, intervals), self.outcomes)

    def verdict_line(self) -> str:
        bad = [o for o in self.outcomes if o.status == self.status]
        if self.status == "pass":
            return f"PASS: no regression at 95% confidence ({len(self.outcomes)} gate checks, {self.seconds:.0f} s)"
        worst = "; ".join(f"{o.metric} {o.message}" for o in bad[:3])
        if self.status == "fail":
            return f"FAIL: {len(bad)} of {len(self.outcomes)} gate checks regressed: {worst}"
        return f"INCONCLUSIVE: {len(bad)} gate checks could not tell: {worst} (raise --budget)"


def calibrate(model: torch.nn.Module, tokenizer: Any, length: int) -> float:
    """Seconds of one forward over `length` tokens (the unit the budget is spent in)."""
    ids = torch.randint(10, min(1000, len(tokenizer)), (1, length), device=next(model.parameters()).device)
    with torch.inference_mode():
        start = time.perf_counter()
        getattr(model, model.base_model_prefix)(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def cost(battery: Battery) -> float:
    """The battery's cost in forwards of `battery.length` tokens (patched side, plus the original's
    tasks; reference statistics cost one forward per window)."""
    total = 0.0
    for it in battery.items:
        p = it.eval.model_dump()
        if it.eval.name == "divergence":
            total += 2 * p["samples"] * p["length"] / battery.length
        elif it.eval.name == "ruler":
            prompts = len(p["tasks"]) * len(p["lengths"]) * len(p["depths"]) * p["trials"]
            total += 2 * 1.5 * prompts * max(p["lengths"]) / battery.length  # prefill and answer
        elif it.eval.name == "perplexity":
            total += p["samples"] * (max(p["lengths"]) / battery.length) ** 1.5
    return total


def run_check(
    original: str,
    records: list[dict[str, Any]],
    load_patched: Callable[[], tuple[torch.nn.Module, Any]],
    *,
    length: int | None = None,
    budget: float | None = None,
    extra_gates: list[str] | None = None,
    trained: set[str] | frozenset[str] = frozenset(),
    notes: list[str] | None = None,
    dtype: str = "float32",
    say: Callable[[str], None] = print,
) -> CheckOutcome:
    """Check a patched model (with these patch `records`) against the original. The original is
    loaded first and released before `load_patched` is called, so the two never share memory
    unless the caller already holds the patched model."""
    from surgery.models import load_config, load_model

    start = time.perf_counter()
    extra = [parse_gate(g) for g in extra_gates or []]  # bad gates fail before anything loads
    battery = plan(load_config(original), records, length, 1.0, reference=original, trained=trained)
    preflight(battery, extra)  # before minutes of loading and measuring
    say(f"loading the original {original}")
    model, tokenizer = load_model(original, dtype=dtype)
    if tokenizer is None:
        raise SurgeryError(f"{original} has no tokenizer, which the check needs; save one with the model")
    scale = 1.0
    if budget:
        per_forward = calibrate(model, tokenizer, battery.length)
        scale = min(1.0, budget * 60 / max(1e-9, per_forward * cost(battery)))
        battery = plan(model.config, records, length, scale, reference=original, trained=trained)
        say(
            f"budget {budget:g} min: one {battery.length}-token forward takes {per_forward:.1f} s; samples x{scale:.2f}"
        )
    battery.notes.extend(notes or [])
    say(f"check of {len(records)} patch record(s): {', '.join(r.get('name', '?') for r in records) or 'none'}")
    for line in battery.describe() + [f"  note: {n}" for n in battery.notes]:
        say(line)
    before: list[EvalResult] = []
    for it in battery.items:
        if it.eval.name == "divergence" and it.eval.prepare_reference(model, tokenizer):  # cached by its full key
            say(f"original: reference statistics on {it.eval.domain} reused from the cache (same files, text and code)")
        if it.original:
            key = original_key(original, it.eval, dtype)
            path = original_cache(key)
            result = cached_result(path, key)
            if result is None:
                say(f"original: {it.eval.name} ...")
                result = it.eval.run(model, tokenizer)
                store(path, key, result)
            else:
                say(
                    f"original: {it.eval.name} reused from the cache ({path.name}, same model files, settings and code)"
                )
            before.append(result)
    del model
    gc.collect()
    patched_model, patched_tokenizer = load_patched()
    if patched_tokenizer is not None and patched_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SurgeryError(
            "the original and the patched model have different tokenizers; check compares like with like"
        )
    after = []
    for it in battery.items:
        say(f"patched: {it.eval.name} {params_text(it.eval)} ...")
        result = it.eval.run(patched_model, tokenizer)
        say("    " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if not k.endswith("_gap")))
        after.append(result)
    b = {k: v for r in before for k, v in r.metrics.items()}
    a = {k: v for r in after for k, v in r.metrics.items()}
    for it in battery.items:  # past the original context: limits from the original within it
        if it.eval.name == "perplexity":
            within = a[f"divergence.{DOMAINS[0]}.ref_ppl@{battery.length}"]
            battery.gates.append(f"perplexity.band_ppl@*:max={MAX_LONG_PPL * within:.4g},confidence=0.95")
        if it.eval.name == "ruler" and not it.original:
            floor = b[f"ruler.avg@{battery.length}"] - MAX_TASK_DROP
            battery.gates.append(f"ruler.avg@{it.eval.lengths[0]}:min={floor:.3g},confidence=0.95")
    named = {g.metric for g in extra}  # a gate on a default gate's metric replaces it
    gates = [g for g in map(parse_gate, battery.gates) if g.metric not in named] + extra
    outcomes = evaluate_gates(gates, b, a, (estimates_of(before), estimates_of(after)))
    return CheckOutcome(verdict(outcomes), battery, before, after, outcomes, time.perf_counter() - start)


def write_check(outcome: CheckOutcome, original: str, patched: str, directory: Path) -> None:
    """check.json, report.md and plots (KL by position, task heatmaps) into `directory`."""
    from surgery.evaluate.report import plot_divergence, plot_ruler

    payload = {
        "status": outcome.status,
        "verdict": outcome.verdict_line(),
        "original": original,
        "patched": patched,
        "gates": [o.model_dump() for o in outcome.outcomes],
        "battery": [
            {"eval": it.eval.name, "params": it.eval.model_dump(mode="json"), "why": it.why}
            for it in outcome.battery.items
        ],
        "notes": outcome.battery.notes,
        "seconds": outcome.seconds,
    }
    (directory / "check.json").write_text(json.dumps(payload, indent=2) + "\n")
    (directory / "original.json").write_text(Report(model=original, results=outcome.before).model_dump_json(indent=2))
    (directory / "patched.json").write_text(Report(model=patched, results=outcome.after).model_dump_json(indent=2))
    lines = [f"# Check: {patched} against {original}", "", f"**{outcome.verdict_line()}**", ""]
    lines += ["Battery:", "", "```", *outcome.battery.describe(), "```", ""]
    lines += [f"Note: {n}" for n in outcome.battery.notes]
    lines += ["", outcome.table]
    labels = {f"original: {Path(original).name}": Report(model=original, results=outcome.before)}
    labels[f"patched: {Path(patched).name}"] = Report(model=patched, results=outcome.after)
    if plot_divergence(labels, directory / "divergence.png"):
        lines += ["", "![KL divergence by position](divergence.png)"]
    if plot_ruler(labels, directory / "ruler.png"):
        lines += ["", "![long-context tasks](ruler.png)"]
    (directory / "report.md").write_text("\n".join(lines) + "\n")
