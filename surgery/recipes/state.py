"""What a recipe run carries from step to step: the state saved after every step (everything a
resumed run needs) and the context a running step may read and change."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from surgery.evaluate.base import EvalResult
from surgery.evaluate.gates import GateOutcome
from surgery.evaluate.stats import Estimate
from surgery.lazy import torch


class RunState(BaseModel):
    """Everything a resumed run needs, rewritten atomically after each step."""

    fingerprint: str  # of the recipe as run (with --set values)
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])  # this run, across resumes
    completed: int = 0
    results: list[EvalResult] = []
    gates: list[GateOutcome] = []
    finetunes: list[dict[str, Any]] = []
    saved: list[str] = []
    pushed: list[str] = []
    failed: bool = False  # a gate failed, or could not tell: later steps are skipped
    checkpoint: str | None = None  # directory in OUT.partial holding the model after `completed` steps
    seconds: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)  # eval step index -> what the model was then
    changes: list[str] = []  # what the steps so far did to the model: "yarn ×2", "full heal"

    def estimates(self, first: bool) -> dict[str, Estimate]:
        """First (baseline) or last value, with its interval, of every metric that has one."""
        from surgery.evaluate.report import estimates_of

        return estimates_of(self.results, first)

    def record_gates(self, outcomes: list[GateOutcome]) -> None:
        """Keep a gate step's (or a check's) outcomes; anything but a pass stops later steps."""
        self.gates.extend(outcomes)
        self.failed = self.failed or not all(o.passed for o in outcomes)

    @property
    def status(self) -> str:
        """pass, fail (a gate failed) or inconclusive (none failed, one could not tell)."""
        from surgery.evaluate.gates import verdict

        return verdict(self.gates)

    def metrics(self, first: bool) -> dict[str, float]:
        """First (baseline) or last value of every metric, in the order the results came."""
        out: dict[str, float] = {}
        for r in self.results:
            for k, v in r.metrics.items():
                if not first or k not in out:
                    out[k] = v
        return out


@dataclasses.dataclass
class RunContext:
    """What a running step may read and change."""

    recipe: Any
    model: torch.nn.Module | None  # None while the model stays on disk (only save and push remain)
    tokenizer: Any
    state: RunState
    say: Callable[[str], None]
    main: bool  # only the main process writes files
    api: Any = None  # the Hub API (tests inject a local one)
    sources: list[Any] = dataclasses.field(default_factory=list)  # what the recipe's model is read from
    on_disk: Path | None = None  # the checkpoint the steps read when the model is not loaded
