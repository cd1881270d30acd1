"""`surgery export gguf`: a saved checkpoint of the Llama family (Llama, Mistral, Qwen2, Qwen3) as one
GGUF file for llama.cpp and Ollama, written with the `gguf` package's writer and tensor-name map.

- Tensors stream one at a time from the safetensors shards (memory holds one tensor), in f32, f16
  or q8_0 (2-D weights; norms and biases stay f32, as llama.cpp's own converter writes them).
  llama.cpp's Llama layout stores q/k rows interleaved per head: they are permuted as its
  converter does (transformers' GGUF loader undoes exactly that).
- What the patches did goes into the metadata where llama.cpp can say it: the kv-head count after
  pooling, the RoPE base (static NTK is a base change), linear and YaRN scaling with their factor
  and original context, llama3 scaling as the `rope_freqs` factors tensor.
- What it cannot say (a runtime cache or attention route, dynamic NTK, a sliding window on the
  Llama layout, a custom YaRN attention factor) refuses the export in one line naming it, or, with
  `allow_loss`, is exported without it and named in a warning.
- The tokenizer (byte-level BPE or SentencePiece), its special tokens and merges, and the chat
  template go in with the `gguf` package's vocab readers.
The file is written beside its target under a temporary name and renamed into place."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint import is_gguf
from surgery.errors import SurgeryError, UnsupportedModel, did_you_mean
from surgery.io import atomic_file, progress
from surgery.patch import history

log = logging.getLogger(__name__)

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # model_type -> GGUF arch
PERMUTED = {"llama"}  # GGUF archs whose q/k rows llama.cpp keeps interleaved (GPT-J style rotation)
TYPES = ("f32", "f16", "q8_0")
# the `tokenizer.ggml.pre` names llama.cpp's BPE vocab loader knows (src/llama-vocab.cpp, late 2025);
# any other name makes it warn and fall back to its default split, or refuse the file
PRE_TOKENIZERS = (
    "default", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "mpt", "starcoder", "gpt-2", "phi-2", "jina-es",
    "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "jina-v1-en", "jina-v2-code",
    "roberta-bpe", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "olmo", "dbrx",
    "smaug-bpe", "poro-chat", "glm4", "chatglm-bpe", "viking", "jais", "tekken", "smollm", "codeshell", "bloom",
    "gpt3-finnish", "exaone", "exaone4", "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4", "superbpe",
    "trillion", "granite-docling", "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder", "hunyuan",
    "hunyuan-dense", "kimi-k2", "grok-2", "afmoe", "minimax-m2",
)  # fmt: skip


@dataclass
class Exported:
    path: Path
    type: str
    bytes: int
    tensors: int
    seconds: float
    lost: list[str]


def lost_in_gguf(config: Any) -> list[str]:
    """What llama.cpp cannot express of this (patched) model, one phrase each."""
    from surgery.arch import layer_windows

    lost = []
    for record in history(config):
        if record["persist"] == "runtime":
            lost.append(
                f"{record['name']} (a runtime route surgery.load_model re-attaches; llama.cpp has no equivalent)"
            )
        elif record["name"] == "kv-quant":
            lost.append("kv-quant fp8 (llama.cpp chooses its KV cache type at run time: -ctk/-ctv)")
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind == "dynamic":
        lost.append("dynamic-ntk RoPE (llama.cpp has no dynamic NTK; it would run the original RoPE)")
    elif kind == "yarn" and rope.get("attention_factor") is not None:
        lost.append(f"yarn attention_factor={rope['attention_factor']} (llama.cpp derives it from the factor)")
    elif kind not in ("default", "linear", "yarn", "llama3"):
        lost.append(f"RoPE type {kind}")
    if any(layer_windows(config)):
        lost.append("the sliding window (llama.cpp's Llama layout attends to the whole context)")
    return lost


def export_gguf(
    src: str | Path,
    out: str | Path,
    *,
    type: str = "f16",
    force: bool = False,
    allow_loss: bool = False,
    tokenizer_pre: str | None = None,
    warn: Callable[[str], None] = log.warning,
) -> Exported:
    """Write the checkpoint at `src` (a saved directory, or anything `surgery.load_model` resolves
    to one) as the GGUF file `out`; see the module docstring."""
    import gguf

    from surgery.models import checked_skeleton, local_dir, resolve

    if type not in TYPES:
        raise SurgeryError(f"unknown GGUF type '{type}'; choose from {', '.join(TYPES)}")
    if tokenizer_pre is not None and tokenizer_pre not in PRE_TOKENIZERS:
        raise SurgeryError(
            f"--tokenizer-pre '{tokenizer_pre}' is not a pre-tokenizer llama.cpp knows"
            f"{did_you_mean(tokenizer_pre, list(PRE_TOKENIZERS))} (llama.cpp would fall back to its default split)"
        )
    start = time.perf_counter()
    source = resolve(str(src))
    if source.kind == "hub":
        raise SurgeryError(f"export reads a local checkpoint; download {src} to a directory first")
    out = Path(out)
    if out.suffix != ".gguf":
        raise SurgeryError(f"{out}: name the output FILE.gguf")
    check_file_target(out, force, source.paths())  # before a GGUF source is converted (seconds, a cache entry)
    here = local_dir(source)
    assert here is not None
    sources = [here, *source.paths()]
    check_file_target(out, force, sources)
    model, headers, _ = checked_skeleton(here)  # custom code, damaged shards, missing tensors: refused here
    config = model.config
    if config.model_type not in ARCH:
        raise UnsupportedModel(f"export gguf supports model types {', '.join(ARCH)}; got '{config.model_type}'")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "yarn":
        checked_yarn(rope)  # before anything is written
    lost = lost_in_gguf(config)
    if lost and not allow_loss:
        raise SurgeryError(
            f"GGUF cannot express {'; '.join(lost)}; export without it with --allow-loss, or export the model "
            "before that patch"
        )
    vocab = read_vocab(here, config.vocab_size)
    pre = tokenizer_pre or gguf_pre_of(here)
    warnings = [f"the GGUF file leaves out: {item}" for item in lost]
    if pre is None:
        pre = "default"
        warnings.append(
            "llama.cpp picks its pre-tokenizer by name, which the checkpoint does not record; it will use "
            "its default: pass --tokenizer-pre NAME (e.g. llama-bpe, qwen2, smollm) for exact tokenization"
        )
    arch = ARCH[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors = plan_tensors(model, headers, names, type)
    extra = rope_freqs(config)
    with atomic_file(out, lambda target: check_file_target(target, force, sources)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        write_metadata(writer, config, here, type, source.base_model)
        write_vocab(writer, here, vocab, pre)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.np_dtype, t.nbytes, raw_dtype=t.qtype)
        if extra is not None:
            writer.add_tensor_info("rope_freqs.weight", extra.shape, extra.dtype, extra.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = progress(len(tensors), f"export {out.name}", unit="tensor")
        for t in tensors:
            writer.write_tensor_data(t.convert())
            bar.update(1)
        bar.close()
        if extra is not None:
            writer.write_tensor_data(extra)
        writer.close()
    for line in warnings:  # said once the file exists, so a refusal stays one line
        warn(line)
    count = len(tensors) + (extra is not None)
    return Exported(out, type, out.stat().st_size, count, time.perf_counter() - start, lost)


WRITTEN_BY = "surgery.patches"  # every GGUF surgery writes holds this key; --force replaces only those


def check_file_target(out: Path, force: bool, sources: list[Path]) -> None:
    """An output file may replace only a GGUF file that surgery wrote (it holds `surgery.patches`),
    and only with `force`; never a directory, a link or a special file, never the source or a
    file inside the checkpoint it is exported from, and never a model file any reference resolves
    to (the embedded models' files, the converted cache)."""
    try:
        target = out.resolve()
        for source in sources:
            if target == source.resolve() or target.is_relative_to(source.resolve()):
                raise SurgeryError(f"{out} is the source or inside the checkpoint it exports; write it elsewhere")
        for model in protected_paths():
            if target == model.resolve() or target.is_relative_to(model.resolve()):
                raise SurgeryError(
                    f"{out} is inside {model}, which holds an embedded model or the converted cache; write it elsewhere"
                )
        if out.is_dir():
            raise SurgeryError(f"{out} is a directory; name the output FILE.gguf")
        if out.exists() or out.is_symlink():
            if not force:
                raise SurgeryError(f"{out} already exists; pass --force to replace it")
            if out.is_symlink() or not out.is_file() or not is_gguf(out):
                raise SurgeryError(f"{out} is not a GGUF file; --force replaces only a GGUF file: remove it yourself")
            if not written_by_surgery(out):
                raise SurgeryError(
                    f"{out} is a GGUF file surgery did not write; --force replaces only surgery's own exports: "
                    "remove it yourself or choose another output"
                )
    except OSError as err:  # a name too long, a loop of links, ...
        raise SurgeryError(f"cannot use {out} as an output: {err.strerror}; choose another output") from None


def protected_paths() -> list[Path]:
    """Files and folders no export may write into: each installed embedded model's file and its
    package, and the cache of converted models."""
    import importlib.util

    from surgery.models import BUILTIN, cache_dir

    out = [cache_dir() / "models"]
    for builtin in BUILTIN.values():
        spec = importlib.util.find_spec(builtin.package)
        if spec is not None and spec.submodule_search_locations:
            out.append(Path(spec.submodule_search_locations[0]))
    return out


def written_by_surgery(path: Path) -> bool:
    """Whether a GGUF file holds surgery's own metadata key (its header alone is read)."""
    import gguf

    try:
        return WRITTEN_BY in gguf.GGUFReader(path).fields
    except Exception:  # the reader raises ValueError, KeyError, struct and numpy errors for a damaged file
        return False


@dataclass
class Tensor:
    """One checkpoint tensor on its way into the GGUF file."""

    name: str  # GGUF name
    hf_name: str
    shard: Path
    shape: tuple[int, ...]  # as stored in GGUF: the numpy shape of the converted array
    qtype: Any
    np_dtype: Any
    nbytes: int
    heads: int | None  # rows are permuted in this many head groups (q/k of the Llama layout)

    def convert(self) -> Any:
        import gguf
        import numpy as np
        from safetensors import safe_open

        with safe_open(self.shard, framework="pt") as f:
            data = f.get_tensor(self.hf_name).float().numpy()
        if self.heads:
            data = permute(data, self.heads)
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return data.astype(np.float32)
        if self.qtype == gguf.GGMLQuantizationType.F16:
            return data.astype(np.float16)
        return gguf.quants.quantize(data, self.qtype)


def permute(weights: Any, heads: int) -> Any:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved (its converter's
    `permute`; transformers' GGUF loader applies the inverse)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def plan_tensors(model: Any, headers: dict[Path, dict[str, Any]], names: Any, type: str) -> list[Tensor]:
    """Every parameter of the skeleton (tied ones once) with its shard (from the checked headers),
    GGUF name, type and size."""
    import gguf
    import numpy as np

    where = {name: shard for shard, header in headers.items() for name in header if name != "__metadata__"}
    config = model.config
    arch = ARCH[config.model_type]
    out = []
    for hf_name, param in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModel(f"export gguf: no GGUF name for {hf_name}")
        shape = tuple(param.shape)
        quantize = (
            type == "q8_0"
            and len(shape) == 2
            and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
        )
        if type == "f32" or len(shape) == 1:
            qtype, dtype = gguf.GGMLQuantizationType.F32, np.float32
        elif quantize:
            qtype, dtype = gguf.GGMLQuantizationType.Q8_0, np.uint8
        else:
            qtype, dtype = gguf.GGMLQuantizationType.F16, np.float16
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            stored = tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
            nbytes = math.prod(stored)
        else:
            stored, nbytes = shape, math.prod(shape) * np.dtype(dtype).itemsize
        heads = None
        if arch in PERMUTED and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
        out.append(Tensor(name, hf_name, where[hf_name], stored, qtype, dtype, nbytes, heads))
    return out


def write_metadata(writer: Any, config: Any, here: Path, type: str, base_model: str | None) -> None:
    import gguf

    from surgery.arch import head_dim, kv_heads

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{Path(str(base_model or here.name)).name} (surgery)")
    if base_model and base_model.count("/") == 1:
        writer.add_base_model_count(1)
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    writer.add_file_type(file_type.get(type, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        yarn = checked_yarn(rope)
        writer.add_rope_scaling_yarn_beta_fast(float(yarn.beta_fast))
        writer.add_rope_scaling_yarn_beta_slow(float(yarn.beta_slow))
    # llama3: no scaling type; the factors travel as the rope_freqs tensor, as llama.cpp writes it
    writer.add_string(WRITTEN_BY, json.dumps([r["name"] for r in history(config)]))
    writer.add_string("surgery.rope_parameters", json.dumps(rope))  # exact, for surgery's own loader


def checked_yarn(rope: dict[str, Any]) -> Any:
    """A checkpoint's YaRN parameters held to the bounds `surgery apply yarn` keeps (absent ones
    take its defaults; present ones, 0 included, are kept or refused, never replaced)."""
    import surgery.patches.rope  # noqa: F401  (registers yarn)
    from surgery.patch import make_patch

    names = ("factor", "beta_fast", "beta_slow", "attention_factor")
    try:
        return make_patch("yarn", **{k: rope[k] for k in names if rope.get(k) is not None})
    except SurgeryError as err:
        raise SurgeryError(f"the checkpoint's yarn RoPE parameters are out of range ({err}); fix config.json") from None


def rope_freqs(config: Any) -> Any:
    """llama3 scaling as llama.cpp stores it: per frequency, the divisor of the unscaled frequency
    (both as transformers computes them)."""
    import numpy as np
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if config.rope_parameters.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    dim = scaled.numel() * 2
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled).numpy().astype(np.float32)


@dataclass
class Vocab:
    model: str  # gpt2 (byte-level BPE) or llama (SentencePiece)
    tokens: list[bytes]
    scores: list[float]
    types: list[Any]


def read_vocab(here: Path, vocab_size: int) -> Vocab:
    """Tokens with their types (special tokens as control) and scores, read by the `gguf` package's
    own vocab classes; padded with unused placeholders up to the embedding's rows, as llama.cpp's
    converter pads. A tokenizer with more tokens than the embedding has rows is refused."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    try:
        vocab: Any = BpeVocab(here)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        try:
            vocab = LlamaHfVocab(here)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            raise UnsupportedModel(
                f"export gguf reads byte-level BPE or SentencePiece tokenizers; {here} has neither ({err})"
            ) from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise UnsupportedModel(
            f"{here}: the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows; "
            "export a checkpoint whose tokenizer matches it"
        )
    for token_id in special_ids(here):
        if token_id < len(types):
            types[token_id] = gguf.TokenType.CONTROL
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return Vocab(vocab.tokenizer_model, tokens, scores, types)


def write_vocab(writer: Any, here: Path, vocab: Vocab, pre: str) -> None:
    """The vocabulary, then merges (BPE), special token ids, BOS/EOS behaviour and the chat
    template through the `gguf` package's SpecialVocab."""
    from gguf.vocab import SpecialVocab

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model != "gpt2":
        writer.add_token_scores(vocab.scores)
    special = SpecialVocab(here, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    special.add_special_token["bos"], special.add_special_token["eos"] = adds_bos_eos(here)
    special.add_to_gguf(writer)


def special_ids(here: Path) -> list[int]:
    """Ids of the tokens the tokenizer marks special (tokenizer.json's added tokens)."""
    try:
        added = json.loads((here / "tokenizer.json").read_text()).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [int(t["id"]) for t in added if isinstance(t, dict) and t.get("special") and "id" in t]


def adds_bos_eos(here: Path) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before, and EOS after, what it encodes: llama.cpp's default
    differs by vocab type, so the file says it explicitly."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(here, local_files_only=True, trust_remote_code=False)
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def gguf_pre_of(here: Path) -> str | None:
    """The pre-tokenizer name of the GGUF this checkpoint was converted from, when it was."""
    import gguf

    from surgery.models import SOURCE_FILE

    try:
        origin = json.loads((here / SOURCE_FILE).read_text()).get("gguf")
        reader = gguf.GGUFReader(origin)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    field = reader.fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None
