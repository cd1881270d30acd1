"""Prefill and decode throughput, and the KV cache's real size.

KV bytes are measured from the cache object (every tensor it holds, quantized payloads and scales
included) and compared with the formula 2 x layers x kv_heads x head_dim x bytes x tokens
(sliding layers capped at their window), so a cache that silently keeps more than it should, or a
quantized cache that saves less than claimed, shows up as a ratio far from 1."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from pydantic import Field

from surgery.arch import kv_cache_bytes
from surgery.data import TextSource, load_text, token_stream
from surgery.evaluate.base import Eval, register
from surgery.evaluate.cache import cache_bytes, make_cache
from surgery.lazy import torch


@register
class Speed(Eval):
    """Prefill and decode tokens/s and KV-cache bytes, measured against the formula."""

    name: ClassVar[str] = "speed"
    higher_is_better: ClassVar[dict[str, bool]] = {
        "prefill_tok_s": True,
        "decode_tok_s": True,
        "kv_bytes": False,
        "decode_ms": False,
    }

    context: int = Field(1024, ge=2, description="prompt tokens prefilled before decoding")
    decode: int = Field(32, ge=1, description="tokens decoded one at a time after the prefill")
    batch: int = Field(1, ge=1, description="sequences decoded together")
    text: TextSource = Field("pydoc", description="text source for the prompt")

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> tuple[dict[str, float], dict[str, Any]]:
        device = next(model.parameters()).device
        stream = token_stream(tokenizer, load_text(self.text, "heldout"))[: self.context]
        ids = stream.repeat(self.batch, 1).to(device)
        model(ids[:, :8], cache=make_cache(model), use_cache=True)  # warm-up: kernels, allocator
        cache = make_cache(model)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(self.decode):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync()
        decode = time.perf_counter() - start
        tokens = self.context + self.decode
        measured = cache_bytes(cache)
        dtype_bytes = next(model.parameters()).dtype.itemsize
        formula = kv_cache_bytes(model.config, tokens, dtype_bytes, self.batch)
        metrics = {
            "prefill_tok_s": self.batch * self.context / prefill,
            "decode_tok_s": self.batch * self.decode / decode,
            "decode_ms": 1000 * decode / self.decode,
            f"kv_bytes@{tokens}": measured,
            "kv_bytes_ratio": measured / formula,
        }
        details = {"prefill_s": prefill, "decode_s": decode}
        return metrics, {"kv_bytes_formula": formula, "cache": type(cache).__name__, "tokens": tokens, **details}
