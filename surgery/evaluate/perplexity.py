"""Perplexity by context length and by position.

One forward over the longest window gives the loss at every position below it, so `ppl@L` for
all requested lengths comes from the same forwards. The loss is computed from the final hidden
states in slices, never materialising the full (T, vocab) logits (16k x 49k fp32 is 3 GB). With
`chunk`, the text is fed through the model's KV cache in chunks, so a quantized cache is read
back exactly as in generation (a single pass never reads the cache)."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from pydantic import Field, field_validator

from surgery.data import TextSource, load_text, token_stream
from surgery.errors import SurgeryError
from surgery.evaluate.base import Eval, register
from surgery.evaluate.cache import make_cache
from surgery.evaluate.stats import block_mean
from surgery.io import progress
from surgery.lazy import torch

log = logging.getLogger(__name__)
LOGIT_SLICE = 1024  # positions per lm_head call: 1024 x 49k fp32 = 200 MB


def losses_from_hidden(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (float32) of `targets` given hidden states, in slices of LOGIT_SLICE."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    out = []
    for s in range(0, hidden.shape[1], LOGIT_SLICE):
        logits = head(hidden[:, s : s + LOGIT_SLICE]).float()  # (B, slice, vocab)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        # nll = logsumexp(logits) - logits[target], computed in place: no second (slice, vocab)
        # buffer as cross_entropy's log_softmax would allocate
        target = logits.gather(-1, targets[:, s : s + LOGIT_SLICE, None]).squeeze(-1)
        peak = logits.amax(-1, keepdim=True)
        out.append(logits.sub_(peak).exp_().sum(-1).log_() + peak.squeeze(-1) - target)
    return torch.cat(out, dim=1)


def token_losses(model: torch.nn.Module, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """NLL of ids[:, 1:] given their prefixes: shape (B, T-1). `chunk` feeds the cache."""
    base = getattr(model, model.base_model_prefix)
    if not chunk:
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        return losses_from_hidden(model, hidden[:, :-1], ids[:, 1:])
    cache = make_cache(model)
    parts = []
    for s in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, s : s + chunk]
        hidden = base(input_ids=piece, cache=cache, use_cache=True).last_hidden_state
        targets = ids[:, s + 1 : s + chunk + 1]
        parts.append(losses_from_hidden(model, hidden[:, : targets.shape[1]], targets))
    return torch.cat(parts, dim=1)


def text_windows(tokenizer: Any, text: str, split: str, length: int, samples: int, bos: bool, who: str) -> torch.Tensor:
    """(samples, length) consecutive token windows of one split of a text, each after an optional
    BOS: identical ids for every model sharing the tokenizer."""
    stream = token_stream(tokenizer, load_text(text, split))
    first = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    body = length - len(first)
    if len(stream) < body * samples:
        raise SurgeryError(
            f"{who}: the {text} text ({split}) has {len(stream)} tokens, fewer than "
            f"{samples} x {body}; lower the length or samples, or use a longer text"
        )
    head = torch.tensor(first, dtype=torch.long)
    return torch.stack([torch.cat([head, stream[i * body : (i + 1) * body]]) for i in range(samples)])


@register
class Perplexity(Eval):
    """Perplexity at each context length and by position band."""

    name: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[dict[str, bool]] = {"ppl": False, "band_ppl": False, "loss": False}

    lengths: list[int] = Field([2048], description="context lengths L; ppl@L averages positions below L")
    band: int | None = Field(None, gt=0, description="also report perplexity in bands of this many positions")
    text: TextSource = Field("pydoc", description="text source: pydoc, docs, a .txt/.jsonl file, or hf:NAME[:CONFIG]")
    split: str = Field("heldout", description="train or heldout part of the source")
    samples: int = Field(1, ge=1, description="consecutive windows of max(lengths) tokens, averaged")
    batch: int = Field(1, ge=1, description="windows per forward")
    chunk: int | None = Field(None, gt=0, description="feed the text through the KV cache in chunks of this size")
    bos: bool = Field(True, description="prepend the tokenizer's BOS token when it has one")
    buckets: int = Field(64, ge=1, description="points in the loss-by-position curve")

    @field_validator("lengths", mode="before")
    @classmethod
    def _one_length(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 2 for n in v):
            raise ValueError("lengths must be a non-empty list of integers >= 2")
        return sorted(set(v))

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v not in ("train", "heldout"):
            raise ValueError("split must be train or heldout")
        return v

    def metric_stems(self) -> list[str]:
        return ["ppl", "band_ppl"] if self.band else ["ppl"]

    def windows(self, tokenizer: Any) -> torch.Tensor:
        """(samples, max_len) token ids; the same for every model sharing the tokenizer."""
        return text_windows(tokenizer, self.text, self.split, max(self.lengths), self.samples, self.bos, self.name)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float], dict[str, Any]]:
        device = next(model.parameters()).device
        windows = self.windows(tokenizer)
        losses = []
        with progress(len(windows), f"perplexity ({windows.shape[1]} tokens)", "window") as bar:
            for s in range(0, len(windows), self.batch):
                ids = windows[s : s + self.batch].to(device)
                log.info("perplexity: %d x %d tokens", ids.shape[0], ids.shape[1])
                losses.append(token_losses(model, ids, self.chunk).cpu())
                bar.update(ids.shape[0])
        rows = torch.cat(losses).double()  # (samples, max_len - 1): loss at position p predicts p+1
        loss = rows.mean(0)
        # intervals: block bootstrap over 128-position blocks of every window (stats.py)
        metrics = {f"ppl@{n}": block_mean(rows[:, : n - 1].numpy()).exp() for n in self.lengths}
        if self.band:
            for a in range(0, len(loss), self.band):
                b = min(a + self.band, len(loss))
                metrics[f"band_ppl@{a}-{b}"] = block_mean(rows[:, a:b].numpy()).exp()
        edges = torch.linspace(0, len(loss), self.buckets + 1).long().tolist()
        curve = [
            [(a + b) / 2, math.exp(loss[a:b].mean().item())]
            for a, b in zip(edges[:-1], edges[1:], strict=True)
            if b > a
        ]
        return metrics, {"ppl_by_position": curve, "tokens": int(windows.numel())}
