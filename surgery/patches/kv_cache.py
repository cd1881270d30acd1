"""KV-cache quantization: a pure-torch KIVI-style cache (int8/int4/int2) and transformers' fp8 one.

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

import torch
from pydantic import Field, model_validator

from surgery.arch import head_dim, layer_windows, text_config
from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.patch import Context, Patch, Persist, Snapshot, register

SCALE_DTYPE = torch.float16


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) uint8 codes < 2**bits -> (..., D * bits / 8) bytes, lowest bits first."""
    if bits == 8:
        return codes
    per = 8 // bits
    grouped = codes.view(*codes.shape[:-1], -1, per)
    out = grouped[..., 0].clone()
    for i in range(1, per):
        out |= grouped[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., D * bits / 8) bytes -> (..., D) uint8 codes."""
    if bits == 8:
        return packed
    mask = 2**bits - 1
    parts = [packed & mask] + [(packed >> shift) & mask for shift in range(bits, 8, bits)]
    return torch.stack(parts, -1).flatten(-2)


def quantize(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> tuple[torch.Tensor, ...]:
    """Asymmetric min-max quantization of (B, H, T, D) states. per_channel (keys): groups of `group`
    tokens share a scale per channel, T % group == 0; else (values): groups of `group` channels of
    one token. Returns (packed codes, scale, zero) with scale/zero in float16."""
    b, h, t, d = x.shape
    grouped = x.float().view(b, h, t // group, group, d) if per_channel else x.float().view(b, h, t, d // group, group)
    axis = 3 if per_channel else 4
    lo = grouped.amin(axis, keepdim=True).to(SCALE_DTYPE)
    hi = grouped.amax(axis, keepdim=True).to(SCALE_DTYPE)
    scale = ((hi.float() - lo.float()) / (2**bits - 1)).clamp(min=1e-4).to(SCALE_DTYPE)
    codes = ((grouped - lo.float()) / scale.float()).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return pack(codes.view(b, h, t, d), bits), scale.squeeze(axis), lo.squeeze(axis)


def dequantize(
    q: tuple[torch.Tensor, ...],
    bits: int,
    group: int,
    per_channel: bool,
    dtype: torch.dtype,
    tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, T, D) states from `quantize`'s output, with `tail` (full-precision states) appended.
    Codes are unpacked straight into one preallocated float tensor (no uint8 intermediate, no
    concatenation copy), then scaled in place; broadcasting a uint8 operand is several times
    slower on CPU, so scale and zero meet float data only."""
    codes, scale, zero = q
    b, h, t, packed_d = codes.shape
    d = packed_d * 8 // bits
    extra = 0 if tail is None else tail.shape[-2]
    out = torch.empty(b, h, t + extra, d, dtype=dtype, device=codes.device)
    if per_channel:  # scale: (B, H, T / group, D)
        shape, axis = (b, h, t // group, group, d), 3
    else:  # scale: (B, H, T, D / group)
        shape, axis = (b, h, t, d // group, group), 4
    history = out[:, :, :t]
    if bits == 8:
        history.copy_(codes)
    else:  # unpack straight into the float output: slot i of each byte holds bits [bits*i, bits*(i+1))
        per, mask = 8 // bits, 2**bits - 1
        slots = history.view(b, h, t, packed_d, per)
        slots[..., 0].copy_(codes & mask)
        for i in range(1, per):
            slots[..., i].copy_((codes >> (bits * i)) & mask)
    history.view(shape).mul_(scale.to(dtype).unsqueeze(axis)).add_(zero.to(dtype).unsqueeze(axis))
    if extra:
        out[:, :, t:] = tail
    return out


def cat_quantized(old: tuple[torch.Tensor, ...] | None, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return new if old is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(old, new, strict=True))


def _layer_base():
    from transformers.cache_utils import BaseQuantizedLayer

    return BaseQuantizedLayer


class KIVILayer(_layer_base()):
    """One layer of the KIVI cache. `keys`/`values` hold the full-precision residual (< `residual`
    tokens once flushed); `_quantized_keys`/`_quantized_values` the packed history."""

    def __init__(self, bits: int, group_size: int, residual: int):
        super().__init__()
        self.bits, self.group, self.residual = bits, group_size, residual

    def _quantize(self, tensor: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, ...]:
        return quantize(tensor, self.bits, self.group, per_channel)

    def _dequantize(self, q: tuple[torch.Tensor, ...], per_channel: bool, tail: torch.Tensor) -> torch.Tensor:
        return dequantize(q, self.bits, self.group, per_channel, tail.dtype, tail)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.keys, self.values
        if self._quantized_keys is not None:
            keys = self._dequantize(self._quantized_keys, True, keys)
            values = self._dequantize(self._quantized_values, False, values)
        n = self.keys.shape[-2]
        if n >= self.residual:  # flush whole blocks of `residual` tokens; the rest stays exact
            m = n - n % self.residual
            qk = self._quantize(self.keys[..., :m, :], per_channel=True)
            qv = self._quantize(self.values[..., :m, :], per_channel=False)
            self._quantized_keys = cat_quantized(self._quantized_keys, qk)
            self._quantized_values = cat_quantized(self._quantized_values, qv)
            self.keys, self.values = self.keys[..., m:, :].clone(), self.values[..., m:, :].clone()
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the packed history and the residual along the batch (exact)."""
        if not self.is_initialized:
            return
        beam_idx = beam_idx.to(self.device)
        self.keys, self.values = self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx)
        for attr in ("_quantized_keys", "_quantized_values"):
            if getattr(self, attr) is not None:
                setattr(self, attr, tuple(t.index_select(0, beam_idx) for t in getattr(self, attr)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys.repeat_interleave(repeats, 0), self.values.repeat_interleave(repeats, 0)
        for attr in ("_quantized_keys", "_quantized_values"):
            if getattr(self, attr) is not None:
                setattr(self, attr, tuple(t.repeat_interleave(repeats, 0) for t in getattr(self, attr)))

    def get_seq_length(self) -> int:
        return self.cumulative_length


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
