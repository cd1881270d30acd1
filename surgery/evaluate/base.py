"""The Eval protocol, mirroring Patch: an eval class *is* its parameters (a frozen pydantic model),
registered by name in `EVALS`; `run(model, tokenizer)` returns an `EvalResult` whose metrics are
flat and namespaced (`perplexity.ppl@2048`) so reports and gates can address them."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from surgery.errors import SurgeryError
from surgery.patch import construct, did_you_mean


class EvalResult(BaseModel):
    name: str
    params: dict[str, Any]
    metrics: dict[str, float]
    details: dict[str, Any] = {}
    seconds: float = 0.0


class Eval(BaseModel):
    """Base class of every evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: ClassVar[str]
    higher_is_better: ClassVar[dict[str, bool]] = {}
    """Per metric prefix (after the eval name): whether larger is better (for reports and gates)."""

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """Return (metrics without the eval-name prefix, details)."""
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
        return EvalResult(
            name=self.name,
            params=self.model_dump(mode="json"),
            metrics={f"{self.name}.{k}": float(v) for k, v in metrics.items()},
            details=details,
            seconds=time.perf_counter() - start,
        )


EVALS: dict[str, type[Eval]] = {}


def register(cls: type[Eval]) -> type[Eval]:
    assert cls.name not in EVALS, f"eval {cls.name!r} registered twice"
    EVALS[cls.name] = cls
    return cls


def get_eval(name: str) -> type[Eval]:
    if name not in EVALS:
        raise SurgeryError(f"unknown eval '{name}'{did_you_mean(name, list(EVALS))}")
    return EVALS[name]


def make_eval(name: str, **params: Any) -> Eval:
    """Build a validated eval from its name and raw parameters; errors become `InvalidParams`."""
    return construct(get_eval(name), name, params)


def higher_is_better(metric: str) -> bool:
    """Direction of a namespaced metric; unknown metrics count as higher-is-better."""
    name, _, rest = metric.partition(".")
    if name == "harness":
        from surgery.evaluate.harness import LOWER_IS_BETTER

        return rest.rpartition(".")[2].split("_stderr")[0] not in LOWER_IS_BETTER
    table = EVALS[name].higher_is_better if name in EVALS else {}
    for prefix, better in table.items():
        if rest.startswith(prefix):
            return better
    return True
