"""Gates: turn a before/after comparison into pass or fail.

Syntax (shared by `surgery compare --gate` and recipes): `METRIC:RULE=VALUE[,RULE=VALUE...]`
- METRIC is a namespaced metric (`perplexity.ppl@2048`) or a glob (`harness.*`).
- `min=X` / `max=X`: bounds on the after value.
- `max_increase=X` / `max_decrease=X`: bound on after - before; `X%` makes it relative to before.
- `min_recovery=R`: quality kept, direction-aware: after/before for higher-is-better metrics,
  before/after for lower-is-better ones (perplexity); 0.95 means at most a 5% loss.
"""

from __future__ import annotations

import fnmatch
import math
import re

from pydantic import BaseModel

from surgery.errors import GateError, did_you_mean
from surgery.evaluate.base import higher_is_better

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


class GateOutcome(BaseModel):
    gate: str
    metric: str
    rule: str
    before: float | None
    after: float
    passed: bool
    message: str


def parse_gate(text: str) -> Gate:
    """Parse `METRIC:RULE=VALUE[,RULE=VALUE]`; errors name the part that is wrong."""
    metric, sep, rest = text.rpartition(":")
    if not sep or not metric or not rest:
        raise GateError(f"bad gate '{text}': write METRIC:RULE=VALUE, e.g. perplexity.ppl@2048:max_increase=5%")
    rules = []
    for part in rest.split(","):
        kind, eq, raw = part.partition("=")
        kind, raw = kind.strip(), raw.strip()
        if kind not in RULES:
            raise GateError(f"bad gate '{text}': unknown rule '{kind}'{did_you_mean(kind, list(RULES))}")
        m = re.fullmatch(r"(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)(%?)", raw)
        if not eq or not m:
            raise GateError(f"bad gate '{text}': '{part}' needs a number, e.g. {kind}=0.95 or {kind}=5%")
        relative = bool(m.group(2))
        if relative and kind not in ("max_increase", "max_decrease"):
            raise GateError(f"bad gate '{text}': only max_increase and max_decrease take a percentage")
        rules.append(Rule(kind=kind, value=float(m.group(1)) / (100 if relative else 1), relative=relative))
    return Gate(metric=metric.strip(), rules=rules, text=text)


def check_rule(rule: Rule, before: float | None, after: float, metric: str) -> tuple[bool, str]:
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


def evaluate_gates(gates: list[Gate], before: dict[str, float] | None, after: dict[str, float]) -> list[GateOutcome]:
    """Check every gate; a gate naming no metric, or needing a missing baseline, is a user error."""
    outcomes = []
    for gate in gates:
        names = sorted(m for m in after if fnmatch.fnmatchcase(m, gate.metric))
        if not names:
            raise GateError(f"gate '{gate.text}': no metric '{gate.metric}'{did_you_mean(gate.metric, list(after))}")
        for name in names:
            for rule in gate.rules:
                prior = (before or {}).get(name)
                if rule.kind in NEEDS_BEFORE and prior is None:
                    raise GateError(f"gate '{gate.text}': {rule.kind} needs a baseline, and '{name}' has none before")
                passed, message = check_rule(rule, prior, after[name], name)
                outcomes.append(
                    GateOutcome(
                        gate=gate.text,
                        metric=name,
                        rule=rule.describe(),
                        before=prior,
                        after=after[name],
                        passed=passed,
                        message=message,
                    )
                )
    return outcomes
