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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.arch import text_config
from surgery.data import NAMED
from surgery.errors import SurgeryError, did_you_mean
from surgery.evaluate.base import Eval, EvalResult, make_eval
from surgery.evaluate.divergence import kl_bound_warnings
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
    scale: float = 1.0  # of the full sample counts, set to fit a budget

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
    patched_context: int = 0,
) -> Battery:
    """The battery for a patched model with these patch records, against an original with this
    config. `scale` (0-1] shrinks sample counts to a time budget. `trained`: the text sources the
    model's recipe trained or calibrated on; when it covers both default domains, the next offline
    domain joins them, so at least one domain is always one the model never saw. A `length`
    beyond both models' contexts (`patched_context`: the patched config's) is refused."""
    native = context_of(original_config)
    new = max([native, patched_context, *[_new_context(r) for r in records]])
    asked = length or 4096
    if native and asked > new:
        raise SurgeryError(
            f"--length {asked} is beyond what either model supports (original {native} positions, patched "
            f"{max(new, native)}); check at --length {new} or less"
        )
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
    if length and checked < asked:
        notes.append(
            f"the original is compared within its {native} positions; the patched model alone is judged at {longest}"
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
        stem = g.metric.partition("@")[0].split(".")[-1]
        stems = sorted({x for it in battery.items if it.eval.name == head for x in it.eval.metric_stems() or ["*"]})
        if "*" not in stems and not any(fnmatch.fnmatchcase(x, stem) for x in stems):
            raise SurgeryError(f"gate {g.text!r}: {head} has no metric {stem!r}{did_you_mean(stem, stems)}")
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


def same_model(original: str, patched: str) -> None:
    """Refuse a check of a model against itself (it passes by construction and proves nothing)."""
    from surgery.models import resolve

    a, b = resolve(original), resolve(patched)
    if a.kind == b.kind and (
        a.location == b.location if a.kind == "hub" else Path(a.location).resolve() == Path(b.location).resolve()
    ):
        raise SurgeryError(
            f"{original} and {patched} are the same checkpoint; check a patched model against its original"
        )


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


def cost(battery: Battery, cached: frozenset[int] = frozenset()) -> float:
    """The battery's cost in forwards of `battery.length` tokens: the patched side, plus the
    original's side of the items not in `cached` (indexes whose reference statistics or results
    the cache holds); reference statistics cost one forward per window."""
    total = 0.0
    for i, it in enumerate(battery.items):
        p = it.eval.model_dump()
        sides = 1 if i in cached else 2
        if it.eval.name == "divergence":
            total += sides * p["samples"] * p["length"] / battery.length
        elif it.eval.name == "ruler":
            prompts = len(p["tasks"]) * len(p["lengths"]) * len(p["depths"]) * p["trials"]
            sides = 2 if it.original and i not in cached else 1
            total += sides * 1.5 * prompts * max(p["lengths"]) / battery.length  # prefill and answer
        elif it.eval.name == "perplexity":
            total += p["samples"] * (max(p["lengths"]) / battery.length) ** 1.5
    return total


def fit_to_texts(battery: Battery, tokenizer: Any) -> None:
    """Give each text eval of the battery at most the windows its text holds (saying so), and
    refuse, naming the length that would fit, one whose text cannot hold what it needs: before
    anything is measured, not after."""
    from surgery.data import load_text, token_stream

    sizes: dict[tuple[str, str], int] = {}
    bos = 1 if tokenizer.bos_token_id is not None else 0
    for i, it in enumerate(battery.items):
        e = it.eval
        if e.name not in ("divergence", "perplexity"):
            continue
        if (e.text, e.split) not in sizes:
            sizes[(e.text, e.split)] = len(token_stream(tokenizer, load_text(e.text, e.split)))
        tokens = sizes[(e.text, e.split)]
        length = e.length if e.name == "divergence" else max(e.lengths)
        body = length - (bos if e.bos else 0)
        fits, least = tokens // body, 2 if e.name == "divergence" else 1  # 2 windows: an interval
        if fits >= e.samples:
            continue
        if fits < least:
            most = tokens // least + (bos if e.bos else 0)
            raise SurgeryError(
                f"the {e.text} text ({e.split}) has {tokens} tokens, fewer than {least} x {body} for {e.name} at "
                f"{length} tokens; check with --length {most} or less"
            )
        battery.items[i] = Item(e.model_copy(update={"samples": fits}), it.why, it.original)
        battery.notes.append(f"{e.text} ({e.split}) holds {fits} windows of {length} tokens: {fits} of {e.samples}")


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
    patched_context: int = 0,
    patched_tokenizer: Any = None,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
) -> CheckOutcome | None:
    """Check a patched model (with these patch `records`) against the original. Everything that
    can be refused is refused before the original's weights load: gates, lengths, texts too short,
    a tokenizer other than the original's (`patched_tokenizer`), a budget that cannot hold the
    smallest battery. The original is loaded first and released before `load_patched` is called,
    so the two never share memory unless the caller already holds the patched model. `dry_run`
    stops after planning and timing, with the battery and its estimated minutes said (None)."""
    from surgery.models import load_config, load_model, load_tokenizer

    start = time.perf_counter()
    extra = [parse_gate(g) for g in extra_gates or []]  # bad gates fail before anything loads
    config = load_config(original)
    battery = plan(config, records, length, 1.0, original, trained, patched_context)
    preflight(battery, extra)  # before minutes of loading and measuring
    tokenizer = load_tokenizer(original)
    if patched_tokenizer is not None and patched_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SurgeryError(
            "the original and the patched model have different tokenizers; check compares like with like"
        )
    fit_to_texts(battery, tokenizer)
    say(f"loading the original {original}")
    model, _ = load_model(original, dtype=dtype)
    if budget or dry_run:  # the cost in forwards of the checked length, without what the cache holds
        per_forward = calibrate(model, tokenizer, battery.length)
        forwards = cost(battery, cached_items(battery, original, tokenizer, dtype))
        if budget:
            scale = min(1.0, budget * 60 / max(1e-9, per_forward * forwards))
            battery = plan(config, records, length, scale, original, trained, patched_context)
            battery.scale = scale
            fit_to_texts(battery, tokenizer)
            forwards = cost(battery, cached_items(battery, original, tokenizer, dtype))
        say(budget_line(battery, budget, per_forward, per_forward * forwards / 60))
    battery.notes.extend(notes or [])
    say(f"check of {len(records)} patch record(s): {', '.join(r.get('name', '?') for r in records) or 'none'}")
    for line in battery.describe() + [f"  note: {n}" for n in battery.notes]:
        say(line)
    if dry_run:
        return None
    before = original_side(battery, original, model, tokenizer, dtype, say)
    del model
    gc.collect()
    patched_model, _ = load_patched()
    after = []
    for it in battery.items:
        say(f"patched: {it.eval.name} {params_text(it.eval)} ...")
        result = it.eval.run(patched_model, tokenizer)
        say("    " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if not k.endswith("_gap")))
        for metric, text in kl_bound_warnings([result]).items():
            say(f"    WARNING: {metric} = {result.metrics[metric]:.4g} is {text}")
        after.append(result)
    return judge(battery, extra, before, after, time.perf_counter() - start)


def cached_items(battery: Battery, original: str, tokenizer: Any, dtype: str) -> frozenset[int]:
    """Indexes of the items whose original side the cache already holds (under their full key)."""
    from surgery.evaluate.divergence import cached_stats, stats_key, stats_path
    from surgery.models import parse_dtype

    out = set()
    for i, it in enumerate(battery.items):
        e = it.eval
        if e.name == "divergence" and e.top_k:
            windows = e.windows(tokenizer)
            key = stats_key(original, windows, e.top_k, parse_dtype(dtype), e.text)
            if cached_stats(stats_path(key), key, windows, e.top_k, len(tokenizer)) is not None:
                out.add(i)
        elif it.original and original_cache(original_key(original, e, dtype)).is_file():
            out.add(i)
    return frozenset(out)


def budget_line(battery: Battery, budget: float | None, per_forward: float, minutes: float) -> str:
    """What the battery will cost, said before it runs; refused when it would take over 1.2 x the
    budget (the smallest battery at this length does not fit)."""
    timing = f"one {battery.length}-token forward takes {per_forward:.1f} s"
    if not budget:
        return f"estimated {minutes:.1f} min ({timing})"
    if minutes > 1.2 * budget:
        raise SurgeryError(
            f"--budget {budget:g} min cannot hold the smallest battery at {battery.length} tokens (about "
            f"{minutes:.1f} min: {timing}); raise --budget to {math.ceil(minutes)} or lower --length"
        )
    return f"budget {budget:g} min: {timing}; samples x{battery.scale:.2f}, about {minutes:.1f} min"


def original_side(
    battery: Battery, original: str, model: torch.nn.Module, tokenizer: Any, dtype: str, say: Callable[[str], None]
) -> list[EvalResult]:
    """The original's reference statistics and results, each from the cache when it holds them."""
    before: list[EvalResult] = []
    for it in battery.items:
        if it.eval.name == "divergence" and it.eval.prepare_reference(model, tokenizer):  # cached by its full key
            say(f"original: reference statistics on {it.eval.domain} reused from the cache (same files, text and code)")
        if not it.original:
            continue
        key = original_key(original, it.eval, dtype)
        path = original_cache(key)
        result = cached_result(path, key)
        if result is None:
            say(f"original: {it.eval.name} ...")
            result = it.eval.run(model, tokenizer)
            store(path, key, result)
        else:
            say(f"original: {it.eval.name} reused from the cache ({path.name}, same model files, settings and code)")
        before.append(result)
    return before


def judge(
    battery: Battery, extra: list[Gate], before: list[EvalResult], after: list[EvalResult], seconds: float
) -> CheckOutcome:
    """The default gates (those past the original context set from its results) and the user's."""
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
    return CheckOutcome(verdict(outcomes), battery, before, after, outcomes, seconds)


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
    lines += [f"**Warning:** `{m}` is {text}." for m, text in kl_bound_warnings(outcome.after).items()]
    lines += ["", outcome.table]
    labels = {f"original: {Path(original).name}": Report(model=original, results=outcome.before)}
    labels[f"patched: {Path(patched).name}"] = Report(model=patched, results=outcome.after)
    if plot_divergence(labels, directory / "divergence.png"):
        lines += ["", "![KL divergence by position](divergence.png)"]
    if plot_ruler(labels, directory / "ruler.png"):
        lines += ["", "![long-context tasks](ruler.png)"]
    (directory / "report.md").write_text("\n".join(lines) + "\n")
