"""Config arithmetic only: the text config of multimodal wrappers, head sizes, per-layer windows,
and KV-cache bytes per token and per context. No model is loaded and nothing is imported from the
rest of the package."""

from __future__ import annotations

from typing import Any

KV_DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
    "int2": 0.25,
}


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config: Any) -> int:
    config = text_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config: Any) -> int:
    config = text_config(config)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def layer_windows(config: Any) -> list[int | None]:
    """Per layer: the sliding window in tokens, or None for full attention."""
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" and window else None for t in types]
    return [window or None] * config.num_hidden_layers


def kv_bytes_per_token(config: Any, bytes_per_element: float, kv_heads_override: int | None = None) -> int:
    """2 (k and v) x layers x kv_heads x head_dim x bytes: the uncapped cost of one token."""
    n_kv = kv_heads_override or kv_heads(config)
    return int(2 * text_config(config).num_hidden_layers * n_kv * head_dim(config) * bytes_per_element)


def kv_cache_bytes(
    config: Any, tokens: int, bytes_per_element: float, batch: int = 1, kv_heads_override: int | None = None
) -> int:
    """Bytes of a KV cache holding `tokens` tokens per sequence; sliding layers keep their window."""
    n_kv = kv_heads_override or kv_heads(config)
    per_layer_token = 2 * n_kv * head_dim(config) * bytes_per_element
    kept = sum(min(tokens, w) if w else tokens for w in layer_windows(config))
    return int(per_layer_token * kept * batch)
