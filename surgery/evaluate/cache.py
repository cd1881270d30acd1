"""The KV cache evaluators use, and its real size.

Evaluators build the cache generation would use (a kv-quant patch's cache, the generation
config's quantized cache, else a dynamic one), so a KV-cache patch is exercised by perplexity,
needle and speed alike. Sizes are measured from the cache object, not assumed."""

from __future__ import annotations

from typing import Any

from surgery.lazy import torch


def make_cache(model: torch.nn.Module):
    """The KV cache generation would use: a kv-quant patch's cache, the generation config's
    quantized cache, else a dynamic one."""
    from transformers import DynamicCache, QuantizedCache

    spec = getattr(model, "surgery_kv_cache", None)  # set by the kv-quant patch: anything with make_cache
    if spec is not None:
        return spec.make_cache(model)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "cache_implementation", None) == "quantized":
        return QuantizedCache(config=model.config, **dict(gen.cache_config or {}))
    return DynamicCache(config=model.config)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from `obj` through attributes, lists, dicts."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 and not obj.is_floating_point():  # bookkeeping (window, counters), not KV
            return 0
        if hasattr(obj, "__tensor_flatten__"):  # wrapper subclasses (optimum-quanto): count the inner tensors
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        key = obj.untyped_storage().data_ptr() if obj.device.type != "meta" else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if k != "config")
    return 0


def cache_bytes(cache: Any) -> int:
    """Measured KV bytes of a transformers Cache: every tensor its layers hold, scales included."""
    return sum(tensor_bytes(layer) for layer in cache.layers)
