"""MHA -> GQA / MQA by pooling key/value heads (Ainslie et al. 2023).

Each run of `g = kv_heads / num_kv_heads` consecutive kv heads becomes one head: query head i
used kv head i // (H/kv); after pooling it uses i // (H/G), which is exactly the pooled group, so
queries and the output projection are kept. `mean` averages the heads' projections; `aligned`
first rotates every head onto the group's first head using a calibration sample (values by an
orthogonal Procrustes map absorbed into o_proj; keys by per-frequency-plane rotations that commute
with RoPE, absorbed into the query heads), then averages the keys and pools the values by least
squares on what o_proj makes of them (see gqa_align.py): the merged head loses less. `fitted`
then trains each pooled attention module, bottom-up, to reproduce the original's outputs on
calibration text (see gqa_fit.py).

The same per-tensor function pools in memory and when streaming a checkpoint from disk, so the
two paths are bit-identical."""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from surgery.arch import head_dim, kv_heads, text_config
from surgery.errors import PatchDidNotTakeEffect, SurgeryError, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Snapshot, method_fields, register
from surgery.patches.gqa_fit import SEQ_LEN, CalibrationText, FitLr, FitSeqLen, FitSteps, FitTokens

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
KV_TENSOR = re.compile(r"(^|\.)self_attn\.(k_proj|v_proj|qkv_proj)\.(weight|bias)$")


def pool_heads(tensor: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """Average each run of `group` heads of size `dim` along dim 0: (n*dim, ...) -> (n/group*dim, ...).
    Accumulates in float32 and returns the input dtype."""
    n = tensor.shape[0] // dim
    grouped = tensor.reshape(n // group, group, dim, *tensor.shape[1:])
    return grouped.float().mean(1).to(tensor.dtype).reshape(n // group * dim, *tensor.shape[1:])


def pool_tensor(name: str, tensor: torch.Tensor, n_q: int, n_kv: int, dim: int, target: int) -> torch.Tensor:
    """Pool one attention tensor of a checkpoint (`...self_attn.k_proj.weight`, fused `qkv_proj`);
    any other tensor is returned unchanged."""
    m = KV_TENSOR.search(name)
    if not m or target == n_kv:
        return tensor
    group = n_kv // target
    if m.group(2) != "qkv_proj":
        return pool_heads(tensor, group, dim)
    q, k, v = tensor.split([n_q * dim, n_kv * dim, n_kv * dim], dim=0)  # Phi3: fused q|k|v rows
    return torch.cat([q, pool_heads(k, group, dim), pool_heads(v, group, dim)], dim=0)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if n.endswith("self_attn") and (hasattr(m, "k_proj") or hasattr(m, "qkv_proj")) and hasattr(m, "o_proj")
    ]


def rebuild(model: torch.nn.Module, name: str, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replace an attention module by one of the same class built from the (updated) config, with
    `state` loaded strictly: every cached head count is then right by construction."""
    with torch.device("meta"):
        fresh = type(module)(module.config, layer_idx=module.layer_idx)
    fresh.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers are not in a state dict: none may stay on meta unless they were
    leftovers = [
        n for n, b in fresh.named_buffers() if b.is_meta and n not in state and not module.get_buffer(n).is_meta
    ]
    assert not leftovers, f"{name}: buffers {leftovers} were not rebuilt"
    fresh.train(module.training)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, fresh)


@register
class GQA(Patch):
    """Pool key/value heads: MHA -> GQA (or fewer kv heads), shrinking the KV cache by the pooling factor."""

    name: ClassVar[str] = "gqa"
    persist: ClassVar[str] = "config"
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES
    examples: ClassVar[list[dict[str, Any]]] = [
        {"num_kv_heads": 1},
        {"num_kv_heads": 1, "method": "aligned", "calibration_tokens": 64},
        {"num_kv_heads": 1, "method": "fitted", "calibration_tokens": 64, "fit_tokens": 64, "fit_steps": 3},
    ]

    num_kv_heads: int = Field(
        ge=1, le=1 << 12, description="key/value heads after pooling; must divide the current count"
    )
    method: Literal["mean", "aligned", "fitted"] = Field(
        "mean",
        description="mean: average the heads; aligned: rotate heads onto each other on calibration text first; "
        "fitted: aligned, then each layer's attention trained to reproduce the original's outputs",
    )
    calibration_tokens: int = Field(2048, ge=16, le=1 << 22, description="tokens of calibration text for the alignment")
    calibration_text: CalibrationText = "pydoc"
    fit_tokens: FitTokens = 8192
    fit_steps: FitSteps = 50
    fit_lr: FitLr = 1e-3
    fit_seq_len: FitSeqLen = SEQ_LEN

    streamable: ClassVar[bool] = True

    @model_validator(mode="after")
    def _method_fields(self) -> GQA:
        method_fields(self, {"mean": (), "aligned": ("calibration",), "fitted": ("calibration", "fit")})
        return self

    def check(self, model: torch.nn.Module) -> None:
        config = text_config(model.config)
        n_kv = kv_heads(config)
        if n_kv % self.num_kv_heads:
            possible = [d for d in range(1, n_kv + 1) if n_kv % d == 0]
            raise UnsupportedModel(
                f"{self.name}: {self.num_kv_heads} kv heads cannot pool the model's {n_kv}; "
                f"possible: {', '.join(map(str, possible))}"
            )
        if not attention_modules(model):
            raise UnsupportedModel(f"{self.name}: found no self_attn modules with k/v projections")

    def calibration_sources(self) -> list[str]:
        return [] if self.method == "mean" else [self.calibration_text]

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        config = text_config(model.config)
        n_q, n_kv, dim = config.num_attention_heads, kv_heads(config), head_dim(config)
        if self.num_kv_heads == n_kv:
            return [f"{n_kv} kv heads already: unchanged"]
        modules = attention_modules(model)
        if self.method != "mean":
            from surgery.patches.gqa_align import align_heads

            tokenizer = self.tokenizer_for(model, ctx)
            pooled = align_heads(model, modules, self, tokenizer)
        else:
            pooled = {
                name: {
                    k: pool_tensor(f"{name}.{k}", t, n_q, n_kv, dim, self.num_kv_heads)
                    for k, t in m.state_dict().items()
                }
                for name, m in modules
            }
        config.num_key_value_heads = self.num_kv_heads
        for name, module in modules:
            rebuild(model, name, module, pooled[name])
        factor = n_kv // self.num_kv_heads
        notes = [f"{n_kv} -> {self.num_kv_heads} kv heads ({self.method} pooling of {factor}); KV cache / {factor}"]
        if self.method == "fitted" and self.fit_steps:
            from surgery.patches.gqa_fit import fit_attention

            teachers = dict(modules)  # the original modules, no longer in the model
            notes += fit_attention(model, attention_modules(model), teachers, self, tokenizer)
        return notes

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        config = text_config(model.config)
        dim, n_q = head_dim(config), config.num_attention_heads
        for name, module in attention_modules(model):
            if hasattr(module, "k_proj"):
                width = module.k_proj.out_features
            else:  # fused q|k|v
                width = (module.qkv_proj.out_features - n_q * dim) // 2
            if width != self.num_kv_heads * dim or module.num_key_value_groups != n_q // self.num_kv_heads:
                raise PatchDidNotTakeEffect(f"{name}: {width // dim} kv heads, groups {module.num_key_value_groups}")
        if config.num_key_value_heads != self.num_kv_heads:
            raise PatchDidNotTakeEffect("config.num_key_value_heads was not updated")

    def tensor_transform(self, config: Any):
        if self.method != "mean":
            raise SurgeryError(
                f"{self.name} method={self.method} needs forwards over calibration text, so it runs in memory "
                "only; drop --streaming or use method=mean"
            )
        config = text_config(config)
        n_q, n_kv, dim = config.num_attention_heads, kv_heads(config), head_dim(config)
        return lambda name, tensor: pool_tensor(name, tensor, n_q, n_kv, dim, self.num_kv_heads)

    def short(self) -> str:
        return f"{self.name} → {self.num_kv_heads} kv head{'s' if self.num_kv_heads > 1 else ''} ({self.method})"

    def dry_run(self) -> GQA:
        return self.model_copy(update={"method": "mean"})  # same shapes; aligned and fitted need forwards


@register
class MQA(GQA):
    """Pool all key/value heads into one (multi-query attention): gqa with num_kv_heads=1."""

    name: ClassVar[str] = "mqa"
    examples: ClassVar[list[dict[str, Any]]] = [{}]

    num_kv_heads: Literal[1] = Field(1, description="always 1 for multi-query attention")
