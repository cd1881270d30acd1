"""Reading a checkpoint directory safely, before transformers does.

A checkpoint is data, never code: `config.json` must be JSON of a model type transformers knows
natively (an `auto_map` pointing at custom code is refused, never prompted for), tokenizers must
not need custom classes either, and weights are read from safetensors only (a pickle can run code
when it is unpickled). Every safetensors file is checked before it is copied, streamed or loaded:
its header parses, its tensors tile the data section exactly and the file is as long as the header
says; an index names only shards that exist. A broken input is one line, before anything is
written."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

from surgery.errors import UnsafeInput, did_you_mean

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CODE_SUFFIXES = (".py", ".pyc", ".so")
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def read_json(path: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from `path`, or one line saying what is wrong with the file."""
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as err:
        raise UnsafeInput(
            f"{path} is not valid JSON ({str(err).splitlines()[0]}); {what or 'restore the file'}"
        ) from None
    except OSError as err:
        raise UnsafeInput(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise UnsafeInput(f"{path} holds a JSON {type(data).__name__}, not an object; {what or 'restore the file'}")
    return data


@functools.cache
def generated_model_types() -> frozenset[str]:
    """The model types of transformers' generated table (models/auto/auto_mappings.py), read
    without importing transformers (whose config module imports torch, seconds); empty when this
    transformers has no such file."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    path = Path(spec.submodule_search_locations[0]) / "models" / "auto" / "auto_mappings.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["CONFIG_MAPPING_NAMES"]
            and isinstance(node.value, ast.Call)
            and node.value.args
        ):
            try:
                return frozenset(name for name, _ in ast.literal_eval(node.value.args[0]))
            except (ValueError, TypeError, SyntaxError):
                return frozenset()
    return frozenset()


def known_model_type(model_type: Any) -> bool:
    """Whether transformers has its own config class for `model_type`: the generated table first
    (no torch), then transformers' full mapping, which adds a few types by hand."""
    if not isinstance(model_type, str):
        return False
    return model_type in generated_model_types() or model_type in known_model_types()


def known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def check_config(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a local checkpoint, refused when transformers could only load it
    by running code shipped with it."""
    config = read_json(directory / "config.json", "a checkpoint's config.json must be a JSON object")
    model_type = config.get("model_type")
    if known_model_type(model_type):
        return config  # auto_map, if any, is ignored: transformers' own class is used
    if config.get("auto_map"):
        target = next(iter(config["auto_map"].values()), "?")
        raise UnsafeInput(
            f"{directory} needs custom code to load ({target} via auto_map in config.json); surgery never runs "
            "code from a checkpoint: use a model type transformers supports natively"
        )
    hint = did_you_mean(str(model_type), sorted(known_model_types())) if isinstance(model_type, str) else ""
    raise UnsafeInput(
        f"{directory}/config.json: model_type {model_type!r} is not one transformers knows{hint}"
        if model_type
        else f"{directory}/config.json has no model_type; it is not a transformers checkpoint"
    )


def check_tokenizer(directory: Path) -> None:
    """Refuse a tokenizer that only custom code could build (auto_map to a class transformers lacks)."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    config = read_json(path, "restore tokenizer_config.json or remove it")
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    import transformers

    cls = str(config.get("tokenizer_class") or "")
    if cls and (hasattr(transformers, cls) or hasattr(transformers, cls.removesuffix("Fast"))):
        return  # a native class: the auto_map is ignored
    raise UnsafeInput(
        f"{directory}'s tokenizer needs custom code ({auto_map} in tokenizer_config.json); surgery never runs "
        "code from a checkpoint: use a tokenizer class transformers provides"
    )


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, byte offset where the data starts) of a safetensors file, checked: the header parses
    and the tensors tile the data section exactly, which must end where the file ends."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UnsafeInput(f"{path} is truncated ({size} bytes); restore the file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER, size - 8):
                raise UnsafeInput(f"{path} is corrupt or truncated (header of {length} bytes in a {size}-byte file)")
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError):
        raise UnsafeInput(f"{path} has a corrupt header (not JSON); restore the file") from None
    except OSError as err:
        raise UnsafeInput(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(header, dict):
        raise UnsafeInput(f"{path} has a corrupt header; restore the file")
    end = 0
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(o) for o in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            nbytes = DTYPE_BYTES[info["dtype"]] * count
        except (KeyError, TypeError, ValueError):
            raise UnsafeInput(f"{path}: tensor {name!r} has a malformed entry; restore the file") from None
        if stop - begin != nbytes or begin < 0:
            raise UnsafeInput(f"{path}: tensor {name!r} spans {stop - begin} bytes, its shape needs {nbytes}")
        spans.append((begin, stop))
        end = max(end, stop)
    position = 0
    for begin, stop in sorted(spans):
        if begin != position:
            raise UnsafeInput(f"{path}: tensors overlap or leave gaps; the file is corrupt")
        position = stop
    if 8 + length + end != size:
        raise UnsafeInput(
            f"{path} is {size} bytes but its header describes {8 + length + end}; the file is truncated or corrupt"
        )
    return header, 8 + length


def weight_files(directory: Path, required: bool = True) -> dict[Path, dict[str, Any]]:
    """The safetensors files of a checkpoint with their headers, each checked; an index must name
    only shards that exist and tensors those shards hold. Refuses a checkpoint with pickle weights
    only, and (when `required`) one with no weights at all."""
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickles = [f.name for f in sorted(directory.iterdir()) if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UnsafeInput(
                f"{directory} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "surgery reads safetensors only: convert it with a tool you trust"
            )
        if required:
            raise UnsafeInput(f"{directory} has no weights (*.safetensors); pass a complete checkpoint")
    headers = {shard: read_header(shard)[0] for shard in shards}
    names = {shard.name: header for shard, header in headers.items()}
    index = directory / INDEX
    if index.is_file():
        weight_map = read_json(index, "restore the index or remove it").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnsafeInput(f"{index} has no weight_map; restore the file")
        missing = sorted({str(f) for f in weight_map.values()} - set(names))
        if missing:
            raise UnsafeInput(
                f"{index} lists {', '.join(missing)}, missing from {directory}; the checkpoint is incomplete"
            )
        absent = sorted(name for name, shard in weight_map.items() if name not in names[shard])
        if absent:
            raise UnsafeInput(f"{index} places {absent[0]} in {weight_map[absent[0]]}, which does not hold it")
    return headers


def check_tensors(directory: Path, headers: dict[Path, dict[str, Any]], expected: dict[str, tuple[int, ...]]) -> None:
    """Every parameter the config implies is present with its shape (`expected`, from a meta
    skeleton), so nothing is silently left at random initialisation or converted wrong. `headers`
    are the checked ones `weight_files` returned."""
    found = {k: tuple(v["shape"]) for h in headers.values() for k, v in h.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UnsafeInput(
            f"{directory} lacks the tensor {missing[0]}{more} its config needs; the checkpoint is incomplete"
        )
    wrong = sorted(n for n in expected if found[n] != expected[n])
    if wrong:
        name = wrong[0]
        raise UnsafeInput(
            f"{directory}: {name} has shape {list(found[name])}, its config needs {list(expected[name])}; "
            "the weights do not match config.json"
        )


def auto_map_of(path: Path) -> Any:
    """The top-level `auto_map` of a JSON file (a pointer at custom code), or None."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # not JSON: nothing transformers would follow
    return data.get("auto_map") if isinstance(data, dict) else None


def carried_over(path: Path) -> bool:
    """Whether a file of a source checkpoint may be copied into an output: never code or pickles."""
    return path.is_file() and path.suffix not in CODE_SUFFIXES + PICKLE_SUFFIXES


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts as a GGUF file does."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
