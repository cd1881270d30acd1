"""Attention backend swap on a loaded model (`sdpa`, `eager`, `flex_attention`, flash attention).

transformers keeps the choice in `config._attn_implementation`, which `save_pretrained` never
writes; a top-level `attn_implementation` key in config.json *is* honoured at load, so the saved
config carries it (see `surgery.hub.write_metadata`) and stock transformers loads the model the
same way."""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Literal

from pydantic import Field

from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Snapshot, history, register

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
PACKAGES = {
    "flash_attention_2": "flash-attn (pip install flash-attn)",
    "flash_attention_3": "flash-attn 3 (Hopper build)",
}


def availability(impl: str) -> str | None:
    """None when `impl` can run here, else what is missing."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if impl == "flash_attention_2" and not is_flash_attn_2_available():
        return f"needs a CUDA GPU and the package {PACKAGES[impl]}"
    if impl == "flash_attention_3" and not is_flash_attn_3_available():
        return f"needs a Hopper GPU and the package {PACKAGES[impl]}"
    if impl == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "needs torch >= 2.5 (torch.nn.attention.flex_attention)"
    return None


@register
class Attention(Patch):
    """Switch the attention backend; persisted in config.json so stock transformers loads it the same way."""

    name: ClassVar[str] = "attention"
    persist: ClassVar[str] = "config"
    config_only: ClassVar[bool] = True
    architectures: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
    examples: ClassVar[list[dict[str, Any]]] = [{"impl": "eager"}]  # flex compiles per shape: tested apart

    impl: Literal[IMPLEMENTATIONS] = Field(description="attention implementation: " + ", ".join(IMPLEMENTATIONS))

    def check(self, model: torch.nn.Module) -> None:
        from surgery.patches.sliding_window import RUNTIME_IMPL

        if model.config._attn_implementation == RUNTIME_IMPL:
            raise UnsupportedModel(
                "attention: this model's sliding-window runs through surgery's own sdpa attention; "
                "switch the backend first, then apply sliding-window"
            )
        missing = availability(self.impl)
        if missing:
            raise UnsupportedModel(
                f"attention --impl {self.impl} {missing}; sdpa, eager and flex_attention run anywhere"
            )

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        before = model.config._attn_implementation
        model.set_attn_implementation(self.impl)
        return [f"attention: {before} -> {self.impl}"]

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        wrong = [c._attn_implementation for c in configs.values() if c._attn_implementation != self.impl]
        if wrong:
            raise PatchDidNotTakeEffect(f"attention implementation still {wrong[0]} somewhere in the model")

    @classmethod
    def saved_config(cls, config: Any) -> dict[str, Any]:
        """The backend the last `attention` record asked for: honoured by from_pretrained, never
        written by save_pretrained."""
        chosen = [r["params"]["impl"] for r in history(config) if r["name"] == cls.name]
        return {"attn_implementation": chosen[-1]} if chosen else {}
