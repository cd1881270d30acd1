"""The Eval protocol, mirroring Patch: an eval class *is* its parameters (a frozen pydantic model),
registered by name in `EVALS`; `run(model, tokenizer)` returns an `EvalResult` whose metrics are
flat and namespaced (`perplexity.ppl@2048`) so reports and gates can address them."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from surgery.errors import SurgeryError, UnknownEval, did_you_mean, numbers_not_bools
from surgery.evaluate.stats import Estimate
from surgery.lazy import torch
from surgery.patch import construct


class EvalResult(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")  # a NaN metric is written as NaN and read back

    name: str
    params: dict[str, Any]
    metrics: dict[str, float]
    details: dict[str, Any] = {}
    seconds: float = 0.0
    intervals: dict[str, tuple[float, float]] = {}  # 95% interval of each metric that has one
    counts: dict[str, int] = {}  # independent samples behind each interval (prompts, blocks)
    units: dict[str, list[float]] = {}  # per-prompt or per-block values, for paired comparisons
    log_units: list[str] = []  # metrics that are exp(mean of their units): perplexities

    def estimate(self, metric: str) -> Estimate | None:
        """The metric with its interval, or None when it has no interval."""
        if metric not in self.intervals:
            return None
        low, high = self.intervals[metric]
        units = tuple(self.units.get(metric, ()))
        return Estimate(self.metrics[metric], low, high, self.counts.get(metric, 0), units, metric in self.log_units)


class Eval(BaseModel):
    """Base class of every evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_not_bools(cls, data: Any) -> Any:
        return numbers_not_bools(cls, data)

    name: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]] = {}
    """Per metric prefix (after the eval name): whether larger is better (for reports and gates)."""

    @classmethod
    def better_when_higher(cls, metric: str) -> bool:
        """Direction of one of this eval's metrics (`metric` without the eval-name prefix);
        unknown metrics count as higher-is-better. Evals with open-ended metrics override it."""
        for prefix, better in cls.higher_is_better.items():
            if metric.startswith(prefix):
                return better
        return True

    def metric_stems(self) -> list[str] | None:
        """The names this eval's metrics take between the eval (and domain) and `@` (`kl`, `avg`),
        so a gate can be checked before anything runs; None when they are open-ended."""
        return None

    def for_recipe(self, model: str) -> Eval:
        """This eval inside a recipe whose starting model is `model` (divergence takes it as its
        reference when none is given)."""
        return self

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float | Estimate], dict[str, Any]]:
        """Return (metrics without the eval-name prefix, details); a metric given as an `Estimate`
        keeps its 95% interval and sample count."""
        raise NotImplementedError

    def run(self, model: torch.nn.Module, tokenizer: Any) -> EvalResult:
        if tokenizer is None:
            raise SurgeryError(f"eval {self.name} needs a tokenizer, and this model has none")
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                metrics, details = self.evaluate(model, tokenizer)
        finally:
            model.train(was_training)
        named = {f"{self.name}.{k}": v for k, v in metrics.items()}
        estimates = {k: v for k, v in named.items() if isinstance(v, Estimate)}
        return EvalResult(
            name=self.name,
            params=self.model_dump(mode="json"),
            metrics={k: float(v.value if isinstance(v, Estimate) else v) for k, v in named.items()},
            details=details,
            seconds=time.perf_counter() - start,
            intervals={k: (float(e.low), float(e.high)) for k, e in estimates.items()},
            counts={k: int(e.n) for k, e in estimates.items()},
            units={k: [round(u, 6) for u in e.units] for k, e in estimates.items() if e.units},
            log_units=[k for k, e in estimates.items() if e.log],
        )


EVALS: dict[str, type[Eval]] = {}


def register(cls: type[Eval]) -> type[Eval]:
    assert cls.name not in EVALS, f"eval {cls.name!r} registered twice"
    EVALS[cls.name] = cls
    return cls


def get_eval(name: str) -> type[Eval]:
    if name not in EVALS:
        raise UnknownEval(f"unknown eval '{name}'{did_you_mean(name, list(EVALS))}")
    return EVALS[name]


def make_eval(name: str, **params: Any) -> Eval:
    """Build a validated eval from its name and raw parameters; errors become `InvalidParams`."""
    return construct(get_eval(name), name, params)


def higher_is_better(metric: str) -> bool:
    """Direction of a namespaced metric; unknown metrics count as higher-is-better."""
    name, _, rest = metric.partition(".")
    return EVALS[name].better_when_higher(rest) if name in EVALS else True
