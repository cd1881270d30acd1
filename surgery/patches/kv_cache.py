"""KV-cache quantization: a pure-torch KIVI-style cache (int8/int4/int2, `surgery.patches.kivi`)
and transformers' fp8 one.

KIVI (Liu et al., 2024): keys are quantized per channel (one scale/zero per channel for each group
of `group_size` tokens: keys have outlier channels), values per token (one scale/zero per group of
`group_size` channels); the most recent tokens stay in full precision (`residual`) until a whole
block of them can be quantized. 4-bit and 2-bit codes are packed 2 and 4 to a byte, so the bytes
held really shrink. Quantized blocks are appended, never re-quantized.

`method=int` persists as `runtime`: the checkpoint is untouched (stock transformers runs it with a
normal cache) and `surgery.load_model` re-attaches the cache, which `generate()` and the evaluators
then use without being asked. `method=fp8` persists in `generation_config.json`
(`cache_implementation="quantized"`, backend fp8), which stock `generate()` honours."""

from __future__ import annotations

import types
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from surgery.arch import head_dim, layer_windows, text_config
from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Persist, Snapshot, register


@register
class KVQuant(Patch):
    """Quantize the KV cache (KIVI-style int8/int4/int2 in pure torch, or transformers' fp8): the
    cache generate() and the evaluators build shrinks; weights are untouched."""

    name: ClassVar[str] = "kv-quant"
    architectures: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "phi3")
    examples: ClassVar[list[dict[str, Any]]] = [{"bits": 4, "residual": 16, "group_size": 8}, {"method": "fp8"}]

    bits: Literal[8, 4, 2] = Field(8, description="bits per cached key/value element (int: 8, 4 or 2; fp8: 8)")
    method: Literal["int", "fp8"] = Field(
        "int", description="int: KIVI-style pure-torch cache; fp8: transformers' built-in fp8 cache"
    )
    residual: int | None = Field(
        None, ge=1, description="int: recent tokens kept in full precision, a multiple of group_size (default 128)"
    )
    group_size: int | None = Field(
        None,
        ge=1,
        description="int: elements sharing one scale (tokens per key channel, channels per value; default 64)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> KVQuant:
        if self.method == "fp8":
            if self.bits != 8:
                raise ValueError("method fp8 stores 8 bits; use method int for 4 or 2 bits")
            if self.residual is not None or self.group_size is not None:
                raise ValueError("method fp8 quantizes per tensor: residual and group_size apply to method int only")
        elif self.residual_tokens % self.group:
            raise ValueError(f"residual ({self.residual_tokens}) must be a multiple of group_size ({self.group})")
        return self

    @property
    def group(self) -> int:
        return self.group_size or 64

    @property
    def residual_tokens(self) -> int:
        return self.residual or 128

    def short(self) -> str:
        return f"{self.name} {'fp8' if self.method == 'fp8' else f'int{self.bits}'}"

    def persistence(self, model: torch.nn.Module) -> Persist:
        return "config" if self.method == "fp8" else "runtime"

    def check(self, model: torch.nn.Module) -> None:
        config = text_config(model.config)
        if any(layer_windows(config)):
            raise UnsupportedModel(
                f"{self.name}: this model has sliding-window layers, whose cache drops old tokens; quantized caches "
                "(transformers' included) keep every token, so they cannot run it. Quantize a full-attention model"
            )
        if self.method == "int":
            dim = head_dim(config)
            if dim % self.group or dim % (8 // self.bits):
                raise UnsupportedModel(
                    f"{self.name}: group_size {self.group} must divide the head dimension {dim}; try 32 or {dim}"
                )

    def make_cache(self, model: torch.nn.Module):
        """A fresh quantized cache for `model`."""
        from transformers import QuantizedCache
        from transformers.cache_utils import Cache

        if self.method == "fp8":
            return QuantizedCache(backend="fp8", config=model.config)
        n = text_config(model.config).num_hidden_layers
        from surgery.patches.kivi import KIVILayer

        return Cache(layers=[KIVILayer(self.bits, self.group, self.residual_tokens) for _ in range(n)])

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        gen = model.generation_config
        if self.method == "fp8":
            gen.cache_implementation, gen.cache_config = "quantized", {"backend": "fp8"}
            model.surgery_kv_cache = self
            return ["generation_config: quantized cache, fp8 backend (stock generate() uses it)"]
        if gen.cache_implementation == "quantized":  # an earlier fp8 kv-quant: this one replaces it
            gen.cache_implementation, gen.cache_config = None, None
        model.surgery_kv_cache = self
        attach_generate_cache(model)
        return [
            f"KIVI cache: {self.bits}-bit keys per channel and values per token, groups of {self.group}, "
            f"last {self.residual_tokens} tokens exact (re-attached by surgery.load_model)"
        ]

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        cache = self.make_cache(model)
        layer = cache.layers[0]
        from surgery.patches.kivi import KIVILayer

        ok = isinstance(layer, KIVILayer) if self.method == "int" else type(layer).__name__ == "Fp8QuantizedLayer"
        if not ok or getattr(model, "surgery_kv_cache", None) is not self:
            raise PatchDidNotTakeEffect(f"{self.name}: the model would not build the quantized cache")

    def details(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group, "residual": self.residual_tokens}


def attach_generate_cache(model: torch.nn.Module) -> None:
    """Make `model.generate()` build the model's quantized cache when the caller passes no cache
    and no cache_implementation (an instance-level wrapper; nothing is saved)."""
    if getattr(model, "_surgery_generate_cache", False):
        return
    original = model._prepare_cache_for_generation

    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        spec = getattr(self, "surgery_kv_cache", None)
        if (
            spec is not None
            and model_kwargs.get("cache") is None
            and generation_config.cache_implementation is None
            and generation_config.use_cache is not False
        ):
            model_kwargs["cache"] = spec.make_cache(self)
        return original(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(prepare, model)
    model._surgery_generate_cache = True
