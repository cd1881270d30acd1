"""Config arithmetic only: the text config of multimodal wrappers, head sizes, per-layer windows,
and KV-cache bytes per token and per context (MHA, GQA and MLA caches). No model is loaded and
nothing is imported from the rest of the package."""

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


def latent_dims(config: Any) -> tuple[int, int] | None:
    """(kv_lora_rank, qk_rope_head_dim) for multi-head latent attention (DeepseekV2/V3), else None:
    such a cache holds one latent and one shared RoPE key per token and layer, not per-head k and v."""
    text = text_config(config)
    rank = getattr(text, "kv_lora_rank", None)
    return (rank, text.qk_rope_head_dim) if rank else None


def kv_values_per_layer(config: Any, kv_heads_override: int | None = None) -> int:
    """Values one token adds to one layer's cache: 2 x kv_heads x head_dim, or latent + RoPE key for
    MLA. `kv_heads_override` prices the per-head cache instead (for MLA: the expanded keys and values)."""
    text = text_config(config)
    latent = latent_dims(config)
    if latent and kv_heads_override is None:
        return sum(latent)
    if latent:
        return kv_heads_override * (text.qk_nope_head_dim + text.qk_rope_head_dim + text.v_head_dim)
    return 2 * (kv_heads_override or kv_heads(config)) * head_dim(config)


def kv_bytes_per_token(config: Any, bytes_per_element: float, kv_heads_override: int | None = None) -> int:
    """Values per layer (2 x kv_heads x head_dim, or MLA's latent + RoPE key) x layers x bytes: the
    uncapped cost of one token."""
    values = kv_values_per_layer(config, kv_heads_override)
    return int(text_config(config).num_hidden_layers * values * bytes_per_element)


def kv_cache_bytes(
    config: Any, tokens: int, bytes_per_element: float, batch: int = 1, kv_heads_override: int | None = None
) -> int:
    """Bytes of a KV cache holding `tokens` tokens per sequence; sliding layers keep their window."""
    per_layer_token = kv_values_per_layer(config, kv_heads_override) * bytes_per_element
    kept = sum(min(tokens, w) if w else tokens for w in layer_windows(config))
    return int(per_layer_token * kept * batch)
