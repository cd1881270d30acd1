"""Static-scale fp8 KV cache, as vLLM runs a checkpoint that carries calibrated `k_scale`/`v_scale`:
the scales are measured once on calibration text (absmax, or a percentile of |k| and |v|, per
tensor or per kv head), every cached state is divided by its scale, saturated to the e4m3 range
and stored in 8 bits. Used by the `kv-quant` patch (method fp8 with `scales`); imported when a cache
is built or calibrated (it needs torch and transformers' cache classes)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer, DynamicCache, Fp8QuantizedLayer

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class StaticFp8Layer(Fp8QuantizedLayer):
    """transformers' fp8 cache layer with fixed scales, saturating instead of overflowing: the scale
    is (1,) per tensor or (kv_heads, 1, 1) per head, the shapes compressed-tensors gives them."""

    def __init__(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        super().__init__()
        self.k_scale, self.v_scale = k_scale.float(), v_scale.float()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        BaseQuantizedLayer.lazy_initialization(self, key_states, value_states)
        self.k_scale, self.v_scale = self.k_scale.to(key_states.device), self.v_scale.to(key_states.device)
        self._quantized_keys = self._quantize(key_states, self.k_scale)
        self._quantized_values = self._quantize(value_states, self.v_scale)

    def _quantize(self, tensor: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        assert scale is not None, "a static layer always has its scale"
        return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@torch.no_grad()
def calibrate(
    model: Any, blocks: list[torch.Tensor], per_head: bool, percentile: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the k and v scales: the absmax (percentile 100) or the given percentile of |state|
    over every cached state of `blocks` (keys after RoPE and any key norm, exactly as the cache
    receives them), divided by the e4m3 maximum. Shapes (1,) or (kv_heads, 1, 1), float32."""
    stats: dict[tuple[int, str], list[torch.Tensor]] = {}
    device = next(model.parameters()).device
    for ids in blocks:
        cache = DynamicCache(config=model.config)
        model(ids.to(device).unsqueeze(0), cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            for name, states in (("k", layer.keys), ("v", layer.values)):
                values = states.float().abs().transpose(0, 1).flatten(1)  # (kv_heads, tokens x head_dim)
                if not per_head:
                    values = values.flatten().unsqueeze(0)
                if percentile >= 100:
                    values = values.amax(1, keepdim=True)
                stats.setdefault((i, name), []).append(values.cpu())
    out: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    for i in range(len(stats) // 2):
        for name in ("k", "v"):
            values = torch.cat(stats[(i, name)], 1)
            if percentile >= 100:
                level = values.amax(1)
            else:
                rank = max(1, round(values.shape[1] * percentile / 100))
                level = values.kthvalue(rank, 1).values
            scale = (level / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            out[name].append(scale.view(-1, 1, 1) if per_head else scale.view(1))
    return out["k"], out["v"]


def scheme(per_head: bool) -> dict[str, Any]:
    """The `kv_cache_scheme` llm-compressor writes for a static fp8 KV cache (compressed-tensors'
    QuantizationArgs), which vLLM reads with the `k_scale`/`v_scale` tensors."""
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "dynamic": False,
        "strategy": "attn_head" if per_head else "tensor",
        "observer": "minmax",
    }


def quantization_config(per_head: bool, ignore: list[str] | None = None) -> dict[str, Any]:
    """A compressed-tensors `quantization_config` that quantizes the KV cache only (weights untouched);
    `ignore`: attention modules left unquantized (sliding-window layers)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "frozen",
        "config_groups": {},
        "ignore": list(ignore or []),
        "kv_cache_scheme": scheme(per_head),
    }
