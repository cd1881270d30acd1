"""RoPE configuration arithmetic: which rope slots a model has (one global dict, or one per
layer type as in Gemma3), where each started (pretraining theta and length, from the surgery
history or the config), the buffers transformers' own functions expect, and Phi3's longrope
encoding of static scalings. Plain functions of configs and modules; the patches are in rope.py."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from surgery.lazy import torch
from surgery.patch import history

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
RESCALABLE = {"default", "linear", "dynamic", "yarn", "llama3"}  # rope types we can start from
ROPE_PATCHES = {"yarn", "linear", "dynamic-ntk", "ntk", "llama3"}  # rope.py checks it names its classes
GLOBAL = "global"  # slot name when one rope_parameters dict serves every layer
LONGROPE_ONLY = {"phi3"}  # configs that accept only default/longrope RoPE (Phi3 rewrites "yarn" at load)


@dataclass(frozen=True)
class Origin:
    """Pretraining RoPE of one slot, and the scaling factor it shipped with."""

    rope_theta: float
    max_len: int
    factor: float


def rope_slots(config: Any, apply_to: str) -> list[str]:
    """Which rope_parameters dicts to rescale: GLOBAL, or layer types for nested configs."""
    params = config.rope_parameters
    if params and "rope_type" not in params and all(isinstance(v, dict) or v is None for v in params.values()):
        return [t for t, v in params.items() if v is not None and (apply_to == "all" or t == apply_to)]
    return [GLOBAL]


def slot_params(config: Any, slot: str) -> dict[str, Any]:
    return dict(config.rope_parameters if slot == GLOBAL else config.rope_parameters[slot])


def rope_records(config: Any) -> list[dict[str, Any]]:
    return [r for r in history(config) if r["name"] in ROPE_PATCHES]


def origin(config: Any, slot: str) -> Origin:
    """The RoPE the model was pretrained with, so re-scaling never compounds on a scaled length."""
    records = rope_records(config)
    if records and slot in records[0]["details"]["origin"]:
        return Origin(**records[0]["details"]["origin"][slot])
    params = slot_params(config, slot)
    kind = params["rope_type"]
    factor = float(params.get("factor") or 1.0) if kind != "default" else 1.0
    max_pos = config.max_position_embeddings
    pinned = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if kind in ("default", "dynamic"):
        max_len = max_pos  # dynamic keeps max_position_embeddings at the original length
    elif kind == "linear":
        max_len = pinned or round(max_pos / factor)
    else:
        max_len = pinned or max_pos
    return Origin(rope_theta=float(params["rope_theta"]), max_len=int(max_len), factor=factor)


def current_factor(config: Any, slot: str) -> float:
    records = rope_records(config)
    if records and slot in records[-1]["details"]["total_factor"]:
        return float(records[-1]["details"]["total_factor"][slot])
    return origin(config, slot).factor


def rotary_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]


def rebuild_rotary(model: torch.nn.Module) -> None:
    """Replace each rotary module by one built from the (patched) config, on the same device."""
    for name, module in rotary_modules(model):
        device = next(iter(module.buffers())).device
        fresh = type(module)(config=module.config).to(device)  # device only: inv_freq stays fp32
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)


def expected_buffers(module: torch.nn.Module, slot: str) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling as transformers computes them from the module's config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    layer_type = None if slot == GLOBAL else slot
    kind = slot_params(module.config, slot)["rope_type"]
    fn = module.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    kwargs = {"layer_type": layer_type} if layer_type else {}
    return fn(module.config, **kwargs)


def as_longrope(config: Any, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
    """Express a static scaling exactly as `longrope` with equal short and long per-frequency
    factors, for configs that accept nothing else (Phi3). Same inv_freq, same attention scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    probe = copy.deepcopy(config)
    probe.rope_parameters = dict(params)
    inv_freq, attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](probe)
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base = params["rope_theta"] ** shape  # what longrope divides by, computed as it does
    factors = (1.0 / (inv_freq.double() * base.double())).tolist()
    out = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor", "factor")}
    return {
        **out,
        "rope_type": "longrope",
        "short_factor": factors,
        "long_factor": factors,
        "original_max_position_embeddings": params.get(
            "original_max_position_embeddings", config.original_max_position_embeddings
        ),
        "attention_factor": float(attention),
    }


def buffer_name(slot: str) -> str:
    return "inv_freq" if slot == GLOBAL else f"{slot}_inv_freq"
