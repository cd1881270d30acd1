"""The config route without torch: config-only patches (RoPE scaling) applied to a local checkpoint's
config.json read as data, for the model types whose parameter list surgery can write down from
the config (Llama, Mistral, Qwen2, Qwen3 without biases beyond Qwen2's own).

The input checks are the skeleton route's: a config without custom code, intact headers and index,
and every parameter the config implies present with its shape. The patch runs its `check_config`,
`rewrite_config` and `verify_config` on the data; the written config.json is read back and must
say the same. Anything this module does not know (another model type, a field only the config
class would fill in, a nested or quantized config) returns None, and the caller takes the skeleton
route, which imports transformers' model code. Tests hold both routes equal: same configs as
transformers loads them, same records, same parameter lists as a meta-device skeleton."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.arch import KV_DTYPE_BYTES, head_dim, kv_heads
from surgery.checkpoint import check_config, check_tensors, weight_files
from surgery.errors import PatchDidNotTakeEffect
from surgery.info import ConfigData
from surgery.io import atomic_dir, reserve
from surgery.patch import Patch, PatchRecord, apply_to_config

CAUSAL_LM = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# the config classes' defaults for the fields read here (tested against the classes)
CLASS_DEFAULTS = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
LEGACY_ROPE = ("rope_scaling", "rope_theta")  # folded into rope_parameters, as transformers 5 saves it


def data_config(raw: dict[str, Any]) -> ConfigData | None:
    """The config as data where this module knows its class and every field it reads is well
    formed, else None: transformers' config class then reads (and validates) it."""
    if raw.get("model_type") not in CAUSAL_LM or "quantization_config" in raw or "text_config" in raw:
        return None
    if not well_formed(raw):
        return None
    if not {"intermediate_size", "vocab_size"} <= raw.keys():
        return None
    if any(raw.get(k, CLASS_DEFAULTS[k]) for k in ("attention_bias", "mlp_bias")):
        return None
    if str(raw.get("dtype") or raw.get("torch_dtype") or "float32") not in ("float32", "float16", "bfloat16"):
        return None
    return ConfigData.read(raw)


INTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size")
INTS += ("vocab_size", "max_position_embeddings")


def positive(value: Any, kind: type = int) -> bool:
    """A positive finite number (an int where `kind` is int); not a bool, not beyond a float."""
    number = isinstance(value, kind) if kind is int else isinstance(value, (int, float))
    if not number or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and 0 < value < 1 << 62
    except OverflowError:  # an int too large for a float
        return False


def well_formed(raw: dict[str, Any]) -> bool:
    """The fields this route reads have the types and ranges transformers' classes require, and no
    layout whose reading is the class's own choice (legacy RoPE keys beside rope_parameters, RoPE
    per layer type)."""
    if not all(positive(raw.get(k)) for k in INTS if k in raw):
        return False
    if raw.get("head_dim") is not None and not positive(raw["head_dim"]):
        return False
    if "tie_word_embeddings" in raw and not isinstance(raw["tie_word_embeddings"], bool):
        return False
    if "rms_norm_eps" in raw and not positive(raw["rms_norm_eps"], float):
        return False
    types = raw.get("layer_types")
    if types is not None and types != ["full_attention"] * raw.get("num_hidden_layers", -1):
        return False  # sliding layers, or a list of the wrong length
    rope = raw.get("rope_parameters")
    if "rope_parameters" in raw and rope is None:
        return False  # the class fills in its default RoPE
    if rope is not None:
        if raw.keys() & set(LEGACY_ROPE) or not isinstance(rope, dict):
            return False
        if not isinstance(rope.get("rope_type"), str) or not positive(rope.get("rope_theta"), float):
            return False
    elif "rope_theta" in raw and not positive(raw["rope_theta"], float):
        return False
    return True


def expected_shapes(config: ConfigData) -> dict[str, tuple[int, ...]]:
    """Every parameter the model class builds for `config` with its shape, named as in the
    checkpoint (tied parameters once), as `surgery.models.expected_shapes` lists a skeleton's."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    d, heads, kv = head_dim(config), config.num_attention_heads, kv_heads(config)
    layer = {
        "self_attn.q_proj.weight": (heads * d, h),
        "self_attn.k_proj.weight": (kv * d, h),
        "self_attn.v_proj.weight": (kv * d, h),
        "self_attn.o_proj.weight": (h, heads * d),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    if config.model_type == "qwen2":
        layer |= {f"self_attn.{p}_proj.bias": (n * d,) for p, n in (("q", heads), ("k", kv), ("v", kv))}
    if config.model_type == "qwen3":
        layer |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    shapes["model.norm.weight"] = (h,)
    if not config.to_dict().get("tie_word_embeddings", CLASS_DEFAULTS["tie_word_embeddings"]):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def apply_config_data(
    patches: Sequence[Patch],
    src: Path,
    out: Path,
    *,
    base_model: str | None = None,
    force: bool = False,
) -> list[PatchRecord] | None:
    """Apply config-only `patches` to the checkpoint `src` as data and write `out` (weight files
    cloned, as the skeleton route does), or return None, having written nothing, where the
    skeleton route is needed. A bad checkpoint is refused with the skeleton route's message."""
    from surgery.hub import copy_unchanged, write_metadata

    if not patches or not all(p.config_only and p.config_data for p in patches):
        return None
    raw = check_config(src)
    config = data_config(raw)
    if config is None:
        return None
    with reserve(out, force, [src]):
        shapes = expected_shapes(config)
        headers = weight_files(src)
        check_tensors(src, headers, shapes)
        parameters = sum(math.prod(s) for s in shapes.values())
        records = [apply_to_config(p, config, parameters, dtype_bytes(config)) for p in patches]
        data = {k: v for k, v in config.to_dict().items() if k not in LEGACY_ROPE}
        data["architectures"] = [CAUSAL_LM[config.model_type]]  # never a class name the source made up
        with atomic_dir(out, force, [src]) as tmp:
            copy_unchanged(src, tmp)
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            write_metadata(tmp, config, base_model)
            written = ConfigData.read(json.loads((tmp / "config.json").read_text()))
            for key in ("rope_parameters", "max_position_embeddings"):
                if written is None or getattr(written, key) != getattr(config, key):
                    raise PatchDidNotTakeEffect(f"the written config.json does not read back the same {key}")
    return records


def dtype_bytes(config: ConfigData) -> float:
    """The element size the skeleton route's records count KV bytes in: the config's dtype, which
    the skeleton is built in, or torch's default float32."""
    return KV_DTYPE_BYTES[str(config.to_dict().get("dtype") or "float32")]
