"""Passkey retrieval (needle in a haystack) over a grid of context lengths x depths.

Prompts are assembled from token ids, so every prompt has exactly the requested length and the
same bytes for every model sharing a tokenizer (no chat template, optional BOS: identical before
and after a patch). Keys are random digits from a seed; a cell scores 1 when the first number in
the greedy answer equals the key (exact match, no model judge)."""

from __future__ import annotations

import logging
import random
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from surgery.data import TextSource, load_text, token_stream
from surgery.errors import SurgeryError
from surgery.evaluate.base import Eval, register
from surgery.evaluate.stats import outcomes
from surgery.io import progress
from surgery.lazy import torch

log = logging.getLogger(__name__)

INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def fractions(v: list[float]) -> list[float]:
    """Needle depths: a non-empty list of fractions of the haystack (0 = its start)."""
    if not v or any(not 0 <= d <= 1 for d in v):
        raise ValueError("depths must be fractions between 0 and 1")
    return v


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


@register
class Needle(Eval):
    """Passkey retrieval accuracy by context length and needle depth."""

    name: ClassVar[str] = "needle"
    higher_is_better: ClassVar[dict[str, bool]] = {"acc": True}

    lengths: list[int] = Field([1024, 4096], description="prompt lengths in tokens")
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="needle positions, 0 = start of the haystack")
    trials: int = Field(
        9,
        ge=1,
        description="keys per (length, depth) cell; 9 x 5 depths = 45 prompts per length, a Wilson interval of at most ±0.15",
    )
    haystack: Literal["filler", "text"] = Field("filler", description="repeated filler sentences, or the text source")
    text: TextSource = Field("pydoc", description="text source when haystack=text")
    digits: int = Field(5, ge=1, le=12, description="digits in each key")
    seed: int = Field(0, description="seed for the keys")
    batch: int = Field(5, ge=1, description="prompts per generate call")
    max_new_tokens: int = Field(8, ge=1, description="tokens generated for the answer")
    bos: bool = Field(True, description="prepend the tokenizer's BOS token when it has one")

    @field_validator("lengths", "depths", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        return fractions(v)

    def cells(self) -> list[tuple[int, float, str]]:
        """(length, depth, key) for every prompt, deterministic in the seed."""
        rng = random.Random(self.seed)
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        return [
            (n, d, str(rng.randint(low, high))) for n in self.lengths for d in self.depths for _ in range(self.trials)
        ]

    def prompt(self, tokenizer: Any, length: int, depth: float, key: str, hay: torch.Tensor) -> torch.Tensor:
        encode = lambda s: token_stream(tokenizer, s)  # noqa: E731
        bos = [tokenizer.bos_token_id] if self.bos and tokenizer.bos_token_id is not None else []
        head, needle, tail = encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION)
        room = length - len(bos) - len(head) - len(needle) - len(tail)
        if room < 0:
            raise SurgeryError(f"needle: length {length} is too short for the prompt; use at least {length - room}")
        if len(hay) < room:
            raise SurgeryError(f"needle: the haystack has {len(hay)} tokens, fewer than the {room} needed")
        at = round(depth * room)
        parts = [torch.tensor(bos, dtype=torch.long), head, hay[:at], needle, hay[at:room], tail]
        ids = torch.cat(parts)
        assert len(ids) == length
        return ids

    def haystack_tokens(self, tokenizer: Any) -> torch.Tensor:
        need = max(self.lengths)
        if self.haystack == "text":
            return token_stream(tokenizer, load_text(self.text, "heldout"))
        once = token_stream(tokenizer, FILLER * 8)
        return once.repeat(need // len(once) + 1)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float], dict[str, Any]]:
        device = next(model.parameters()).device
        hay = self.haystack_tokens(tokenizer)
        cells = self.cells()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        answers: list[str] = []
        bar = progress(len(cells), "needle", "prompt")
        for length in self.lengths:
            group = [c for c in cells if c[0] == length]
            for s in range(0, len(group), self.batch):
                chunk = group[s : s + self.batch]
                ids = torch.stack([self.prompt(tokenizer, n, d, k, hay) for n, d, k in chunk]).to(device)
                log.info("needle: %d prompts of %d tokens", len(chunk), length)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
                answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
                bar.update(len(chunk))
        bar.close()
        hits = [first_number(a) == k for (_, _, k), a in zip(cells, answers, strict=True)]
        grid: dict[str, dict[str, float]] = {}
        for (n, d, _), hit in zip(cells, hits, strict=True):
            grid.setdefault(str(n), {}).setdefault(str(d), 0.0)
            grid[str(n)][str(d)] += hit / self.trials
        metrics = {"acc": outcomes(hits)}  # Wilson 95% intervals over prompts
        for n in self.lengths:
            metrics[f"acc@{n}"] = outcomes(
                [hit for (length, _, _), hit in zip(cells, hits, strict=True) if length == n]
            )
        samples = [
            {"length": n, "depth": d, "key": k, "answer": a} for (n, d, k), a in zip(cells, answers, strict=True)
        ]
        return metrics, {"grid": grid, "answers": samples}
