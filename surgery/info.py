"""`surgery inspect`: what a model is and what its KV cache costs, from the config alone."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from surgery.arch import (
    KV_DTYPE_BYTES,
    head_dim,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_heads,
    layer_windows,
    text_config,
)
from surgery.errors import SurgeryError
from surgery.lazy import torch
from surgery.patch import history

DEFAULT_CONTEXTS = (4096, 32768, 131072)


class KVSize(BaseModel):
    context: int
    bytes: int
    bytes_if_mha: int


class ModelInfo(BaseModel):
    architecture: str
    model_type: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    attention: str  # MHA, GQA-<groups>, MQA
    sliding_window: int | None
    sliding_layers: int
    rope: dict[str, Any]
    max_position_embeddings: int
    parameters: int
    kv_dtype: str
    batch: int
    kv_bytes_per_token: int
    kv_bytes_per_token_if_mha: int
    kv_cache: list[KVSize]
    patches: list[str]


MAX_CONTEXT = 1 << 30


def parse_length(text: str) -> int:
    """'4k' -> 4096, '128K' -> 131072, '1m' -> 1048576, '2048' -> 2048."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        raise SurgeryError(f"bad context length '{text}'; write e.g. 4096, 4k or 1m")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if not 1 <= value <= MAX_CONTEXT:
        raise SurgeryError(f"context length '{text.strip()}' must be between 1 and {MAX_CONTEXT:,} tokens")
    return value


def attention_kind(query: int, kv: int) -> str:
    if kv == query:
        return "MHA"
    return "MQA" if kv == 1 else f"GQA-{query // kv}"


def count_parameters(config: Any) -> int:
    """Parameters of the model built on the meta device (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def architecture(config: Any) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    named = getattr(config, "architectures", None)
    return named[0] if named else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, type(config).__name__)


def default_kv_dtype(config: Any) -> str:
    dtype = getattr(text_config(config), "dtype", None) or getattr(config, "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "bfloat16"
    return name if name in KV_DTYPE_BYTES else "bfloat16"


def inspect(
    config: Any, contexts: tuple[int, ...] = DEFAULT_CONTEXTS, batch: int = 1, kv_dtype: str | None = None
) -> ModelInfo:
    """Describe a config: shape, attention kind, RoPE, parameters and KV-cache size by context."""
    kv_dtype = kv_dtype or default_kv_dtype(config)
    if kv_dtype not in KV_DTYPE_BYTES:
        raise SurgeryError(f"unknown KV dtype '{kv_dtype}'; choose from {', '.join(KV_DTYPE_BYTES)}")
    if batch < 1:
        raise SurgeryError(f"batch must be at least 1, got {batch}")
    nbytes = KV_DTYPE_BYTES[kv_dtype]
    text = text_config(config)
    query = text.num_attention_heads
    kv = kv_heads(config)
    windows = [w for w in layer_windows(config) if w]
    return ModelInfo(
        architecture=architecture(config),
        model_type=text.model_type,
        layers=text.num_hidden_layers,
        query_heads=query,
        kv_heads=kv,
        head_dim=head_dim(config),
        attention=attention_kind(query, kv),
        sliding_window=windows[0] if windows else None,
        sliding_layers=len(windows),
        rope=dict(getattr(text, "rope_parameters", None) or {}),
        max_position_embeddings=text.max_position_embeddings,
        parameters=count_parameters(config),
        kv_dtype=kv_dtype,
        batch=batch,
        kv_bytes_per_token=kv_bytes_per_token(config, nbytes) * batch,
        kv_bytes_per_token_if_mha=kv_bytes_per_token(config, nbytes, kv_heads_override=query) * batch,
        kv_cache=[
            KVSize(
                context=c,
                bytes=kv_cache_bytes(config, c, nbytes, batch),
                bytes_if_mha=kv_cache_bytes(config, c, nbytes, batch, kv_heads_override=query),
            )
            for c in contexts
        ],
        patches=[r["name"] for r in history(config)],
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def render(info: ModelInfo) -> str:
    rope = info.rope
    rope_text = (
        ", ".join(f"{k}: {v}" for k, v in rope.items())
        if rope and "rope_type" in rope
        else "; ".join(f"{t}: {p}" for t, p in rope.items())
    )
    window = (
        f"{info.sliding_window} tokens on {info.sliding_layers}/{info.layers} layers" if info.sliding_window else "none"
    )
    lines = [
        f"architecture     {info.architecture} ({info.model_type})",
        f"parameters       {human_count(info.parameters)} ({info.parameters:,})",
        f"layers           {info.layers}",
        f"heads            {info.query_heads} query, {info.kv_heads} kv, head_dim {info.head_dim}",
        f"attention        {info.attention}",
        f"sliding window   {window}",
        f"rope             {rope_text or 'none'}",
        f"max positions    {info.max_position_embeddings}",
    ]
    if info.patches:
        lines.append(f"patched with     {', '.join(info.patches)}")
    lines.append(
        f"kv cache         {human_bytes(info.kv_bytes_per_token)} per token ({info.kv_dtype}, batch {info.batch})"
        + (
            f"; {human_bytes(info.kv_bytes_per_token_if_mha)} if every query head had its own kv head"
            if info.kv_heads != info.query_heads
            else ""
        )
    )
    for size in info.kv_cache:
        lines.append(f"  at {human_length(size.context):>6}     {human_bytes(size.bytes)}")
    return "\n".join(lines)
