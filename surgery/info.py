"""`surgery inspect`: what a model is and what its KV cache costs, from the config alone."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from surgery.arch import (
    KV_DTYPE_BYTES,
    head_dim,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_heads,
    latent_dims,
    layer_windows,
    text_config,
)
from surgery.checkpoint import INDEX, check_config, read_json, weight_files
from surgery.errors import SurgeryError, UnsafeInput
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
    attention: str  # MHA, GQA-<groups>, MQA, MLA
    latent: int | None = None  # MLA: kv_lora_rank
    rope_key: int | None = None  # MLA: qk_rope_head_dim of the shared RoPE key
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


class ConfigData:
    """A local config.json read as data, with the normalizations transformers' config classes apply
    to the fields `inspect` reads (legacy RoPE keys, a disabled sliding window, the text part of a
    multimodal config), so a checkpoint is described without importing torch or transformers.
    Tested field by field against transformers' own configs."""

    def __init__(self, data: dict[str, Any], text: ConfigData | None = None) -> None:
        self._data = data
        self._text = text

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_data"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self._data[name] = value

    def get_text_config(self) -> ConfigData:
        return self._text or self

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    @classmethod
    def read(cls, data: dict[str, Any]) -> ConfigData | None:
        """The config as data, or None where reading it needs the config class."""
        nested = data.get("text_config")
        if isinstance(nested, dict):
            text = normalized(nested)
            return cls(with_dtype(data), cls(text)) if text is not None else None
        flat = normalized(data)
        return cls(flat) if flat is not None else None


def with_dtype(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` whose `dtype` is set from the legacy `torch_dtype` when only that is there."""
    out = dict(data)
    if "dtype" not in out and "torch_dtype" in out:
        out["dtype"] = out["torch_dtype"]
    return out


def normalized(data: dict[str, Any]) -> dict[str, Any] | None:
    """`data` with transformers' normalizations, or None where only the config class could say."""
    out = with_dtype(data)
    if not REQUIRED <= out.keys() or not isinstance(out.get("model_type"), str):
        return None  # a default of the config class (Mistral's 8 kv heads, Qwen3's head_dim 128, ...)
    if "head_dim" not in out and out["model_type"] not in HEAD_DIM_DERIVED:
        return None
    if out.get("use_sliding_window") is False:
        out["sliding_window"] = None
    pattern = out.get("sliding_window_pattern")
    if not out.get("layer_types") and isinstance(pattern, int) and pattern > 0 and out.get("sliding_window"):
        # every pattern-th layer attends in full, the others slide (gemma 2 and 3 before layer_types)
        layers = out.get("num_hidden_layers", 0)
        out["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if out.get("sliding_window") and not out.get("layer_types"):
        return None  # which layers slide is the class's rule (Gemma 2 alternates, Qwen2 counts from the top)
    if "rope_parameters" not in out:
        if "rope_theta" not in out or out.keys() & LEGACY_ROPE_EXTRAS:
            return None  # the class's default theta, or a layout only its class knows
        scaling = dict(out.get("rope_scaling") or {})
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        out["rope_parameters"] = {**scaling, "rope_type": kind, "rope_theta": out["rope_theta"]}
    return out


# what inspect reads, where a missing key would be filled by the config class's own default
REQUIRED = {"model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size"}
REQUIRED |= {"max_position_embeddings"}
HEAD_DIM_DERIVED = {"llama", "mistral", "qwen2", "phi3"}  # classes whose head_dim is hidden_size // heads
# legacy keys that transformers folds into rope_parameters in ways particular to one class
LEGACY_ROPE_EXTRAS = {"rope_local_base_freq", "partial_rotary_factor", "rope_parameters_sliding"}


def local_description(directory: Path) -> tuple[ConfigData | None, int | None]:
    """(the config of a local checkpoint as data, or None where only transformers' config class
    can read it; its parameter count from the safetensors headers, or None when it has no
    weights): no tensor is read and nothing heavy is imported."""
    config = check_config(directory)
    try:
        headers = weight_files(directory, required=False)
    except UnsafeInput:  # pickle-only or damaged weights: inspect reads the config only
        headers = {}
    if (directory / INDEX).is_file():  # the shards transformers loads, not stray ones beside them
        headers = {path: h for path, h in headers.items() if path.name in indexed_shards(directory)}
    elif headers:
        headers = {path: h for path, h in headers.items() if path.name == "model.safetensors"}
    count = None
    if headers and "quantization_config" not in config:  # packed or scaled tensors: count the model
        count = sum(
            math.prod(int(d) for d in entry["shape"])
            for header in headers.values()
            for name, entry in header.items()
            if name != "__metadata__"
        )
    return ConfigData.read(config), count or None


def indexed_shards(directory: Path) -> set[str]:
    weight_map = read_json(directory / INDEX).get("weight_map") or {}
    return {str(f) for f in weight_map.values()} if isinstance(weight_map, dict) else set()


def count_parameters(config: Any) -> int:
    """Parameters of the model built on the meta device (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def architecture(config: Any) -> str:
    named = getattr(config, "architectures", None)
    if named:
        return named[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, type(config).__name__)


def default_kv_dtype(config: Any) -> str:
    dtype = getattr(text_config(config), "dtype", None) or getattr(config, "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "bfloat16"
    return name if name in KV_DTYPE_BYTES else "bfloat16"


def inspect(
    config: Any,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    batch: int = 1,
    kv_dtype: str | None = None,
    parameters: int | None = None,
) -> ModelInfo:
    """Describe a config: shape, attention kind, RoPE, parameters and KV-cache size by context.
    `parameters` defaults to the count of the model built from the config on the meta device."""
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
    latent, rope_key = latent_dims(config) or (None, None)
    return ModelInfo(
        architecture=architecture(config),
        model_type=text.model_type,
        layers=text.num_hidden_layers,
        query_heads=query,
        kv_heads=kv,
        head_dim=text.v_head_dim if latent else head_dim(config),
        attention="MLA" if latent else attention_kind(query, kv),
        latent=latent,
        rope_key=rope_key,
        sliding_window=windows[0] if windows else None,
        sliding_layers=len(windows),
        rope=dict(getattr(text, "rope_parameters", None) or {}),
        max_position_embeddings=text.max_position_embeddings,
        parameters=parameters if parameters is not None else count_parameters(config),
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
        f"attention        {info.attention}"
        + (f" (cached per token and layer: latent {info.latent} + RoPE key {info.rope_key})" if info.latent else ""),
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
            if info.kv_heads != info.query_heads or info.latent
            else ""
        )
    )
    for size in info.kv_cache:
        lines.append(f"  at {human_length(size.context):>6}     {human_bytes(size.bytes)}")
    return "\n".join(lines)
