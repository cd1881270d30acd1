"""RoPE scaling on a loaded model: yarn, ntk (static NTK-aware), dynamic-ntk, linear (position
interpolation) and llama3.

transformers computes `inv_freq` and the attention scaling when the rotary module is built, so a
config change alone does nothing: we rewrite `rope_parameters`, rebuild every rotary module from
the config, and verify the buffers against transformers' own RoPE functions. Scaling always
starts from the *origin* (pretraining theta and length, found in the surgery history or the
config), so yarn x2 applied twice equals yarn x4 applied once."""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from surgery.arch import head_dim, text_config
from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Snapshot, register
from surgery.patches.rope_params import (
    ARCHITECTURES,
    GLOBAL,
    LONGROPE_ONLY,
    RESCALABLE,
    ROPE_PATCHES,
    Origin,
    as_longrope,
    buffer_name,
    current_factor,
    expected_buffers,
    origin,
    rebuild_rotary,
    rope_records,
    rope_slots,
    rotary_modules,
    slot_params,
)


class RopePatch(Patch):
    """Shared machinery; subclasses set `rope_type` and may override `new_params`."""

    persist: ClassVar[str] = "config"
    config_only: ClassVar[bool] = True
    config_data: ClassVar[bool] = True
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES
    rope_type: ClassVar[str]
    static: ClassVar[bool] = True  # raise max_position_embeddings to origin x factor

    factor: float = Field(
        ge=1.0,
        le=1024.0,
        description="context extension factor relative to the current model (1 = unchanged); "
        "applied twice, factors multiply",
    )
    apply_to: Literal["full_attention", "all"] = Field(
        "full_attention",
        description="per-layer-type RoPE models (Gemma3): rescale full-attention layers only, or all",
    )

    def short(self) -> str:
        return f"{self.name} ×{self.factor:g}"

    def new_params(self, old: dict[str, Any], start: Origin, total: float, rotary_dim: int) -> dict[str, Any]:
        params = {"rope_type": self.rope_type, "rope_theta": start.rope_theta, "factor": total}
        if "partial_rotary_factor" in old:
            params["partial_rotary_factor"] = old["partial_rotary_factor"]
        return params

    def check(self, model: torch.nn.Module) -> None:
        if not rotary_modules(model):
            raise UnsupportedModel(f"{self.name}: this model has no rotary embedding to rescale")
        self.check_config(text_config(model.config))

    def check_config(self, config: Any) -> None:
        if not getattr(config, "rope_parameters", None):
            raise UnsupportedModel(f"{self.name}: this model has no rotary embedding to rescale")
        slots = rope_slots(config, self.apply_to)
        if not slots:
            raise UnsupportedModel(f"{self.name}: no layer type matches apply_to={self.apply_to}")
        if config.model_type in LONGROPE_ONLY and not self.static:
            raise UnsupportedModel(
                f"{config.model_type} configs store only default or longrope RoPE, so {self.name} cannot "
                "persist; use yarn, linear, llama3 or ntk"
            )
        for slot in slots:
            kind = slot_params(config, slot).get("rope_type")
            ours = kind == "longrope" and rope_records(config)  # our own longrope encoding
            if kind not in RESCALABLE and not ours:
                raise UnsupportedModel(
                    f"{self.name}: the model's RoPE is '{kind}', which cannot be rescaled; "
                    f"supported starting points: {', '.join(sorted(RESCALABLE))}"
                )

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        notes = self.rewrite_config(text_config(model.config), ctx)
        rebuild_rotary(model)
        return notes

    def rewrite_config(self, config: Any, ctx: Context) -> list[str]:
        """The new rope_parameters and max_position_embeddings; the rotary modules are rebuilt from
        them by `rewrite` (the config route leaves that to whoever loads the checkpoint)."""
        rotary_dim = int(
            head_dim(config)
            * slot_params(config, rope_slots(config, self.apply_to)[0]).get("partial_rotary_factor", 1.0)
        )
        origins = {s: origin(config, s) for s in rope_slots(config, self.apply_to)}
        totals = {s: current_factor(config, s) * self.factor for s in origins}
        rope = copy.deepcopy(config.rope_parameters)
        for slot, start in origins.items():
            new = self.new_params(slot_params(config, slot), start, totals[slot], rotary_dim)
            if config.model_type in LONGROPE_ONLY and new["rope_type"] != "default":
                new = as_longrope(config, new, rotary_dim)
            if slot == GLOBAL:
                rope = new
            else:
                rope[slot] = new
        max_len = max(o.max_len for o in origins.values())
        if self.static:
            max_len = max(round(o.max_len * totals[s]) for s, o in origins.items())
        config.rope_parameters = rope
        config.max_position_embeddings = int(max_len)
        if hasattr(config, "original_max_position_embeddings"):  # Phi3 reads it in preference
            config.original_max_position_embeddings = max(o.max_len for o in origins.values())
        ctx.state.update(origins=origins, totals=totals)  # for details()
        return [
            f"{slot}: {self.rope_type} x{totals[slot]:g} from theta={o.rope_theta:g}, "
            f"original length {o.max_len}; max_position_embeddings={config.max_position_embeddings}"
            for slot, o in origins.items()
        ]

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        config = text_config(model.config)
        for name, module in rotary_modules(model):
            for slot in rope_slots(config, self.apply_to):
                buffer = getattr(module, buffer_name(slot))
                inv_freq, scaling = expected_buffers(module, slot)
                got_scaling = getattr(module, "attention_scaling" if slot == GLOBAL else f"{slot}_attention_scaling")
                if not torch.allclose(buffer.float().cpu(), inv_freq.float(), rtol=1e-6, atol=0):
                    raise PatchDidNotTakeEffect(f"{name}.{buffer_name(slot)} does not match the new config")
                if abs(float(got_scaling) - float(scaling)) > 1e-9:
                    raise PatchDidNotTakeEffect(f"{name}: attention scaling {got_scaling} != {scaling}")
                old = before.buffers.get(f"{name}.{buffer_name(slot)}")
                changed = old is None or not torch.equal(old.cpu(), buffer.cpu()) or float(got_scaling) != 1.0
                if self.factor != 1 and self.static and not changed:
                    raise PatchDidNotTakeEffect(f"{name}: RoPE buffers unchanged after {self.name}")
                if self.factor != 1 and not self.static:
                    self._verify_dynamic(name, module, slot)

    def verify_config(self, config: Any, before: dict[str, Any], ctx: Context) -> None:
        """What the config alone shows: every rescaled slot has this patch's RoPE type and total
        factor, and a static scaling raised the length. That transformers builds the expected
        buffers from such a config is what `verify` proves on a skeleton; the two routes are
        tested to write equal configs."""
        kind = "longrope" if config.model_type in LONGROPE_ONLY and self.rope_type != "default" else self.rope_type
        old_rope = before.get("rope_parameters") or {}
        for slot, total in ctx.state["totals"].items():
            params = slot_params(config, slot)
            old = old_rope if slot == GLOBAL else old_rope.get(slot)
            if params.get("rope_type") != kind or ("factor" in params and params["factor"] != total):
                raise PatchDidNotTakeEffect(f"{slot}: rope_parameters {params} are not {self.name} x{total:g}")
            if self.factor != 1 and self.static and params == old:
                raise PatchDidNotTakeEffect(f"{slot}: rope_parameters unchanged after {self.name}")
        if self.static:
            length = max(round(o.max_len * ctx.state["totals"][s]) for s, o in ctx.state["origins"].items())
            if config.max_position_embeddings != length:
                raise PatchDidNotTakeEffect(
                    f"max_position_embeddings is {config.max_position_embeddings}, not {length}"
                )

    def _verify_dynamic(self, name: str, module: torch.nn.Module, slot: str) -> None:
        """Dynamic NTK only changes inv_freq past max_position_embeddings: probe a copy there."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        probe = copy.deepcopy(module)
        long = 2 * module.config.max_position_embeddings
        x = torch.zeros(1, 1, 1, device=getattr(probe, buffer_name(slot)).device)
        positions = torch.tensor([[long - 1]], device=x.device)
        args = () if slot == GLOBAL else (slot,)
        probe(x, positions, *args)
        kwargs = {} if slot == GLOBAL else {"layer_type": slot}
        expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](module.config, seq_len=long, **kwargs)
        got = getattr(probe, buffer_name(slot)).float().cpu()
        if not torch.allclose(got, expected.float(), rtol=1e-6) or torch.equal(
            got, getattr(module, buffer_name(slot)).float().cpu()
        ):
            raise PatchDidNotTakeEffect(f"{name}: dynamic NTK did not rescale past the original length")

    def details(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> dict[str, Any]:
        return self.details_config(model.config, ctx)

    def details_config(self, config: Any, ctx: Context) -> dict[str, Any]:
        """The origin of every slot (the first RoPE record's wins) and each slot's total factor."""
        records = rope_records(config)
        first = records[0]["details"]["origin"] if records else {}
        last = records[-1]["details"]["total_factor"] if records else {}
        return {
            "origin": {**{s: vars(o) for s, o in ctx.state["origins"].items()}, **first},
            "total_factor": {**last, **ctx.state["totals"]},
        }


@register
class Yarn(RopePatch):
    """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus attention temperature."""

    name: ClassVar[str] = "yarn"
    rope_type: ClassVar[str] = "yarn"
    examples: ClassVar[list[dict[str, Any]]] = [{"factor": 4}, {"factor": 2, "beta_fast": 16, "beta_slow": 2}]

    beta_fast: float = Field(32.0, gt=0, le=1e4, description="rotations above which dimensions are not interpolated")
    beta_slow: float = Field(1.0, gt=0, le=1e4, description="rotations below which dimensions are fully interpolated")
    attention_factor: float | None = Field(
        None, gt=0, le=100, description="cos/sin scale; default 0.1*ln(total factor)+1 as in the paper"
    )

    @model_validator(mode="after")
    def _betas(self) -> Yarn:
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast:g}) must be greater than beta_slow ({self.beta_slow:g})")
        return self

    def new_params(self, old: dict[str, Any], start: Origin, total: float, rotary_dim: int) -> dict[str, Any]:
        params = super().new_params(old, start, total, rotary_dim)
        params.update(
            original_max_position_embeddings=start.max_len, beta_fast=self.beta_fast, beta_slow=self.beta_slow
        )
        if self.attention_factor is not None:
            params["attention_factor"] = self.attention_factor
        return params


@register
class Linear(RopePatch):
    """Position interpolation (Chen et al. 2023): every frequency divided by the factor."""

    name: ClassVar[str] = "linear"
    rope_type: ClassVar[str] = "linear"
    examples: ClassVar[list[dict[str, Any]]] = [{"factor": 2}]


@register
class DynamicNTK(RopePatch):
    """Dynamic NTK: theta grows with the sequence once it passes the original length."""

    name: ClassVar[str] = "dynamic-ntk"
    rope_type: ClassVar[str] = "dynamic"
    static: ClassVar[bool] = False
    examples: ClassVar[list[dict[str, Any]]] = [{"factor": 2}]


@register
class NTK(RopePatch):
    """Static NTK-aware scaling: theta' = theta * s^(d/(d-2)), stored as plain default RoPE."""

    name: ClassVar[str] = "ntk"
    rope_type: ClassVar[str] = "default"
    examples: ClassVar[list[dict[str, Any]]] = [{"factor": 4}]

    def new_params(self, old: dict[str, Any], start: Origin, total: float, rotary_dim: int) -> dict[str, Any]:
        params = super().new_params(old, start, total, rotary_dim)
        del params["factor"]
        params["rope_theta"] = ntk_theta(start.rope_theta, total, rotary_dim)
        return params


def ntk_theta(theta: float, factor: float, rotary_dim: int) -> float:
    """Static NTK-aware base: theta * s^(d/(d-2)) with d the rotary dimension."""
    return theta * factor ** (rotary_dim / (rotary_dim - 2))


@register
class Llama3(RopePatch):
    """Llama 3.1 frequency-band scaling: low frequencies interpolated, high ones kept."""

    name: ClassVar[str] = "llama3"
    rope_type: ClassVar[str] = "llama3"
    examples: ClassVar[list[dict[str, Any]]] = [
        {"factor": 8},
        {"factor": 4, "low_freq_factor": 2, "high_freq_factor": 8},
    ]

    low_freq_factor: float = Field(
        1.0, gt=0, le=1e4, description="wavelengths above original/low are fully interpolated"
    )
    high_freq_factor: float = Field(4.0, gt=0, le=1e4, description="wavelengths below original/high are kept")

    @model_validator(mode="after")
    def _bands(self) -> Llama3:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor:g}) must be greater than "
                f"low_freq_factor ({self.low_freq_factor:g})"
            )
        return self

    def new_params(self, old: dict[str, Any], start: Origin, total: float, rotary_dim: int) -> dict[str, Any]:
        params = super().new_params(old, start, total, rotary_dim)
        params.update(
            original_max_position_embeddings=start.max_len,
            low_freq_factor=self.low_freq_factor,
            high_freq_factor=self.high_freq_factor,
        )
        return params


assert ROPE_PATCHES == {cls.name for cls in (Yarn, Linear, DynamicNTK, NTK, Llama3)}
