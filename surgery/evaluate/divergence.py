"""Divergence from the original: the patched model's next-token distributions against a reference
model's, position by position, on the same token windows (llama.cpp's `--kl-divergence`).

Metrics at the window length L: KL(reference ‖ patched) per token (mean, median, p99, max), top-1
agreement (the same most likely next token), and the perplexity ratio patched / reference on the
real next tokens; each with a block-bootstrap 95% interval. A KL-by-position curve shows where a
patch starts to hurt ("fine up to the window, broken after it").

The reference never has to share memory with the patched model. Its statistics are computed once
and cached on disk (`$SURGERY_CACHE/reference`, keyed by the reference's files, the tokenizer, the
text and the window settings): per position the top-k token ids and their log-probabilities, and
the log-probability of the real next token. KL is then computed against that file:

    KL_k = Σ_{i∈K} p_i log(p_i / q_i) + r log(r / s),   r = 1 - Σ_K p_i,  s = 1 - Σ_K q_i

which is the exact KL between the two distributions with the tail outside the reference's top k
lumped into one outcome. By the log-sum inequality KL_k <= KL (a lower bound). Every tail token
has p_i <= p_min (the smallest top-k probability), and the tail's contribution Σ p_i log(p_i / q_i)
is convex in p, so it is at most the value of filling the tail tokens with the smallest q_i up to
p_min each until r is spent: that gives an upper bound KL_hi computed from the patched model's
full distribution. Every position reports exact KL within [KL_k, KL_hi]; `kl_gap@L` is the mean
width, and it is 0 with `top_k=0`, which keeps the reference loaded and computes KL exactly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from surgery.data import TextSource, text_label
from surgery.errors import SurgeryError, reason
from surgery.evaluate.base import Eval, register
from surgery.evaluate.cache import make_cache
from surgery.evaluate.perplexity import LOGIT_SLICE, text_windows
from surgery.evaluate.stats import block_mean, block_quantile
from surgery.io import progress
from surgery.keys import canonical
from surgery.lazy import torch

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def final_hidden(model: torch.nn.Module, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Final hidden states at positions 0..T-2 of `ids` (B, T), the ones that predict a token of
    the window; `chunk` feeds the text through the model's KV cache, as generation reads it."""
    base = getattr(model, model.base_model_prefix)
    last = ids.shape[1] - 1
    if not chunk:
        return base(input_ids=ids, use_cache=False).last_hidden_state[:, :last]
    cache = make_cache(model)
    parts = []
    for s in range(0, last, chunk):
        hidden = base(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).last_hidden_state
        parts.append(hidden[:, : min(chunk, last - s)])
    return torch.cat(parts, dim=1)


def log_probs(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) from final hidden states; call on LOGIT_SLICE
    positions at a time (the full-vocabulary tensor is the large one)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


LOGP_FLOOR = -1e9  # the log-prob kept for a token the reference rules out (probability 0, finite)


def topk_stats(logp: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The compact reference of one slice: top-k ids and log-probs, and the real token's log-prob.
    A token the model rules out (-inf, e.g. a masked vocabulary padding) gets a log-prob of -1e9:
    probability 0 all the same, and finite, so 0 x log 0 never turns a KL or its gradient to NaN."""
    values, index = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return {
        "topk_ids": index.to(torch.int32),
        "topk_logp": values.clamp_min(LOGP_FLOOR),
        "target_logp": logp.gather(-1, targets[..., None]).squeeze(-1).clamp_min(LOGP_FLOOR),
    }


def tail_bound(logq: torch.Tensor, ids: torch.Tensor, p_min: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Upper bound of Σ_{i∉K} p_i log(p_i / q_i) given p_i <= p_min and Σ_{i∉K} p_i = r: fill the
    tail tokens with the smallest q_i up to p_min each (the maximum of a convex function on this
    polytope is at such a vertex). logq (..., V); ids (..., k); p_min, r (...)."""
    masked = logq.scatter(-1, ids.long(), float("inf"))  # top-k tokens are not in the tail
    full = torch.where(p_min > 0, torch.floor(r / p_min.clamp_min(1e-30)), torch.zeros_like(r))
    tail = logq.shape[-1] - ids.shape[-1]
    m = int(min(tail, (full.max().item() if full.numel() else 0) + 1))
    if m <= 0:
        return torch.zeros_like(r)
    smallest = (-(-masked).topk(m, dim=-1).values).clamp_max(0)  # ascending log q of the tail
    j = torch.arange(m, device=logq.device)
    weight = torch.where(j < full[..., None], p_min[..., None], torch.zeros((), device=logq.device))
    rest = (r - full * p_min).clamp_min(0)
    weight = torch.where(j == full[..., None], rest[..., None], weight)
    term = torch.where(weight > 0, weight * (weight.clamp_min(1e-30).log() - smallest), torch.zeros_like(weight))
    return term.sum(-1)


def compare_exact(logp: torch.Tensor, logq: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position exact KL(p ‖ q), top-1 agreement and both models' NLL of the real tokens."""
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
    return {
        "kl": kl,
        "kl_hi": kl,
        "top1": (logp.argmax(-1) == logq.argmax(-1)).float(),
        "nll_ref": -logp.gather(-1, targets[..., None]).squeeze(-1),
        "nll": -logq.gather(-1, targets[..., None]).squeeze(-1),
    }


def lumped_kl(
    ids: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL_k, its head term, the reference's tail mass r) per position: KL(p ‖ q) with the tail outside the reference's top-k
    `ids` (log-probs `logp`) lumped into one outcome, r = 1 - Σ_K p against s = 1 - Σ_K q (the
    two tails computed alike, so a model against itself gives exactly 0). Differentiable in `logq`:
    the distillation loss of a heal."""
    p = logp.exp()
    q_at = logq.gather(-1, ids)
    head = (p * (logp - q_at)).sum(-1)
    r = (1 - p.sum(-1)).clamp_min(0)
    s = (1 - q_at.exp().sum(-1)).clamp_min(1e-30)
    lumped = torch.where(r > 0, r * (r.clamp_min(1e-30).log() - s.log()), torch.zeros_like(r))
    return head + lumped, head, r


def compare_topk(ref: dict[str, torch.Tensor], logq: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same from a compact reference: KL_k (a lower bound) and KL_hi (an upper bound)."""
    ids, logp = ref["topk_ids"].long(), ref["topk_logp"].float()
    lumped, head, r = lumped_kl(ids, logp, logq)
    kl = lumped.clamp_min(0)
    hi = head + tail_bound(logq, ids, logp[..., -1].exp(), r)
    return {
        "kl": kl,
        "kl_hi": torch.maximum(hi, kl),
        "top1": (ids[..., 0] == logq.argmax(-1)).float(),
        "nll_ref": -ref["target_logp"].float(),
        "nll": -logq.gather(-1, targets[..., None]).squeeze(-1),
    }


def stats_problem(stats: dict[str, torch.Tensor], windows: torch.Tensor, top_k: int, vocab: int) -> str | None:
    """Why cached reference statistics do not fit these windows (None when they do): every tensor
    with its shape and dtype, finite log-probs at most 0 whose top-k probabilities sum to at most
    1, distinct token ids within the vocabulary."""
    positions = (windows.shape[0], windows.shape[1] - 1)
    k = min(top_k, vocab)
    want = {"topk_ids": (positions + (k,), torch.int32), "topk_logp": (positions + (k,), torch.float32)}
    want["target_logp"] = (positions, torch.float32)
    if set(stats) != set(want):
        return f"tensors {sorted(stats)}, expected {sorted(want)}"
    for name, (shape, dtype) in want.items():
        if tuple(stats[name].shape) != shape or stats[name].dtype != dtype:
            return f"{name} is {stats[name].dtype} {tuple(stats[name].shape)}, expected {dtype} {shape}"
    for name in ("topk_logp", "target_logp"):
        values = stats[name]
        if not torch.isfinite(values).all() or (values > 1e-4).any():
            return f"{name} holds values that are not log-probabilities"
    if (stats["topk_logp"].exp().sum(-1) > 1 + 1e-3).any():
        return "topk_logp sums to more than probability 1"
    ids = stats["topk_ids"]
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        return "topk_ids outside the vocabulary"
    if ids.numel() and (ids.sort(-1).values.diff(dim=-1) == 0).any():
        return "topk_ids repeats a token at one position"
    return None


def model_identity(reference: str) -> dict[str, Any]:
    """What the cached reference statistics depend on in the reference model: its files' names,
    sizes and modification times for local models, the id for hub models."""
    from surgery.models import resolve

    source = resolve(reference)
    files = []
    for root in source.paths()[:1]:
        candidates = sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        for f in candidates:
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"kind": source.kind, "location": source.location if source.kind == "hub" else None, "files": files}


def stats_key(reference: str, windows: torch.Tensor, top_k: int, dtype: Any, text: str = "") -> dict[str, Any]:
    """Everything a reference's statistics for these token windows depend on: the reference's
    files, the text they came from, the exact token ids, the settings that shape the statistics,
    and the code that computed them. Stored inside the entry and compared on every read."""
    from surgery.keys import versions

    return {
        "version": CACHE_VERSION,
        "reference": model_identity(reference),
        "text": text,
        "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "shape": list(windows.shape),
        "top_k": top_k,
        "dtype": str(dtype),
        "versions": versions(),
    }


def stats_path(key: dict[str, Any]) -> Path:
    """Where the reference statistics with this key live."""
    from surgery.keys import digest
    from surgery.models import cache_dir

    return cache_dir() / "reference" / f"{digest(key)}.safetensors"


def cached_stats(path: Path, key: dict[str, Any], windows: torch.Tensor, top_k: int, vocab: int) -> Any:
    """The statistics stored at `path` if they are this key's and fit these windows, else None
    (a warning says why an entry there was refused)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from surgery.keys import mismatch

    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "null"))
        problem = mismatch(stored, key)
        stats = load_file(path) if problem is None else None
        problem = problem or stats_problem(stats, windows, top_k, vocab)
    except Exception as err:  # a torn or foreign file: recompute it
        problem = reason(err, 200)
    if problem is None:
        log.info("reference statistics reused from the cache: %s", path)
        return stats
    log.warning("refusing the cached reference statistics %s: %s; recomputing them", path, problem)
    return None


def reference_topk(
    reference: str,
    windows: torch.Tensor,
    top_k: int,
    dtype: torch.dtype | None,
    vocab: int,
    loaded: torch.nn.Module | None = None,
    batch: int = 1,
    note: str = "",
) -> dict[str, torch.Tensor]:
    """A reference model's top-k statistics for token `windows` (N, T): per predicted position its
    top-k ids and log-probs and the real next token's log-prob. Read from the cache when a file
    there fits these windows, else computed (from `loaded`, or by loading `reference` once) and
    cached; the divergence eval and the distillation loss of a heal both read it."""
    from safetensors.torch import save_file

    dtype = dtype if loaded is None else next(loaded.parameters()).dtype
    key = stats_key(reference, windows, top_k, dtype, note)
    path = stats_path(key)
    stats = cached_stats(path, key, windows, top_k, vocab)
    if stats is not None:
        return stats
    if loaded is not None:
        model = loaded
    else:
        from surgery.models import load_model

        model, _ = load_model(reference, dtype=dtype or "float32")
    got_vocab = model.get_output_embeddings().weight.shape[0]
    if got_vocab != vocab:
        raise SurgeryError(
            f"the reference {reference} has {got_vocab} output tokens, the model {vocab}; use the same tokenizer"
        )
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"topk_ids": [], "topk_logp": [], "target_logp": []}
    with torch.inference_mode(), progress(len(windows), "reference statistics", "window") as bar:
        for s in range(0, len(windows), batch):
            ids = windows[s : s + batch].to(next(model.parameters()).device)
            pieces: dict[str, list[torch.Tensor]] = {k: [] for k in parts}
            hidden = final_hidden(model, ids)
            for a in range(0, hidden.shape[1], LOGIT_SLICE):
                logp = log_probs(model, hidden[:, a : a + LOGIT_SLICE])
                got = topk_stats(logp, ids[:, a + 1 : a + 1 + logp.shape[1]], top_k)
                for k, v in got.items():
                    pieces[k].append(v.cpu())
            for k in parts:
                parts[k].append(torch.cat(pieces[k], dim=1))
            bar.update(ids.shape[0])
    model.train(was_training)
    del model
    stats = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stats, str(tmp), metadata={"key": canonical(key)})
        os.replace(tmp, path)
    except OSError as err:  # an unwritable cache costs the next run a recompute, nothing else
        log.warning("could not cache the reference statistics in %s (%s)", path.parent, err)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return stats


@register
class Divergence(Eval):
    """KL divergence, top-1 agreement and perplexity ratio against a reference model."""

    name: ClassVar[str] = "divergence"
    higher_is_better: ClassVar[dict[str, bool]] = {"top1": True, "kl": False, "ppl": False, "ref_ppl": False}

    reference: str | None = Field(
        None, description="the model to compare with (in a recipe: the recipe's model, when not given)"
    )
    length: int = Field(2048, ge=2, description="tokens per window; metrics are named @length")
    samples: int = Field(4, ge=1, description="consecutive windows of the text")
    text: TextSource = Field("pydoc", description="text source: pydoc, docs, a .txt/.jsonl file, or hf:NAME[:CONFIG]")
    split: str = Field("heldout", pattern="^(train|heldout)$", description="train or heldout part of the source")
    chunk: int | None = Field(None, gt=0, description="feed the patched model the text through its KV cache in chunks")
    top_k: int = Field(
        128, ge=0, description="reference log-probs kept per position (0: keep the reference loaded, exact KL)"
    )
    batch: int = Field(1, ge=1, description="windows per forward")
    bos: bool = Field(True, description="prepend the tokenizer's BOS token when it has one")
    buckets: int = Field(32, ge=1, description="points in the KL-by-position curve")

    @classmethod
    def better_when_higher(cls, metric: str) -> bool:
        return super().better_when_higher(metric.split(".", 1)[-1])  # after the text domain

    @property
    def domain(self) -> str:
        """The text's short name, which leads every metric name, with the chunk size when the KV
        cache is read (`pydoc-chunk512`): two domains, or a text with and without the cache,
        never collide."""
        return text_label(self.text) + (f"-chunk{self.chunk}" if self.chunk else "")

    def metric_stems(self) -> list[str]:
        stems = ["kl", "kl_median", "kl_p99", "kl_max", "top1", "ppl_ratio", "ppl", "ref_ppl"]
        return stems + (["kl_hi", "kl_gap"] if self.top_k else [])

    def for_recipe(self, model: str) -> Divergence:
        return self if self.reference else self.model_copy(update={"reference": model})

    def windows(self, tokenizer: Any) -> torch.Tensor:
        return text_windows(tokenizer, self.text, self.split, self.length, self.samples, self.bos, self.name)

    # ------------------------------------------------------------------ reference statistics

    def need_reference(self) -> str:
        if not self.reference:
            raise SurgeryError("divergence needs reference=MODEL (the model to compare with)")
        return self.reference

    def prepare_reference(self, reference: torch.nn.Module, tokenizer: Any) -> bool:
        """Compute and cache the reference statistics from an already loaded reference model
        (`surgery check` loads the original once for all its evals). True when the cache already
        held them (under their full key)."""
        if not self.top_k:
            return False
        vocab = reference.get_output_embeddings().weight.shape[0]
        windows = self.windows(tokenizer)
        dtype = next(reference.parameters()).dtype
        key = stats_key(self.need_reference(), windows, self.top_k, dtype, self.text)
        if cached_stats(stats_path(key), key, windows, self.top_k, vocab) is not None:
            return True
        self.reference_stats(windows, None, vocab, loaded=reference)
        return False

    def reference_stats(
        self, windows: torch.Tensor, dtype: torch.dtype | None, vocab: int, loaded: torch.nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """The reference's top-k statistics for `windows` (cached; see `reference_topk`)."""
        return reference_topk(
            self.need_reference(), windows, self.top_k, dtype, vocab, loaded, self.batch, note=self.text
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        windows = self.windows(tokenizer)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        if self.top_k:
            stats = self.reference_stats(windows, dtype, model.get_output_embeddings().weight.shape[0])
            reference = None
        else:
            from surgery.models import load_model

            reference, _ = load_model(self.need_reference(), dtype=dtype)
            reference.eval()
        rows: dict[str, list[torch.Tensor]] = {}
        with progress(len(windows), f"divergence ({self.length} tokens)", "window") as bar:
            for s in range(0, len(windows), self.batch):
                ids = windows[s : s + self.batch].to(device)
                hidden = final_hidden(model, ids, self.chunk)
                ref_hidden = final_hidden(reference, ids) if reference is not None else None
                pieces: dict[str, list[torch.Tensor]] = {}
                for a in range(0, hidden.shape[1], LOGIT_SLICE):
                    b = min(a + LOGIT_SLICE, hidden.shape[1])
                    logq, targets = log_probs(model, hidden[:, a:b]), ids[:, a + 1 : b + 1]
                    if ref_hidden is not None:
                        got = compare_exact(log_probs(reference, ref_hidden[:, a:b]), logq, targets)
                    else:
                        ref = {k: v[s : s + len(ids), a:b].to(device) for k, v in stats.items()}
                        got = compare_topk(ref, logq, targets)
                    for k, v in got.items():
                        pieces.setdefault(k, []).append(v.double().cpu())
                for k, v in pieces.items():
                    rows.setdefault(k, []).append(torch.cat(v, dim=1))
                bar.update(ids.shape[0])
        data = {k: torch.cat(v).numpy() for k, v in rows.items()}  # (windows, positions)
        return self.summarize(data)

    def summarize(self, data: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
        n, kl, d = self.length, data["kl"], self.domain
        metrics: dict[str, Any] = {
            f"{d}.kl@{n}": block_mean(kl),
            f"{d}.kl_median@{n}": block_quantile(kl, 0.5),
            f"{d}.kl_p99@{n}": block_quantile(kl, 0.99),
            f"{d}.kl_max@{n}": block_quantile(kl, 1.0),
            f"{d}.top1@{n}": block_mean(data["top1"]),
            f"{d}.ppl_ratio@{n}": block_mean(data["nll"] - data["nll_ref"]).exp(),
            f"{d}.ppl@{n}": block_mean(data["nll"]).exp(),
            f"{d}.ref_ppl@{n}": block_mean(data["nll_ref"]).exp(),
        }
        if self.top_k:  # the upper bound: what a `max` gate on KL should read (exact KL is between)
            metrics[f"{d}.kl_hi@{n}"] = block_mean(data["kl_hi"])
            metrics[f"{d}.kl_gap@{n}"] = float((data["kl_hi"] - kl).mean())
        width = kl.shape[1]
        edges = np.linspace(0, width, min(self.buckets, width) + 1).astype(int)
        curve = [
            [(a + b) / 2, float(kl[:, a:b].mean()), float(data["top1"][:, a:b].mean())]
            for a, b in zip(edges[:-1], edges[1:], strict=True)
            if b > a
        ]
        details = {
            "kl_by_position": curve,
            "reference": self.reference,
            "tokens": int(kl.size),
            "bound": "exact" if not self.top_k else f"top-{self.top_k}: exact KL in [kl, kl + kl_gap] per position",
        }
        return metrics, details


def kl_bound_warnings(results: list[Any]) -> dict[str, str]:
    """For each top-k KL metric far below its upper bound (a gap above both the value and 0.01
    nats), the sentence that belongs on its line: the headline number is then only a lower bound,
    and a reader must not take it for the divergence. Keyed by the full metric name."""
    out = {}
    for result in results:
        if result.name != "divergence" or not result.params.get("top_k"):
            continue
        k = int(result.params["top_k"])
        for name, value in result.metrics.items():
            stem, _, length = name.rpartition("@")
            if not stem.endswith(".kl"):
                continue
            hi, gap = result.metrics.get(f"{stem}_hi@{length}"), result.metrics.get(f"{stem}_gap@{length}")
            if hi is None or gap is None or gap <= max(0.01, value):
                continue
            out[name] = (
                f"a lower bound: the exact KL is up to {hi:.4g} (the reference's top-{k} leaves too much of its tail "
                f"out); gates on kl read that bound; rerun with top_k=0 for the exact value, or top_k={8 * k}"
            )
    return out
