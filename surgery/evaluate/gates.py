"""Gates: turn a before/after comparison into pass or fail.

Syntax (shared by `surgery compare --gate` and recipes): `METRIC:RULE=VALUE[,RULE=VALUE...]`
- METRIC is a namespaced metric (`perplexity.ppl@2048`) or a glob (`harness.*`).
- `min=X` / `max=X`: bounds on the after value.
- `max_increase=X` / `max_decrease=X`: bound on after - before; `X%` makes it relative to before.
- `min_recovery=R`: quality kept, direction-aware: after/before for higher-is-better metrics,
  before/after for lower-is-better ones (perplexity); 0.95 means at most a 5% loss.
- `confidence=C` (e.g. 0.95) makes every rule of the gate respect the metrics' intervals: it
  passes when the whole interval of the gated quantity is within the limit, fails when the whole
  interval is beyond it, and is *inconclusive* otherwise (exit code 3), saying how many samples
  would tell. Stored intervals are 95%; another level rescales their half-widths (normal
  approximation). A change's interval adds the two half-widths in quadrature (`stats.combine`).
  Without `confidence` a rule compares point estimates, as before.
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from typing import Literal

from pydantic import BaseModel

from surgery.errors import GateError, did_you_mean
from surgery.evaluate.base import higher_is_better
from surgery.evaluate.stats import CONFIDENCE, Estimate, combine, needed, paired

RULES = ("min", "max", "max_increase", "max_decrease", "min_recovery")
NEEDS_BEFORE = {"max_increase", "max_decrease", "min_recovery"}


class Rule(BaseModel):
    kind: str
    value: float
    relative: bool = False

    def describe(self) -> str:
        return f"{self.kind}={self.value * 100 if self.relative else self.value:g}{'%' if self.relative else ''}"


class Gate(BaseModel):
    metric: str
    rules: list[Rule]
    text: str
    confidence: float | None = None


Status = Literal["pass", "fail", "inconclusive"]


class GateOutcome(BaseModel):
    gate: str
    metric: str
    rule: str
    before: float | None
    after: float
    passed: bool  # status == "pass"
    message: str
    status: Status = "pass"
    needed: int | None = None  # samples that would settle an inconclusive rule (None: none would)


def parse_gate(text: str) -> Gate:
    """Parse `METRIC:RULE=VALUE[,RULE=VALUE]`; errors name the part that is wrong."""
    metric, sep, rest = text.rpartition(":")
    if not sep or not metric or not rest:
        raise GateError(f"bad gate '{text}': write METRIC:RULE=VALUE, e.g. perplexity.ppl@2048:max_increase=5%")
    rules, confidence = [], None
    for part in rest.split(","):
        kind, eq, raw = part.partition("=")
        kind, raw = kind.strip(), raw.strip()
        if kind == "confidence":
            try:
                confidence = float(raw)
            except ValueError:
                confidence = math.nan
            if not 0.5 <= confidence < 1:
                raise GateError(f"bad gate '{text}': confidence is a level such as 0.95 (between 0.5 and 1)")
            continue
        if kind not in RULES:
            raise GateError(f"bad gate '{text}': unknown rule '{kind}'{did_you_mean(kind, list(RULES))}")
        m = re.fullmatch(r"(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)(%?)", raw)
        if not eq or not m:
            raise GateError(f"bad gate '{text}': '{part}' needs a number, e.g. {kind}=0.95 or {kind}=5%")
        relative = bool(m.group(2))
        if relative and kind not in ("max_increase", "max_decrease"):
            raise GateError(f"bad gate '{text}': only max_increase and max_decrease take a percentage")
        rules.append(Rule(kind=kind, value=float(m.group(1)) / (100 if relative else 1), relative=relative))
    if not rules:
        raise GateError(f"bad gate '{text}': confidence needs a rule, e.g. {metric}:max_increase=2%,confidence=0.95")
    return Gate(metric=metric.strip(), rules=rules, text=text, confidence=confidence)


def check_rule(rule: Rule, before: float | None, after: float, metric: str) -> tuple[bool, str]:
    if rule.kind in NEEDS_BEFORE and (before == 0 and (rule.relative or rule.kind == "min_recovery")):
        raise GateError(f"{rule.describe()} on '{metric}' is relative to a baseline of 0; use an absolute rule")
    if rule.kind == "min_recovery" and after == 0 and not higher_is_better(metric):
        raise GateError(f"min_recovery on '{metric}' divides by its after value, which is 0; use an absolute rule")
    if rule.kind == "min":
        return after >= rule.value, f"{after:.4g} >= {rule.value:g}"
    if rule.kind == "max":
        return after <= rule.value, f"{after:.4g} <= {rule.value:g}"
    assert before is not None
    if rule.kind in ("max_increase", "max_decrease"):
        change = after - before if rule.kind == "max_increase" else before - after
        scaled = change / abs(before) if rule.relative else change
        if math.isnan(scaled):
            return False, "change is not a number"
        shown = f"{scaled * 100:+.2f}%" if rule.relative else f"{scaled:+.4g}"
        return scaled <= rule.value, f"{rule.kind.split('_')[1]} {shown} (limit {rule.describe().split('=')[1]})"
    kept = after / before if higher_is_better(metric) else before / after
    return kept >= rule.value, f"recovery {kept:.4f} (min {rule.value:g})"


def scaled(est: Estimate, confidence: float) -> Estimate:
    """A stored 95% interval rescaled to another level (normal approximation), kept in the range of
    a bounded score."""
    if confidence == CONFIDENCE:
        return est
    z = statistics.NormalDist().inv_cdf
    k = z(0.5 + confidence / 2) / z(0.5 + CONFIDENCE / 2)
    low, high = est.value - (est.value - est.low) * k, est.value + (est.high - est.value) * k
    if est.bounded:  # scores stay in [0, 1], their paired differences in [-1, 1]
        low, high = max(0.0 if est.low >= 0 else -1.0, low), min(1.0, high)
    return Estimate(est.value, low, high, est.n, bounded=est.bounded)


def quantity(rule: Rule, before: Estimate | None, after: Estimate, metric: str) -> tuple[Estimate, bool]:
    """The gated quantity with its interval, and whether the rule bounds it from above."""
    if rule.kind in ("min", "max"):
        return after, rule.kind == "max"
    assert before is not None
    if rule.kind in ("max_increase", "max_decrease"):
        change = paired(before, after) or combine(before, after)
        if rule.kind == "max_decrease":
            change = Estimate(-change.value, -change.high, -change.low, change.n)
        if rule.relative:
            base = abs(before.value) or math.nan
            change = Estimate(change.value / base, change.low / base, change.high / base, change.n)
        return change, True
    change = paired(before, after)
    if change is not None:  # kept = after / before, from the paired change with before fixed
        ratio = Estimate(
            after.value / before.value, 1 + change.low / before.value, 1 + change.high / before.value, change.n
        )
        if not higher_is_better(metric):
            ratio = Estimate(1 / ratio.value, 1 / ratio.high, 1 / ratio.low, ratio.n)
        return ratio, False
    if min(before.low, after.low) <= 0:
        raise GateError(f"min_recovery on '{metric}' with confidence needs positive values and intervals")
    logs = combine(before.map(math.log), after.map(math.log))  # log(after / before)
    if not higher_is_better(metric):
        logs = Estimate(-logs.value, -logs.high, -logs.low, logs.n)
    return logs.map(math.exp), False


def check_with_confidence(
    rule: Rule, before: Estimate | None, after: Estimate, metric: str, confidence: float
) -> tuple[Status, str, int | None]:
    """pass / fail / inconclusive from the interval of the gated quantity."""
    q, upper = quantity(rule, before, after, metric)
    q = scaled(q, confidence)
    worst, best = (q.high, q.low) if upper else (q.low, q.high)
    within = (lambda x: x <= rule.value) if upper else (lambda x: x >= rule.value)
    pct = rule.relative
    show = (lambda x: f"{x * 100:+.2f}%") if pct else (lambda x: f"{x:.4g}")
    text = f"{show(q.value)} [{show(q.low)}, {show(q.high)}] ({rule.describe()}, {confidence:.0%})"
    if within(worst):
        return "pass", text, None
    if not within(best):
        return "fail", text, None
    half = (q.high - q.value) if (upper == within(q.value)) else (q.value - q.low)
    more = needed(q.n, half, abs(q.value - rule.value))
    advice = f"about {more} samples (now {q.n}) would tell" if more else "the estimate sits on the limit"
    return "inconclusive", f"{text}: {advice}", more


def safe_bound(name: str, rule: Rule, after: dict[str, float]) -> str:
    """The metric a rule should read for `name`: a top-k KL (`X.kl@N`) is a lower bound of the
    exact KL, so a rule that bounds it from above (max, max_increase) reads its upper bound
    `X.kl_hi@N` where one was measured; anything else reads `name` itself."""
    stem, at, length = name.rpartition("@")
    upper = stem[:-2] + "kl_hi" if stem.endswith(".kl") else ""
    if upper and f"{upper}{at}{length}" in after and rule.kind in ("max", "max_increase"):
        return f"{upper}{at}{length}"
    return name


def evaluate_gates(
    gates: list[Gate],
    before: dict[str, float] | None,
    after: dict[str, float],
    intervals: tuple[dict[str, Estimate], dict[str, Estimate]] | None = None,
) -> list[GateOutcome]:
    """Check every gate; a gate naming no metric, or needing a missing baseline, is a user error.
    `intervals` (before, after) are the metrics' estimates, used by gates with `confidence`."""
    outcomes = []
    b_ci, a_ci = intervals or ({}, {})
    for gate in gates:
        names = sorted(m for m in after if fnmatch.fnmatchcase(m, gate.metric))
        if not names:
            raise GateError(f"gate '{gate.text}': no metric '{gate.metric}'{did_you_mean(gate.metric, list(after))}")
        for name in names:
            for rule in gate.rules:
                read = safe_bound(name, rule, after)
                prior = (before or {}).get(read)
                if rule.kind in NEEDS_BEFORE and prior is None:
                    raise GateError(f"gate '{gate.text}': {rule.kind} needs a baseline, and '{read}' has none before")
                more = None
                passed, message = check_rule(rule, prior, after[read], read)  # also refuses zero baselines
                status = "pass" if passed else "fail"
                if gate.confidence and read in a_ci and (rule.kind not in NEEDS_BEFORE or read in b_ci):
                    status, message, more = check_with_confidence(
                        rule, b_ci.get(read), a_ci[read], read, gate.confidence
                    )
                elif gate.confidence:  # significance was asked for and cannot be had
                    status = "inconclusive"
                    message += " (no interval to judge at this confidence: inconclusive)"
                if read != name:
                    message += f" (read from {read.rpartition('.')[2]}, the upper bound of the top-k KL)"
                outcomes.append(
                    GateOutcome(
                        gate=gate.text,
                        metric=name,
                        rule=rule.describe(),
                        before=prior,
                        after=after[read],
                        passed=status == "pass",
                        message=message,
                        status=status,
                        needed=more,
                    )
                )
    return outcomes


def verdict(outcomes: list[GateOutcome]) -> Status:
    """fail if any rule failed, else inconclusive if any could not tell, else pass."""
    statuses = {o.status for o in outcomes}
    return "fail" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "pass"


EXIT_CODES: dict[str, int] = {"pass": 0, "fail": 1, "inconclusive": 3}  # 2 is a user error
