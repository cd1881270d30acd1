"""lm-evaluation-harness on the in-memory (patched) model.

`HFLM` wraps the model object with its tokenizer and an explicit `max_length` (by default the
patched model's `max_position_embeddings`; lm-eval would otherwise read a possibly stale config
and left-truncate silently). Any lm-eval task name passes through for users with datasets. Two
offline tasks ship with the package, built from the held-out part of the default text, so they
need no network: `surgery_cloze` (last-word prediction, LAMBADA style) and `surgery_rolling`
(rolling log-likelihood: word/byte perplexity, bits per byte). Under `accelerate launch` the
documents are split across the processes."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, ClassVar

from pydantic import Field, field_validator

from surgery.data import pydoc_topics_split
from surgery.errors import SurgeryError
from surgery.evaluate.base import Eval, register
from surgery.lazy import torch

log = logging.getLogger(__name__)


def cloze_docs(limit: int = 300) -> list[dict[str, str]]:
    """Passages of held-out prose whose last word is a plain English word of 4+ letters."""
    docs = []
    for topic in pydoc_topics_split("heldout"):
        for paragraph in re.split(r"\n\s*\n", topic):
            words = " ".join(paragraph.split()).split(" ")
            if not 20 <= len(words) <= 120:
                continue
            last = words[-1].rstrip(".")
            if not re.fullmatch(r"[a-z]{4,}", last):
                continue
            docs.append({"context": " ".join(words[:-1]), "target": " " + last})
            if len(docs) == limit:
                return docs
    return docs


def rolling_docs() -> list[dict[str, str]]:
    return [{"text": t} for t in pydoc_topics_split("heldout")]


def _dataset(rows: list[dict[str, str]]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _rolling_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    words, nbytes = len(re.split(r"\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }


def offline_tasks() -> dict[str, dict[str, Any]]:
    """lm-eval task configs (dicts) whose data is built in-process: no files, no network."""
    return {
        "surgery_cloze": {
            "task": "surgery_cloze",
            "custom_dataset": lambda **_: _dataset(cloze_docs()),
            "output_type": "loglikelihood",
            "test_split": "test",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
            "metadata": {"version": 1.0},
        },
        "surgery_rolling": {
            "task": "surgery_rolling",
            "custom_dataset": lambda **_: _dataset(rolling_docs()),
            "output_type": "loglikelihood_rolling",
            "test_split": "test",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "process_results": _rolling_results,
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
            "metadata": {"version": 1.0},
        },
    }


OFFLINE_TASKS = ("surgery_cloze", "surgery_rolling")
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def make_lm(model: torch.nn.Module, tokenizer: Any, max_length: int | None = None, batch_size: int = 1):
    """`HFLM` around an in-memory model, with the tokenizer and an explicit max_length. Under
    `accelerate launch` with several processes it is data-parallel: lm-eval leaves distribution to
    the caller for a model passed as an object, so each process is given its rank, and lm-eval
    splits the documents across them and gathers the results on the first."""
    from lm_eval.models.huggingface import HFLM

    length = max_length or model.config.get_text_config().max_position_embeddings
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=length, batch_size=batch_size)
    processes = distributed()
    # data-parallel only where the model sits on the processes' device (gathers go through it)
    if processes is not None and next(model.parameters()).device.type == processes.device.type:
        lm.accelerator, lm._rank, lm._world_size = processes, processes.process_index, processes.num_processes
    return lm


def multi_process() -> bool:
    """Whether this process is one of several (a multi-process `accelerate launch`)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def distributed() -> Any:
    """The Accelerator of a multi-process launch, or None in one process."""
    if not multi_process():
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def share(result: Any) -> Any:
    """lm-eval's results, which only the first process holds, on every process."""
    if not multi_process():
        return result
    import torch.distributed as dist

    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@register
class Harness(Eval):
    """lm-evaluation-harness tasks on the in-memory model (offline tasks ship with surgery)."""

    name: ClassVar[str] = "harness"

    @classmethod
    def better_when_higher(cls, metric: str) -> bool:
        """`TASK.METRIC[_stderr]`: perplexities and bits per byte are better lower, the rest higher."""
        return metric.rpartition(".")[2].split("_stderr")[0] not in LOWER_IS_BETTER

    tasks: list[str] = Field(
        list(OFFLINE_TASKS), description="lm-eval task names; surgery_cloze and surgery_rolling need no network"
    )
    max_length: int | None = Field(
        None, gt=0, description="HFLM max_length (default: the model's max_position_embeddings)"
    )
    limit: int | None = Field(None, gt=0, description="documents per task (default: all)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples")
    batch_size: int = Field(1, ge=1, description="HFLM batch size")

    @field_validator("tasks", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float], dict[str, Any]]:
        if all(t in OFFLINE_TASKS for t in self.tasks):  # nothing to fetch: never touch the network
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import lm_eval

        shipped = offline_tasks()
        specs = [shipped.get(t, t) for t in self.tasks]
        lm = make_lm(model, tokenizer, self.max_length, self.batch_size)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                limit=self.limit,
                num_fewshot=self.num_fewshot,
                log_samples=False,
                bootstrap_iters=0,
            )
        except KeyError as err:
            raise SurgeryError(
                f"harness: unknown lm-eval task ({err}); surgery ships {', '.join(OFFLINE_TASKS)}"
            ) from None
        out = share(out)
        metrics: dict[str, float] = {}
        for task, values in out["results"].items():
            for key, value in values.items():
                metric, _, filt = key.partition(",")
                if (
                    "stderr" in metric
                    or metric in ("alias", "sample_len", "sample_count")
                    or not isinstance(value, (int, float))
                ):
                    continue
                suffix = "" if filt in ("", "none") else f"_{filt}"
                metrics[f"{task}.{metric}{suffix}"] = float(value)
        details = {"versions": out.get("versions", {}), "n_samples": out.get("n-samples", {})}
        return metrics, {**details, "processes": lm.world_size}
