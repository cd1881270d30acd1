"""MHA/GQA -> multi-head latent attention (DeepSeek-V2/V3 MLA), written as a stock
`DeepseekV3ForCausalLM` that transformers runs and whose cache holds the compressed latent.

Per layer, with head_dim d, r rotary dimensions kept and a latent of L channels:

- **RoPE.** Stock DeepseekV3 computes its rotary frequencies as a geometric series from frequency 1
  over `qk_rope_head_dim` dimensions, so the frequency planes that keep RoPE must be the source's
  r/2 *highest* ones; `rope_theta` becomes theta^(r/d), which reproduces them exactly (yarn, linear
  and llama3 scaling included; the frequencies are compared before anything changes). The
  highest frequencies are also the ones that cannot lose RoPE: the lower planes turn slowly and
  behave almost position-free over the distances attention uses. MLA has one RoPE key shared by all
  heads, so per kept plane the kv heads' keys (a complex number per head, which RoPE multiplies by
  e^(i theta t)) are rotated across heads onto their principal direction on calibration text (a
  complex PCA, which commutes with RoPE: the RoRoPE idea of TransMLA); that direction is the shared
  key, and each query head absorbs its head's complex coefficient. With one kv head this is exact.
- **K/V.** The non-rotary key dimensions of every kv head and all value dimensions are stacked and
  factored jointly into the latent: by the weights' SVD (`svd`), or by PCA of their outputs on
  calibration text (`calibrated`, activation-aware, keys and values balanced to equal energy).
  `kv_b_proj` expands the latent back to per-query-head keys and values.
- **kv_a_layernorm** is an RMSNorm and not linear. Latent channel 0 is held at a large constant
  K through the `kv_a` bias (`attention_bias: true`), so the norm divides every token by nearly
  the same K/sqrt(L); the norm's weights undo that scale, and channel 0 carries the outputs' mean
  through `kv_b_proj`. K is 1000x a bound on the latent's norm, so the norm's scale stays within
  5e-7 of constant (measured on calibration text and recorded in `details`). vLLM and SGLang
  build `kv_a_proj_with_mqa` without a bias, so `latent_norm="scale"` writes none: the norm's
  weight is the latent's calibration RMS, approximate per token until `fitted` and a heal adapt.
- **Scales.** Queries are rescaled so that softmax_scale, DeepseekV3's own `mscale`, and the
  rotary attention factor (YaRN) give back the source's attention logits exactly.
- `fitted` then trains each new attention module, bottom-up, to reproduce the original layer's
  output, as `gqa --method fitted` does.

Embeddings, norms and MLPs move unchanged (every layer dense, `first_k_dense_replace` = layers, no
MoE modules built). The result saves and loads with plain `from_pretrained`, no remote code."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from surgery.arch import head_dim, kv_heads, latent_dims, layer_windows, text_config
from surgery.errors import PatchDidNotTakeEffect, UnsupportedModel
from surgery.lazy import torch
from surgery.patch import Context, Patch, Snapshot, history, method_fields, register
from surgery.patches.gqa_fit import SEQ_LEN, CalibrationText, FitLr, FitSeqLen, FitSteps, FitTokens

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
NORM_MARGIN = 1000.0  # the constant latent channel, in units of a bound on the latent's norm
SCALED_ROPE = ("default", "linear", "yarn", "llama3")  # frequencies a smaller rope_theta reproduces


@register
class MLA(Patch):
    """Convert attention to multi-head latent attention (a stock DeepseekV3 model): the cache holds one latent and one shared RoPE key per token."""

    name: ClassVar[str] = "mla"
    persist: ClassVar[str] = "config"
    architectures: ClassVar[tuple[str, ...]] = ARCHITECTURES
    examples: ClassVar[list[dict[str, Any]]] = [
        {"kv_rank": 24, "rope_dim": 8, "method": "svd"},
        {"kv_rank": 16, "rope_dim": 8, "calibration_tokens": 64},
        {"kv_rank": 16, "rope_dim": 8, "method": "fitted", "calibration_tokens": 64, "fit_tokens": 64, "fit_steps": 3},
    ]

    kv_rank: int = Field(
        ge=2,
        le=1 << 16,
        description="latent channels cached per token and layer (kv_lora_rank); latent_norm constant uses one of them",
    )
    rope_dim: int | None = Field(
        None, ge=2, le=1 << 12, description="dimensions of the shared RoPE key (even; default half the head dim)"
    )
    method: Literal["svd", "calibrated", "fitted"] = Field(
        "calibrated",
        description="svd: factor the weights; calibrated: PCA of keys and values on calibration text; "
        "fitted: calibrated, then each layer's attention trained to reproduce the original's outputs",
    )
    latent_norm: Literal["constant", "scale"] = Field(
        "constant",
        description="constant: a latent channel held constant by the kv_a bias makes kv_a_layernorm exact "
        "(vLLM and SGLang build kv_a without a bias and cannot load it); scale: no bias, the norm's weight set to "
        "the latent's calibration RMS (approximate; loads anywhere DeepseekV3 does)",
    )
    interleave: bool = Field(
        False, description="write the RoPE dimensions as interleaved pairs (rope_interleave, vLLM's MLA layout)"
    )
    calibration_tokens: int = Field(
        2048, ge=16, le=1 << 22, description="calibrated/fitted: tokens of calibration text"
    )
    calibration_text: CalibrationText = "pydoc"
    fit_tokens: FitTokens = 8192
    fit_steps: FitSteps = 50
    fit_lr: FitLr = 1e-3
    fit_seq_len: FitSeqLen = SEQ_LEN

    @model_validator(mode="after")
    def _method_fields(self) -> MLA:
        if self.rope_dim is not None and self.rope_dim % 2:
            raise ValueError(f"rope_dim must be even (RoPE rotates pairs), got {self.rope_dim}")
        method_fields(self, {"svd": (), "calibrated": ("calibration",), "fitted": ("calibration", "fit")})
        return self

    # -- what can be converted -------------------------------------------------------------

    def check(self, model: torch.nn.Module) -> None:
        config = text_config(model.config)
        layer = model.model.layers[0] if hasattr(model, "model") and hasattr(model.model, "layers") else None
        attention = getattr(layer, "self_attn", None)
        if attention is None or not all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedModel(f"{self.name}: found no self_attn modules with q/k/v/o projections")
        if getattr(attention, "q_norm", None) is not None or getattr(attention, "k_norm", None) is not None:
            raise UnsupportedModel(
                f"{self.name}: {config.model_type} normalises every query and key head (q_norm/k_norm), which is not "
                "linear and has no place in DeepseekV3's attention"
            )
        if any(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")):
            raise UnsupportedModel(
                f"{self.name}: {config.model_type}'s q/k/v projections have biases, which DeepseekV3's q_proj "
                "cannot hold"
            )
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModel(f"{self.name}: the MLPs have biases, which DeepseekV3's MLPs cannot hold")
        if any(layer_windows(config)):
            raise UnsupportedModel(f"{self.name}: DeepseekV3 has no sliding window; this model uses one")
        rebuilt = [r["name"] for r in history(model.config) if r["persist"] == "runtime" or r["name"] == "kv-quant"]
        if rebuilt:
            raise UnsupportedModel(
                f"{self.name}: this model carries {', '.join(rebuilt)}, set up on the attention mla replaces; "
                f"apply mla first, then {rebuilt[0]} where DeepseekV3 supports it"
            )
        d = head_dim(config)
        rot = self.rotary_dims(d)
        if rot > d:
            raise UnsupportedModel(f"{self.name}: rope_dim {rot} exceeds the head dim {d}")
        self.check_compresses(config, rot)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if "rope_type" not in rope:
            raise UnsupportedModel(f"{self.name}: RoPE parameters per layer type are not supported")
        if rot < d and rope_type not in SCALED_ROPE:
            raise UnsupportedModel(
                f"{self.name}: {rope_type} RoPE depends on the rotary dimension count, so only rope_dim {d} "
                "(all dimensions) keeps it"
            )
        old = original_frequencies(model)
        new_config = self.target_config(config, model)
        new = rotary_class()(new_config).inv_freq
        if not torch.allclose(new, old[: rot // 2], rtol=1e-5, atol=0):
            raise UnsupportedModel(
                f"{self.name}: stock DeepseekV3 cannot reproduce this model's {rope_type} RoPE frequencies with "
                f"{rot} rotary dimensions; try rope_dim {d}"
            )

    def check_compresses(self, config: Any, rot: int) -> None:
        """Refuse a latent plus RoPE key at or above the per-token width the model caches now: the
        conversion would cost minutes and gigabytes for a larger cache. (The exactness tests
        lift this to prove the conversion at full rank, which keeps everything.)"""
        d, n_kv = head_dim(config), kv_heads(config)
        width = 2 * n_kv * d  # values cached per token and layer now
        if self.kv_rank + rot >= width:
            raise UnsupportedModel(
                f"{self.name}: latent {self.kv_rank} + RoPE key {rot} = {self.kv_rank + rot} values per token and "
                f"layer is not below the {width} the model caches now (keys and values of {n_kv} kv heads x {d}), "
                f"so the cache would not shrink; choose --kv-rank below {width - rot}"
            )

    def calibration_sources(self) -> list[str]:
        return [] if self.method == "svd" else [self.calibration_text]

    def target_config(self, config: Any, model: torch.nn.Module) -> Any:
        """The DeepseekV3Config of the converted model."""
        from transformers import DeepseekV3Config

        d = head_dim(config)
        rot = self.rotary_dims(d)
        rope = dict(config.rope_parameters)
        rope["rope_theta"] = rope["rope_theta"] ** (rot / d)  # the top rot/2 planes, exactly
        new = DeepseekV3Config(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
            first_k_dense_replace=config.num_hidden_layers,  # every MLP dense: no MoE modules
            num_nextn_predict_layers=0,
            kv_lora_rank=self.kv_rank,
            q_lora_rank=None,
            qk_rope_head_dim=rot,
            qk_nope_head_dim=d - rot,
            v_head_dim=d,
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            initializer_range=getattr(config, "initializer_range", 0.02),
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
            rope_parameters=rope,
            rope_interleave=self.interleave,
            attention_bias=self.latent_norm == "constant",  # the kv_a bias holds the constant channel
            attention_dropout=getattr(config, "attention_dropout", 0.0),
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        new.dtype = model.config.dtype
        new._attn_implementation = model.config._attn_implementation
        new.surgery = history(model.config)
        return new

    # -- the conversion --------------------------------------------------------------------

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        from transformers import DeepseekV3ForCausalLM

        config = text_config(model.config)
        n_q, n_kv, d = config.num_attention_heads, kv_heads(config), head_dim(config)
        rot = self.rotary_dims(d)
        layers = list(model.model.layers)
        tokenizer, ids, stats = None, None, [None] * len(layers)
        if self.method != "svd":
            tokenizer = self.tokenizer_for(model, ctx)
            ids, stats = input_statistics(model, layers, tokenizer, self.calibration_text, self.calibration_tokens)
        new_config = self.target_config(config, model)
        with torch.device("meta"):
            new = DeepseekV3ForCausalLM(new_config)
        rotary = rotary_class()(new_config).to(next(model.parameters()).device)
        scales = logit_scales(model, layers[0].self_attn, new.model.layers[0].self_attn, rotary)
        state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
        skeleton = next(model.parameters()).is_meta  # `surgery validate --model`: shapes only
        design = []
        for i, (layer, stat) in enumerate(zip(layers, stats, strict=True)):
            if skeleton:
                weights = new.model.layers[i].self_attn.state_dict()
            else:
                weights, rms = convert_layer(
                    layer.self_attn, layer.input_layernorm.weight, stat, self, n_q, n_kv, d, scales
                )
                design.append(rms)
            state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in weights.items()})
        if "lm_head.weight" not in state and new_config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        new.load_state_dict(state, strict=True, assign=True)
        new.model.rotary_emb = rotary
        meta = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.is_meta]
        assert skeleton or not meta, f"mla left {meta} unset"
        new.train(model.training)
        new.generation_config = model.generation_config
        new.name_or_path = model.name_or_path
        ctx.state["source"] = {"model_type": config.model_type, "kv_heads": n_kv, "head_dim": d}
        ctx.state["latent_norm"] = norm_deviation(new, ids, design) if ids is not None else None
        before, after = 2 * n_kv * d, self.kv_rank + rot
        constant = " (1 constant)" if self.latent_norm == "constant" else ""
        notes = [
            f"attention -> MLA: latent {self.kv_rank}{constant} + shared RoPE key {rot} = {after} values per "
            f"token and layer, from {before} ({n_kv} kv heads x {d} x k,v); KV cache x{after / before:.3f}",
            f"RoPE kept on the {rot // 2} highest of {d // 2} frequency planes (rope_theta "
            f"{new_config.rope_parameters['rope_theta']:.6g}); {self.method} factorisation"
            + ("" if self.method == "svd" else f" on {self.calibration_text}"),
        ]
        if ctx.state["latent_norm"]:
            deviation = ctx.state["latent_norm"]
            notes.append(
                f"latent norm ({self.latent_norm}): per-token scale off by {deviation['mean']:.2e} on average, "
                f"{deviation['max']:.2e} at most on calibration text"
            )
        if self.method == "fitted" and self.fit_steps:
            from surgery.patches.gqa_fit import fit_attention

            students = [(f"model.layers.{i}.self_attn", layer.self_attn) for i, layer in enumerate(new.model.layers)]
            teachers = {f"model.layers.{i}.self_attn": layer.self_attn for i, layer in enumerate(layers)}
            notes += fit_attention(new, students, teachers, self, tokenizer, teacher_model=model)
        transplant(model, new)
        return notes

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        from transformers import DeepseekV3ForCausalLM

        rot = self.rotary_dims(ctx.state["source"]["head_dim"])
        if not isinstance(model, DeepseekV3ForCausalLM) or latent_dims(model.config) != (self.kv_rank, rot):
            raise PatchDidNotTakeEffect(f"model is {type(model).__name__} with latent {latent_dims(model.config)}")
        for i, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            if attention.kv_a_proj_with_mqa.out_features != self.kv_rank + rot or not hasattr(layer.mlp, "gate_proj"):
                raise PatchDidNotTakeEffect(f"layer {i}: attention or MLP not converted")
        deviation = ctx.state["latent_norm"]
        if self.latent_norm == "constant" and deviation and not deviation["max"] < 1e-5:
            raise PatchDidNotTakeEffect(f"the latent norm's constant channel moved its scale by {deviation['max']:.2e}")

    def rotary_dims(self, head_dim: int) -> int:
        return self.rope_dim if self.rope_dim is not None else head_dim // 2

    def details(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> dict[str, Any]:
        source = ctx.state["source"]
        return {
            "source": source,
            "kv_values_per_token_per_layer": {
                "before": 2 * source["kv_heads"] * source["head_dim"],
                "after": self.kv_rank + self.rotary_dims(source["head_dim"]),
            },
            "latent_norm_deviation": ctx.state["latent_norm"],
        }

    def short(self) -> str:
        rope = f" + rope {self.rope_dim}" if self.rope_dim is not None else ""
        return f"{self.name} latent {self.kv_rank}{rope} ({self.method})"

    def dry_run(self) -> MLA:
        return MLA(
            kv_rank=self.kv_rank,
            rope_dim=self.rope_dim,
            latent_norm=self.latent_norm,
            interleave=self.interleave,
            method="svd",
        )


# -- helpers ---------------------------------------------------------------------------------


def rotary_class():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    return DeepseekV3RotaryEmbedding


def original_frequencies(model: torch.nn.Module) -> torch.Tensor:
    """The source's rotary inverse frequencies, rebuilt from its config (works on a meta skeleton)."""
    rotary = model.model.rotary_emb
    return type(rotary)(rotary.config).inv_freq


def logit_scales(
    model: torch.nn.Module, source: torch.nn.Module, target: torch.nn.Module, rotary: torch.nn.Module
) -> tuple[float, float]:
    """Multipliers for the new queries' (non-rotary, rotary) parts that give back the source's
    attention logits: its softmax scale times the squared rotary attention factor (YaRN) on every
    dimension, against DeepseekV3's scale (with its mscale) and rotary factor on the RoPE part only."""
    factor = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
    want = factor**2 * source.scaling
    return want / target.scaling, want / (float(rotary.attention_scaling) ** 2 * target.scaling)


def input_statistics(
    model: torch.nn.Module, layers: list[torch.nn.Module], tokenizer: Any, text: str, tokens: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The calibration token blocks, and per layer over them: second moment and mean of the attention
    inputs, and the largest input norm. Accumulated in float32 where the model runs (hidden^2 floats
    a layer: 2 GiB for a 7B, 21 GiB for a 70B) and returned in float64 on the CPU."""
    from surgery.patches.gqa_fit import BATCH, calibration_ids

    ids = calibration_ids(model, tokenizer, text, tokens)
    hidden = model.config.hidden_size
    stats: list[dict[str, Any]] = [{"count": 0, "max_norm": 0.0} for _ in layers]

    def hook(i: int):
        def grab(_module, args, kwargs):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).reshape(-1, hidden).float()
            s = stats[i]
            if "moment" not in s:
                s["moment"], s["sum"] = x.new_zeros(hidden, hidden), x.new_zeros(hidden)
            s["moment"].addmm_(x.T, x)
            s["sum"] += x.sum(0)
            s["count"] += len(x)
            s["max_norm"] = max(s["max_norm"], x.norm(dim=-1).max().item())

        return grab

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), BATCH):
                model(ids[start : start + BATCH], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for s in stats:
        s["mean"] = s.pop("sum").to("cpu", torch.float64) / s["count"]
        s["moment"] = s["moment"].to("cpu", torch.float64) / s["count"]
    log.info("mla: attention input statistics over %d tokens", ids.numel())
    return ids, stats


def norm_deviation(model: torch.nn.Module, ids: torch.Tensor, design: list[float]) -> dict[str, float]:
    """How far kv_a_layernorm's per-token scale is from the one the conversion designed for (the
    RMS its weights undo), over the first calibration batch: mean and max of |design / RMS - 1|."""
    from surgery.patches.gqa_fit import BATCH

    deviations = []

    def hook(target: float):
        def grab(_module, args):
            rms = args[0].double().pow(2).mean(-1).sqrt()
            deviations.append((target / rms - 1).abs().flatten())

        return grab

    norms = [layer.self_attn.kv_a_layernorm for layer in model.model.layers]
    handles = [norm.register_forward_pre_hook(hook(target)) for norm, target in zip(norms, design, strict=True)]
    try:
        with torch.no_grad():
            model(ids[:BATCH], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    every = torch.cat(deviations)
    return {"mean": every.mean().item(), "max": every.max().item()}


def top_eigenvectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The k eigenvectors of a symmetric/Hermitian matrix with the largest eigenvalues, as columns."""
    _, vectors = torch.linalg.eigh(matrix)
    return vectors[..., -k:].flip(-1) if k else vectors[..., :0]


def shared_rope_key(
    wq: torch.Tensor, wk: torch.Tensor, moment: torch.Tensor, rot: int, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows (heads, rot, hidden) and the shared key rows (rot, hidden) for the `rot / 2`
    highest frequency planes. Per plane, each kv head's key is a complex number that RoPE multiplies
    by e^(i theta t); the shared key is the kv heads' principal complex direction under `moment`,
    and every query head absorbs its kv head's coefficient, so q.k is kept on that direction."""
    n_q, d, _ = wq.shape
    n_kv, half, kept = wk.shape[0], d // 2, rot // 2
    zk = torch.complex(wk[:, :kept], wk[:, half : half + kept]).transpose(0, 1)  # (planes, kv, hidden)
    cov = zk @ moment.to(zk.dtype) @ zk.conj().transpose(1, 2)  # (planes, kv, kv)
    e = top_eigenvectors(cov, 1)[..., 0]  # (planes, kv)
    e = e * (e[:, :1].conj() / e[:, :1].abs().clamp_min(1e-30))  # a fixed phase: head 0's coefficient real
    shared = torch.einsum("pj,pjh->ph", e.conj(), zk)  # (planes, hidden)
    owner = torch.arange(n_q) // (n_q // n_kv)
    zq = torch.complex(wq[:, :kept], wq[:, half : half + kept]) * e.T[owner].conj()[..., None]
    q_rot = torch.cat([zq.real, zq.imag], dim=1)  # rotate_half layout: (re..., im...)
    k_rot = torch.cat([shared.real, shared.imag], dim=0)
    if interleave:  # (re0, im0, re1, im1, ...)
        order = torch.stack([torch.arange(kept), torch.arange(kept) + kept], dim=1).flatten()
        q_rot, k_rot = q_rot[:, order], k_rot[order]
    return q_rot, k_rot


def convert_layer(
    attention: torch.nn.Module,
    gain: torch.Tensor,
    stats: dict[str, torch.Tensor] | None,
    patch: MLA,
    n_q: int,
    n_kv: int,
    d: int,
    scales: tuple[float, float],
) -> tuple[dict[str, torch.Tensor], float]:
    """One source attention module -> DeepseekV3Attention weights, and the latent RMS the norm's
    weights are set to undo. `gain`: the layer's input norm weight (the inputs' scale where no
    calibration statistics are given)."""
    rank, rot = patch.kv_rank, patch.rotary_dims(d)
    dtype, device = attention.q_proj.weight.dtype, attention.q_proj.weight.device
    wq = attention.q_proj.weight.detach().to("cpu", torch.float64).reshape(n_q, d, -1)
    wk = attention.k_proj.weight.detach().to("cpu", torch.float64).reshape(n_kv, d, -1)
    wv = attention.v_proj.weight.detach().to("cpu", torch.float64).reshape(n_kv, d, -1)
    hidden = wq.shape[-1]
    gain = gain.detach().to("cpu", torch.float64)
    # without calibration, inputs are taken as the RMS-normed vectors they are: per-channel scale = gain
    moment = stats["moment"] if stats else torch.diag(gain**2)
    mean = stats["mean"] if stats else torch.zeros(hidden, dtype=torch.float64)
    q_rot, k_rot = shared_rope_key(wq, wk, moment, rot, patch.interleave)

    # K on the planes without RoPE, and V, factored jointly into the latent
    half, kept = d // 2, rot // 2
    nope = torch.cat([torch.arange(kept, half), torch.arange(half + kept, d)])
    k_nope, values = wk[:, nope].reshape(-1, hidden), wv.reshape(-1, hidden)
    constant = patch.latent_norm == "constant"
    # the constant channel carries the mean, so the latent models what varies; otherwise it models all
    spread = moment - torch.outer(mean, mean) if constant else moment
    k_energy = torch.trace(k_nope @ spread @ k_nope.T)
    balance = math.sqrt(torch.trace(values @ spread @ values.T) / k_energy) if k_energy > 0 else 1.0
    stacked = torch.cat([balance * k_nope, values])
    channels = rank - 1 if constant else rank
    basis = top_eigenvectors(stacked @ spread @ stacked.T, min(channels, len(stacked)))  # (rows, c)
    latent = torch.zeros(channels, hidden, dtype=torch.float64)
    latent[: basis.shape[1]] = basis.T @ stacked
    up = torch.zeros(len(stacked), channels, dtype=torch.float64)
    up[:, : basis.shape[1]] = basis
    if constant:
        latent, up, bias, norm, design = constant_channel(latent, up, stacked @ mean, basis, stats, gain, dtype)
    else:
        latent, up, norm, design = average_scale(latent, up, moment, dtype)
        bias = None

    # per query head: keys unbalanced, then expanded from kv heads to query heads
    owner = torch.arange(n_q) // (n_q // n_kv)
    k_rows = up[: len(k_nope)].reshape(n_kv, d - rot, rank) / balance
    v_rows = up[len(k_nope) :].reshape(n_kv, d, rank)
    weights = {
        "q_proj.weight": torch.cat([wq[:, nope] * scales[0], q_rot * scales[1]], dim=1).reshape(-1, hidden),
        "kv_a_proj_with_mqa.weight": torch.cat([latent, k_rot]),
        "kv_a_layernorm.weight": norm,
        "kv_b_proj.weight": torch.cat([k_rows[owner], v_rows[owner]], dim=1).reshape(-1, rank),
        "o_proj.weight": attention.o_proj.weight.detach(),
    }
    if bias is not None:
        weights["kv_a_proj_with_mqa.bias"] = torch.cat([bias, torch.zeros(rot, dtype=torch.float64)])
        weights["o_proj.bias"] = torch.zeros(attention.o_proj.out_features)
    return {k: v.to(device=device, dtype=dtype).contiguous() for k, v in weights.items()}, design


def stored(value: float, dtype: torch.dtype) -> float:
    """`value` as the model's dtype will hold it."""
    return torch.tensor(value, dtype=dtype).double().item()


def constant_channel(latent, up, output_mean, basis, stats, gain, dtype):
    """Channel 0 held at a constant K through the kv_a bias, far above the latent's norm: RMSNorm
    then divides every token by nearly K/sqrt(L), which the norm's weights undo; channel 0 (normed to
    sqrt(L)) carries the outputs' mean that the latent leaves out."""
    rank = len(latent) + 1
    input_bound = stats["max_norm"] if stats else math.sqrt(len(gain)) * gain.abs().max().item()
    latent_bound = max(torch.linalg.matrix_norm(latent, 2).item() * input_bound, 1e-6)
    big = NORM_MARGIN * latent_bound
    if dtype == torch.float16:
        big = min(big, 2.0**14)
    big, weight = stored(big, dtype), stored(big / math.sqrt(rank), dtype)
    residual_mean = output_mean - basis @ (basis.T @ output_mean)
    full_up = torch.zeros(len(up), rank, dtype=torch.float64)
    full_up[:, 0] = residual_mean / math.sqrt(rank)
    full_up[:, 1:] = up / (weight * math.sqrt(rank) / big)  # what the norm does to a latent channel
    full_latent = torch.cat([torch.zeros(1, latent.shape[1], dtype=torch.float64), latent])
    bias = torch.zeros(rank, dtype=torch.float64)
    bias[0] = big
    norm = torch.full((rank,), weight, dtype=torch.float64)
    norm[0] = 1.0
    return full_latent, full_up, bias, norm, big / math.sqrt(rank)


def average_scale(latent, up, moment, dtype):
    """No bias: RMSNorm divides each token's latent by its own RMS. The norm's weight is set to the
    calibration RMS, so an average token passes unchanged and others are scaled by (average / own)
    RMS; the latent is scaled so RMSNorm's epsilon stays negligible."""
    rank = len(latent)
    typical = math.sqrt(max(torch.trace(latent @ moment @ latent.T).item() / rank, 1e-30))
    lift = 100.0 / typical  # latent RMS ~100 >> epsilon (1e-6 in transformers, rms_norm_eps in vLLM)
    weight = stored(typical, dtype)
    return latent * lift, up * (typical / weight), torch.full((rank,), weight, dtype=torch.float64), lift * typical


def transplant(model: torch.nn.Module, new: torch.nn.Module) -> None:
    """Make `model` (the object callers hold) the converted model: its class and state become
    `new`'s. Everything a caller can reach goes through the object, so nothing keeps the old one."""
    model.__class__ = type(new)
    model.__dict__.clear()
    model.__dict__.update(new.__dict__)
