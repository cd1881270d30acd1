"""The KIVI cache layer (Liu et al., 2024) that the `kv-quant` patch (method int) attaches: keys
quantized per channel, values per token, in groups of `group_size`; the most recent tokens stay in
full precision until a whole block of `residual` can be quantized; 4-bit and 2-bit codes packed 2
and 4 to a byte. Imported when a cache is built, not when the patch is registered (it needs torch
and transformers' cache classes)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer

SCALE = torch.float16  # scales and minimums are stored in it


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
    lo = grouped.amin(axis, keepdim=True).to(SCALE)
    hi = grouped.amax(axis, keepdim=True).to(SCALE)
    scale = ((hi.float() - lo.float()) / (2**bits - 1)).clamp(min=1e-4).to(SCALE)
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


class KIVILayer(BaseQuantizedLayer):
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
