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
(`cache_implementation="quantized"`, backend fp8), which stock `generate()` honours.

`method=fp8` with `scales` calibrates static scales on calibration text instead (`fp8_static`):
per tensor or per kv head, from the absmax or a percentile of |k| and |v|. They are saved as vLLM
reads them from llm-compressor's checkpoints: `self_attn.k_scale`/`v_scale` tensors beside the
untouched weights, and a compressed-tensors `quantization_config` whose only entry is the
`kv_cache_scheme`. Locally the same scales drive a saturating fp8 cache, so perplexity and
divergence measure what vLLM would serve; `surgery.load_model` re-attaches it from the files."""

from __future__ import annotations

import types
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from surgery.arch import head_dim, layer_windows, text_config
from surgery.data import TextSource
from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Persist, Snapshot, register


@register
class KVQuant(Patch):
    """Quantize the KV cache (KIVI-style int8/int4/int2 in pure torch, or transformers' fp8): the
    cache generate() and the evaluators build shrinks; weights are untouched."""

    name: ClassVar[str] = "kv-quant"
    architectures: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "phi3")
    examples: ClassVar[list[dict[str, Any]]] = [
        {"bits": 4, "residual": 16, "group_size": 8},
        {"method": "fp8"},
        {"method": "fp8", "scales": "head", "calibration_tokens": 64},
    ]

    bits: Literal[8, 4, 2] = Field(8, description="bits per cached key/value element (int: 8, 4 or 2; fp8: 8)")
    method: Literal["int", "fp8"] = Field(
        "int", description="int: KIVI-style pure-torch cache; fp8: transformers' built-in fp8 cache"
    )
    residual: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="int: recent tokens kept in full precision, a multiple of group_size (default 128)",
    )
    group_size: int | None = Field(
        None,
        ge=1,
        le=1 << 16,
        description="int: elements sharing one scale (tokens per key channel, channels per value; default 64)",
    )

    scales: Literal["tensor", "head"] | None = Field(
        None,
        description="fp8: calibrate static scales per tensor or per kv head (saved as vLLM reads them); "
        "default none: transformers' dynamic fp8 cache",
    )
    percentile: float = Field(
        100.0,
        gt=50,
        le=100,
        description="fp8 scales: the percentile of |k| and |v| mapped to fp8's maximum (100: absmax)",
    )
    skip_sliding: bool = Field(
        False,
        description="fp8 scales: leave sliding-window layers in full precision (listed in the scheme's ignore; "
        "serve with vLLM's --kv-cache-dtype-skip-layers sliding_window); without it such models are refused",
    )
    calibration_tokens: int = Field(8192, ge=16, le=1 << 22, description="fp8 scales: tokens of calibration text")
    calibration_text: TextSource = Field(
        "pydoc", description="fp8 scales: calibration source (train split): pydoc, docs, a file, or hf:NAME"
    )

    @model_validator(mode="after")
    def _consistent(self) -> KVQuant:
        fields = type(self).model_fields
        calibrated = [
            k
            for k in ("calibration_text", "calibration_tokens", "percentile", "skip_sliding")
            if getattr(self, k) != fields[k].default
        ]
        if self.scales is None and calibrated:
            raise ValueError(
                f"{', '.join(sorted(calibrated))} apply to calibrated fp8 scales only: add scales=tensor|head"
            )
        if self.scales is not None and self.method != "fp8":
            raise ValueError("scales are fp8's: add method=fp8")
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
        if self.scales:
            return f"{self.name} fp8 ({self.scales} scales)"
        return f"{self.name} {'fp8' if self.method == 'fp8' else f'int{self.bits}'}"

    def calibration_sources(self) -> list[str]:
        return [self.calibration_text] if self.scales else []

    def persistence(self, model: torch.nn.Module) -> Persist:
        return "config" if self.method == "fp8" else "runtime"

    def check(self, model: torch.nn.Module) -> None:
        config = text_config(model.config)
        windows = layer_windows(config)
        if any(windows) and not self.skip_sliding:
            raise UnsupportedModel(
                f"{self.name}: this model has sliding-window layers, whose cache drops old tokens; quantized caches "
                "(transformers' included) keep every token, so they cannot run it. Quantize a full-attention model, "
                "or leave those layers in full precision: method=fp8 with scales and skip_sliding=true"
            )
        if all(windows):
            raise UnsupportedModel(
                f"{self.name}: every layer of this model is sliding-window, so skip_sliding leaves nothing to quantize"
            )
        if kv_only(getattr(model.config, "quantization_config", None)) and getattr(model, "hf_quantizer", None):
            raise UnsupportedModel(
                f"{self.name}: this checkpoint already carries calibrated fp8 KV scales (compressed-tensors), "
                "which a second kv-quant cannot replace on disk; apply kv-quant to the model they were calibrated on"
            )
        existing = getattr(model.config, "quantization_config", None)
        if self.scales and existing is not None and not kv_only(existing):
            raise UnsupportedModel(
                f"{self.name}: the model already has a quantization_config ({quant_method(existing)}); "
                "calibrated fp8 scales would replace it: quantize the KV cache of an unquantized model"
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

        if self.scales:
            from transformers.cache_utils import DynamicSlidingWindowLayer

            from surgery.patches.fp8_static import StaticFp8Layer

            return Cache(
                layers=[
                    DynamicSlidingWindowLayer(sliding_window=window) if window else StaticFp8Layer(a.k_scale, a.v_scale)
                    for _, a, window in windowed_attention(model)
                ]
            )
        if self.method == "fp8":
            return QuantizedCache(backend="fp8", config=model.config)
        n = text_config(model.config).num_hidden_layers
        from surgery.patches.kivi import KIVILayer

        return Cache(layers=[KIVILayer(self.bits, self.group, self.residual_tokens) for _ in range(n)])

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        if self.scales:
            return self._calibrate(model, ctx)
        gen = model.generation_config
        if gen.cache_implementation == "quantized":  # an earlier fp8 kv-quant: this one replaces it
            gen.cache_implementation, gen.cache_config = None, None
        if kv_only(getattr(model.config, "quantization_config", None)):  # an earlier calibrated kv-quant
            del model.config.quantization_config
            for attention in attention_modules(model):
                for name in ("k_scale", "v_scale"):
                    if name in attention._buffers:
                        del attention._buffers[name]
        if self.method == "fp8":
            gen.cache_implementation, gen.cache_config = "quantized", {"backend": "fp8"}
            model.surgery_kv_cache = self
            return ["generation_config: quantized cache, fp8 backend (stock generate() uses it)"]
        model.surgery_kv_cache = self
        attach_generate_cache(model)
        return [
            f"KIVI cache: {self.bits}-bit keys per channel and values per token, groups of {self.group}, "
            f"last {self.residual_tokens} tokens exact (re-attached by surgery.load_model)"
        ]

    def _calibrate(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        from surgery.patches.fp8_static import calibrate, quantization_config
        from surgery.patches.gqa_fit import calibration_ids

        if ctx.tokenizer is None:
            raise UnsupportedModel(f"{self.name}: calibrating fp8 scales needs the model's tokenizer")
        ids = calibration_ids(model, ctx.tokenizer, self.calibration_text, self.calibration_tokens)
        gen = model.generation_config
        if gen.cache_implementation == "quantized":  # an earlier fp8 kv-quant: this one replaces it
            gen.cache_implementation, gen.cache_config = None, None
        k_scales, v_scales = calibrate(model, list(ids), self.scales == "head", self.percentile)
        layers = windowed_attention(model)
        skipped = []
        for (name, attention, window), k, v in zip(layers, k_scales, v_scales, strict=True):
            if window:  # a sliding layer stays in full precision: no scales (vLLM would read them)
                skipped.append(name)
            else:
                attach_scales(attention, k, v)
        model.config.quantization_config = quantization_config(self.scales == "head", ignore=skipped)
        model.surgery_kv_cache = self
        attach_generate_cache(model)
        ctx.state["tokens"] = ids.numel()
        notes = [
            f"fp8 KV cache with static {self.scales} scales from the {self.percentile:g}th percentile of |k|, |v| on "
            f"{ids.numel()} tokens of {self.calibration_text}; saved as compressed-tensors' kv_cache_scheme "
            "with self_attn.k_scale/v_scale (vLLM reads them)"
        ]
        if skipped:
            notes.append(
                f"{len(skipped)} of {len(layers)} sliding-window layers left in full precision (the scheme's ignore "
                "list); serve with vLLM's --kv-cache-dtype-skip-layers sliding_window"
            )
        return notes

    def check_scales(self, model: torch.nn.Module, where: str) -> None:
        """Every k/v scale is a positive finite number per tensor or per kv head, as `scales` says."""
        expected = (text_config(model.config).num_key_value_heads, 1, 1) if self.scales == "head" else (1,)
        for name, attention, window in windowed_attention(model):
            for kind in ("k_scale", "v_scale"):
                scale = getattr(attention, kind, None)
                if window:
                    if scale is not None:
                        raise PatchDidNotTakeEffect(f"{self.name}: the sliding-window {name} has a {kind}")
                    continue
                if scale is None or tuple(scale.shape) != expected:
                    shape = None if scale is None else list(scale.shape)
                    raise PatchDidNotTakeEffect(
                        f"{self.name}: the {where} {name}.{kind} is shaped {shape}, not {list(expected)} "
                        f"({self.scales} scales)"
                    )
                if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
                    raise PatchDidNotTakeEffect(f"{self.name}: the {where} {name}.{kind} is not a positive number")

    def restore(self, model: torch.nn.Module, directory: Any) -> None:
        """Re-attach the calibrated cache to a loaded checkpoint: its scales from the weight files."""
        if not self.scales or directory is None:
            return
        from safetensors import safe_open

        from surgery.checkpoint import weight_files

        found = {}
        for shard, header in weight_files(directory).items():
            wanted = [n for n in header if n.endswith(("self_attn.k_scale", "self_attn.v_scale"))]
            if wanted:
                with safe_open(shard, framework="pt") as f:
                    found |= {n: f.get_tensor(n) for n in wanted}
        for name, attention, window in windowed_attention(model):
            if window:
                continue
            k, v = found.get(f"{name}.k_scale"), found.get(f"{name}.v_scale")
            if k is None or v is None:
                raise PatchDidNotTakeEffect(
                    f"{directory} lacks {name}.k_scale/v_scale, which its kv-quant record needs"
                )
            attach_scales(attention, k, v)
        self.check_scales(model, f"saved (in {directory})")
        model.surgery_kv_cache = self
        attach_generate_cache(model)

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        cache = self.make_cache(model)
        windows = layer_windows(model.config)
        layer = cache.layers[windows.index(None)]  # a quantized layer (sliding ones may be skipped)
        from surgery.patches.kivi import KIVILayer

        if self.scales:
            self.check_scales(model, "calibrated")
        kind = {"int": "KIVILayer", "fp8": "StaticFp8Layer" if self.scales else "Fp8QuantizedLayer"}[self.method]
        ok = isinstance(layer, KIVILayer) if self.method == "int" else type(layer).__name__ == kind
        if not ok or getattr(model, "surgery_kv_cache", None) is not self:
            raise PatchDidNotTakeEffect(f"{self.name}: the model would not build the quantized cache")

    def details(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> dict[str, Any]:
        if self.scales:
            quantized = [a for _, a, window in windowed_attention(model) if not window]
            k = torch.cat([a.k_scale.flatten() for a in quantized])
            v = torch.cat([a.v_scale.flatten() for a in quantized])
            return {
                "calibration_tokens": ctx.state["tokens"],
                "quantized_layers": len(quantized),
                "k_scale": [float(k.min()), float(k.max())],
                "v_scale": [float(v.min()), float(v.max())],
            }
        return {"bits": self.bits, "group_size": self.group, "residual": self.residual_tokens}


def quant_method(config: Any) -> str | None:
    return config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)


def kv_only(config: Any) -> bool:
    """A compressed-tensors quantization_config (as written, or as transformers loads it) that
    quantizes the KV cache and nothing else."""
    if config is not None and not isinstance(config, dict) and hasattr(config, "to_dict"):
        config = config.to_dict()
    return (
        isinstance(config, dict)
        and str(quant_method(config)).lower().replace("_", "-") == "compressed-tensors"
        and not config.get("config_groups")
        and config.get("kv_cache_scheme") is not None
    )


def attention_names(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(checkpoint name, module) of every decoder layer's attention, in layer order."""
    return [(n, m) for n, m in model.named_modules() if n.endswith("self_attn")]


def windowed_attention(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int | None]]:
    """(checkpoint name, module, sliding window or None) of every decoder layer's attention."""
    return [(n, m, w) for (n, m), w in zip(attention_names(model), layer_windows(model.config), strict=True)]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for _, m in attention_names(model)]


def attach_scales(attention: torch.nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
    """k_scale/v_scale as persistent buffers of the attention module: `save_pretrained` writes them
    where vLLM looks (`model.layers.N.self_attn.k_scale`), in the weights' dtype as llm-compressor does."""
    weight = next(attention.parameters())
    attention.register_buffer("k_scale", k.to(dtype=weight.dtype, device=weight.device), persistent=True)
    attention.register_buffer("v_scale", v.to(dtype=weight.dtype, device=weight.device), persistent=True)


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
