"""Sliding-window attention on a loaded model: each token sees itself and the `window - 1` tokens
before it, on every layer (uniform) or on some layers while the others stay global (hybrid).

The route depends on what the architecture can persist natively, never the broken state where
the cache slides and the mask does not (Llama + `config.sliding_window`, see TRANSFORMERS_V5.md):

- Llama without biases, uniform window: the weights move into `MistralForCausalLM` (same layout,
  strict load) with `sliding_window` set; the saved checkpoint is a plain Mistral one.
- Mistral, uniform: `config.sliding_window` (read on every call).
- Qwen2, Qwen3, Gemma3: `layer_types` + `sliding_window` in the config, decoder layers rebuilt from
  it (they freeze both at init) and `has_sliding_layers` refreshed.
- Anything else (hybrid Llama or Mistral, Llama with biases): the registered attention + mask pair
  `surgery_sliding`, re-applied by `surgery.load_model` from the record. Its mask function always
  materialises the causal+padding mask; the attention function narrows it to the band on the
  layers that slide. The cache keeps every token on that route (no KV saving, exact results)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from surgery.arch import layer_windows, text_config
from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Persist, Snapshot, register

RUNTIME_IMPL = "surgery_sliding"
NATIVE_LAYER_TYPES = ("qwen2", "qwen3", "gemma3_text")


def band(mask: torch.Tensor, window: int) -> torch.Tensor:
    """Narrow a boolean (batch, 1, q, kv) causal mask to the last `window` keys of each query.
    A query's own key is the last one its causal row allows, whatever the padding or cache kind."""
    idx = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, idx, -1).amax(-1, keepdim=True)  # (B, 1, q, 1)
    return mask & (idx > last - window)


def causal_band(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(1, 1, q, kv) band for a mask-less call: the queries are the last q_len of kv_len keys."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return ((k <= q) & (k > q - window))[None, None]


def sliding_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    """sdpa attention, narrowed to `module.surgery_window` on the layers that slide."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = getattr(module, "surgery_window", None)
    if window is not None:
        if attention_mask is None:
            attention_mask = causal_band(query.shape[-2], key.shape[-2], window, query.device)
        elif attention_mask.dtype == torch.bool:
            attention_mask = band(attention_mask, window)
        else:  # additive float mask: 0 where allowed
            allowed = band(attention_mask == 0, window)
            attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def sliding_mask(*args: Any, **kwargs: Any):
    """transformers' sdpa mask, always materialised: the attention function needs it to band."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_runtime() -> None:
    """Register the pair (process-global, idempotent); done on first use, not at import, to keep
    `import surgery` light."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(RUNTIME_IMPL, sliding_attention)
    AttentionMaskInterface.register(RUNTIME_IMPL, sliding_mask)


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [m for n, m in model.named_modules() if n.endswith("self_attn") and hasattr(m, "layer_idx")]


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding `layers`, `rotary_emb` and `has_sliding_layers` (`model.model`)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


@register
class SlidingWindow(Patch):
    """Sliding-window attention: each token sees itself and window-1 previous tokens, on all layers
    or on some (hybrid); exact on every route, persisted natively where the architecture can."""

    name: ClassVar[str] = "sliding-window"
    persist: ClassVar[Persist] = "config"  # or runtime: see `persistence`
    architectures: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
    examples: ClassVar[list[dict[str, Any]]] = [{"window": 8}, {"window": 8, "global_every": 2}]

    window: int = Field(
        ge=1, le=1 << 24, description="tokens each position attends to: itself and the window-1 before it"
    )
    global_every: int | None = Field(
        None, ge=2, le=1 << 12, description="keep every K-th layer global (layers K-1, 2K-1, ...), the others slide"
    )
    layers: list[int] | None = Field(
        None,
        min_length=1,
        description="0-based indices of the layers that slide, the others stay global "
        "(default: all layers; Gemma3 keeps its own pattern)",
    )

    @model_validator(mode="after")
    def _one_pattern(self) -> SlidingWindow:
        if self.global_every is not None and self.layers is not None:
            raise ValueError("give either global_every or layers, not both")
        if self.layers is not None and (min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers must be distinct indices >= 0")
        return self

    def sliding(self, config: Any) -> list[bool]:
        """Per layer: does it slide? With no pattern given, a model that is already hybrid
        (Gemma3's layer_types) keeps its pattern; any other slides on every layer."""
        config = text_config(config)
        n = config.num_hidden_layers
        if self.global_every is not None:
            return [(i + 1) % self.global_every != 0 for i in range(n)]
        if self.layers is not None:
            return [i in self.layers for i in range(n)]
        if config.model_type == "gemma3_text":
            return [t == "sliding_attention" for t in config.layer_types]
        return [True] * n

    def expected_windows(self, config: Any) -> list[int | None]:
        return [self.window if s else None for s in self.sliding(config)]

    def route(self, model: torch.nn.Module) -> str:
        """`mistral` (Llama class swap), `config` (native), or `runtime` (attention + mask pair)."""
        config = text_config(model.config)
        uniform = all(self.sliding(config))
        if config.model_type == "llama":
            biased = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
            return "mistral" if uniform and not biased else "runtime"
        if config.model_type == "mistral":
            return "config" if uniform else "runtime"
        return "config"

    def check(self, model: torch.nn.Module) -> None:
        config = text_config(model.config)
        if model.config._attn_implementation == RUNTIME_IMPL:
            raise UnsupportedModel(
                f"{self.name} was already applied through surgery's runtime attention; apply it once, "
                "to the model without a window, with the pattern you want"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit and self.window >= limit:
            raise UnsupportedModel(
                f"{self.name}: a window of {self.window} tokens covers the whole context of this model "
                f"(max_position_embeddings {limit}), so it would never slide; choose a window below {limit}"
            )
        n = config.num_hidden_layers
        if self.layers is not None and max(self.layers) >= n:
            raise UnsupportedModel(
                f"{self.name}: layer {max(self.layers)} does not exist; the model has layers 0-{n - 1}"
            )
        if self.route(model) == "runtime" and model.config._attn_implementation not in ("sdpa", "eager"):
            raise UnsupportedModel(
                f"{self.name} on this model runs through its own sdpa attention, not "
                f"{model.config._attn_implementation}; apply it before switching the backend, or use a uniform window"
            )
        if config.model_type == "gemma3_text":
            rope = config.rope_parameters
            current = [t == "sliding_attention" for t in config.layer_types]
            if self.sliding(config) != current and rope.get("sliding_attention") != rope.get("full_attention"):
                raise UnsupportedModel(
                    f"{self.name}: Gemma3 ties RoPE to the layer type (sliding layers use "
                    f"rope_theta {rope['sliding_attention'].get('rope_theta')}, global ones "
                    f"{rope['full_attention'].get('rope_theta')}), so changing which layers slide would change "
                    f"their positions too; keep the model's pattern ("
                    f"--layers {','.join(str(i) for i, s in enumerate(current) if s)}) and set only --window"
                )

    def short(self) -> str:
        pattern = f", 1 in {self.global_every} layers global" if self.global_every else ""
        return f"{self.name} {self.window}{pattern}"

    def persistence(self, model: torch.nn.Module) -> Persist:
        return "runtime" if self.route(model) == "runtime" else "config"

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        route = self.route(model)
        windows = self.expected_windows(model.config)
        slid = sum(w is not None for w in windows)
        if route == "mistral":
            to_mistral(model, self.window)
            return [f"Llama -> Mistral (same weights) with sliding_window {self.window} on all {slid} layers"]
        if route == "runtime":
            if getattr(text_config(model.config), "sliding_window", None) is not None:
                text_config(model.config).sliding_window = None  # the cache must not slide on its own
            for module, window in zip(attention_layers(model), windows, strict=True):
                module.surgery_window = window
            register_runtime()
            if model.config._attn_implementation != RUNTIME_IMPL:
                model.set_attn_implementation(RUNTIME_IMPL)
            return [
                f"window {self.window} on {slid} of {len(windows)} layers through the registered "
                f"'{RUNTIME_IMPL}' attention (re-applied by surgery.load_model; the cache keeps all tokens)"
            ]
        config = text_config(model.config)
        config.sliding_window = self.window
        if config.model_type in NATIVE_LAYER_TYPES:
            set_layer_types(model, ["sliding_attention" if w else "full_attention" for w in windows])
        return [f"sliding_window {self.window} on {slid} of {len(windows)} layers (config, native)"]

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        expected = self.expected_windows(model.config)
        if self.route(model) == "runtime":
            actual = [getattr(m, "surgery_window", None) for m in attention_layers(model)]
            if model.config._attn_implementation != RUNTIME_IMPL or any(layer_windows(model.config)):
                raise PatchDidNotTakeEffect(
                    f"the '{RUNTIME_IMPL}' attention is not active, or the cache would still slide on its own"
                )
        else:
            actual = layer_windows(model.config)
            frozen = [m.sliding_window for m in attention_layers(model) if hasattr(m, "sliding_window")]
            if frozen and frozen != expected:
                raise PatchDidNotTakeEffect(f"attention modules still hold sliding windows {frozen}")
        if actual != expected:
            raise PatchDidNotTakeEffect(f"layer windows are {actual}, expected {expected}")


def set_layer_types(model: torch.nn.Module, layer_types: list[str]) -> None:
    """Write `layer_types` into the config and rebuild what froze it at init: every decoder layer
    (attention `layer_type`/`sliding_window`), the rotary module when the set of types changed,
    and `has_sliding_layers`."""
    config = text_config(model.config)
    old_types = set(config.layer_types)
    config.layer_types = layer_types
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = True  # Qwen: otherwise the saved sliding_window reloads as None
    body = decoder(model)
    for i, layer in enumerate(body.layers):
        state = layer.state_dict()
        with torch.device("meta"):
            fresh = type(layer)(layer.self_attn.config, i)
        fresh.load_state_dict(state, strict=True, assign=True)
        fresh.train(layer.training)
        body.layers[i] = fresh
    if set(layer_types) != old_types and hasattr(getattr(body, "rotary_emb", None), "layer_types"):
        old = body.rotary_emb  # Gemma3: one set of buffers per layer type present at init
        body.rotary_emb = type(old)(config=config).to(next(iter(old.buffers())).device)
    if hasattr(body, "has_sliding_layers"):
        body.has_sliding_layers = "sliding_attention" in layer_types


def to_mistral(model: torch.nn.Module, window: int) -> None:
    """Turn a bias-free Llama model into a MistralForCausalLM in place (the caller's object becomes
    the Mistral model): same weights, loaded strictly, with `sliding_window` set."""
    from transformers import MistralConfig, MistralForCausalLM

    values = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "attention_bias", "mlp_bias", "pretraining_tp"):
        values.pop(key, None)
    config = MistralConfig(**{**values, "sliding_window": window})
    config.architectures = ["MistralForCausalLM"]
    config._attn_implementation = model.config._attn_implementation
    state = model.state_dict()
    buffers = dict(model.named_buffers())
    with torch.device("meta"):
        fresh = MistralForCausalLM(config)
    fresh.load_state_dict(state, strict=True, assign=True)
    for name, buffer in buffers.items():  # non-persistent ones (rotary inv_freq) are not in the state dict
        parent, _, attr = name.rpartition(".")
        fresh.get_submodule(parent)._buffers[attr] = buffer
    if config.tie_word_embeddings:
        fresh.lm_head.weight = fresh.get_input_embeddings().weight
    fresh.generation_config = model.generation_config
    fresh.name_or_path = model.name_or_path
    fresh.train(model.training)
    model.__class__ = MistralForCausalLM
    model.__dict__ = fresh.__dict__
