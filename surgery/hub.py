"""Writing results: atomic checkpoint directories, the `surgery.json` manifest, the model card,
and the config-only fast path for patches that never touch weights."""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from surgery.checkpoint import auto_map_of, carried_over, is_gguf
from surgery.errors import UnsafeInput, reason
from surgery.io import atomic_dir, clone_file, reserve
from surgery.models import SOURCE_FILE, checked_skeleton
from surgery.patch import Patch, PatchRecord, get_patch, history

log = logging.getLogger(__name__)

MANIFEST = "surgery.json"
NOT_COPIED = {"config.json", "README.md", MANIFEST, SOURCE_FILE}  # rewritten, not carried over


def manifest(config: Any, base_model: str | None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "base_model": base_model,
        **({"run": run} if run else {}),
        "patches": history(config),
        "versions": {
            "surgery": installed("surgery"),
            "transformers": installed("transformers"),
            "torch": installed("torch"),  # read without importing torch (the config route never does)
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def installed(package: str) -> str:
    """A package's installed version from its metadata; by import where it is not pip's (conda)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        import importlib

        return str(getattr(importlib.import_module(package), "__version__", "unknown"))


def model_card(config: Any, base_model: str | None, extra: str = "", evals: Sequence[tuple[str, Any]] = ()) -> str:
    """A README.md for the Hub: metadata header, what was done, how to load it, and `extra`
    markdown (a recipe run adds the recipe and its before/after table). The header holds what the
    Hub reads: `base_model` and `base_model_relation` (for a Hub id), `library_name`, `tags`
    (surgery and each patch), and a `model-index` of `evals`, (stage label, eval result) pairs."""
    from huggingface_hub import ModelCardData

    records = [PatchRecord(**r) for r in history(config)]
    is_hub_id = bool(base_model) and base_model.count("/") == 1 and not base_model.startswith((".", "/"))
    name = f"{Path(str(base_model or 'model')).name}-" + "-".join(dict.fromkeys(r.name for r in records) or ["surgery"])
    results = eval_results(evals)
    data = ModelCardData(
        base_model=base_model if is_hub_id else None,
        base_model_relation=base_model_relation(records) if is_hub_id else None,
        library_name="transformers",
        tags=["surgery", *dict.fromkeys(r.name for r in records)],
        model_name=name if results else None,
        eval_results=results or None,
    )
    rows = "\n".join(
        f"| {i} | `{r.name}` | {', '.join(f'{k}={v}' for k, v in r.params.items())} | {r.persist} | "
        f"{r.kv_bytes_per_token_before} → {r.kv_bytes_per_token_after} | {'; '.join(r.notes)} |"
        for i, r in enumerate(records, 1)
    )
    runtime = any(r.persist == "runtime" for r in records)
    loader = (
        'import surgery\nmodel, tokenizer = surgery.load_model("PATH_OR_REPO")'
        if runtime
        else "from transformers import AutoModelForCausalLM\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")'
    )
    return f"""---
{data.to_yaml()}
---

# {Path(str(base_model or "model")).name} after surgery

Base model: `{base_model}`. Rewritten with [surgery](https://pypi.org/project/surgery/); the full
record of each step is in `surgery.json` and in `config.json` under `surgery`.

| # | patch | parameters | persists via | KV bytes/token | notes |
|---|---|---|---|---|---|
{rows}

```python
{loader}
```
{extra}"""


QUANTIZING = {"kv-quant"}  # patches that only change how numbers are stored


def base_model_relation(records: Sequence[PatchRecord]) -> str:
    """How the Hub should relate the model to its base: `quantized` when every patch only changes
    how numbers are stored (a KV-cache format), else `finetune`: a derived model whose weights or
    computation changed. surgery saves merged weights, so never `adapter`; never `merge`."""
    return "quantized" if records and all(r.name in QUANTIZING for r in records) else "finetune"


def eval_results(evals: Sequence[tuple[str, Any]]) -> list[Any]:
    """`model-index` entries: every finite metric of each (stage label, eval result), named with its
    stage ("perplexity.ppl@2048 (before)"), on the dataset the eval read (its text source)."""
    from huggingface_hub import EvalResult

    out = []
    for label, result in evals:
        source = result.params.get("text") or result.params.get("tasks") or result.name
        dataset = ",".join(map(str, source)) if isinstance(source, list) else str(source)
        for metric, value in result.metrics.items():
            if math.isfinite(value):
                out.append(
                    EvalResult(
                        task_type="text-generation",
                        dataset_type=f"surgery/{result.name}",
                        dataset_name=dataset,
                        metric_type=metric,
                        metric_value=float(value),
                        metric_name=f"{metric} ({label})",
                    )
                )
    return out


def edit_json(path: Path, **changes: Any) -> None:
    """Set keys of a JSON file in place; a value of None removes the key."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_metadata(
    directory: Path,
    config: Any,
    base_model: str | None,
    card_extra: str = "",
    run: dict[str, Any] | None = None,
    evals: Sequence[tuple[str, Any]] = (),
) -> None:
    """surgery.json, README.md, and config.json keys that save_pretrained leaves out (each applied
    patch says which: `Patch.saved_config`). No output points at custom code: `auto_map` is dropped
    from every JSON file, whether the writer saved it or carried it over (a carried-over file is a
    copy-on-write clone, so the source keeps its bytes)."""
    extra: dict[str, Any] = {}
    for record in history(config):
        extra.update(get_patch(record["name"]).saved_config(config))
    edit_json(directory / "config.json", **extra)
    for path in sorted(directory.glob("*.json")):
        if auto_map_of(path) is not None:
            edit_json(path, auto_map=None)
    (directory / MANIFEST).write_text(json.dumps(manifest(config, base_model, run), indent=2) + "\n")
    (directory / "README.md").write_text(model_card(config, base_model, card_extra, evals))


def default_base_model(model: Any) -> str | None:
    """Where a loaded model came from: the recorded base of a surgery checkpoint or converted GGUF,
    else its name_or_path."""
    from surgery.models import base_model_of_dir

    ref = getattr(model, "name_or_path", "") or ""
    return base_model_of_dir(Path(ref)) if ref and Path(ref).is_dir() else ref or None


def save(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    *,
    base_model: str | None = None,
    force: bool = False,
    card_extra: str = "",
    files: dict[str, str] | None = None,
    sources: Iterable[str | Path] = (),
    run: dict[str, Any] | None = None,
    evals: Sequence[tuple[str, Any]] = (),
) -> Path:
    """Save weights, tokenizer, config, manifest and model card atomically to `out`. `base_model`
    defaults to where the model was loaded from (see `default_base_model`); `card_extra` is
    appended to the model card and `files` ({name: text}) written beside (e.g. the recipe).
    `sources` are directories `out` must never replace (the model's own is always one); `run`
    identifies the recipe run and step that wrote it, so a resumed run may replace it; `evals`,
    (stage label, eval result) pairs, fill the card's model-index."""
    out = Path(out)
    base_model = base_model or default_base_model(model)
    origin = getattr(model, "name_or_path", "") or ""
    sources = [*sources, *([origin] if origin and Path(origin).is_dir() else [])]
    with atomic_dir(out, force, sources) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        finish(tmp, model.config, base_model, card_extra, run, files, evals)
    log.info("saved %s", out)
    return out


def finish(
    tmp: Path,
    config: Any,
    base_model: str | None,
    card_extra: str,
    run: dict[str, Any] | None,
    files: dict[str, str] | None,
    evals: Sequence[tuple[str, Any]] = (),
) -> None:
    """What every save writes beside the weights: metadata, model card, and the given files."""
    write_metadata(tmp, config, base_model, card_extra, run, evals)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)


def save_from_disk(
    src: Path,
    out: str | Path,
    *,
    base_model: str | None = None,
    force: bool = False,
    card_extra: str = "",
    files: dict[str, str] | None = None,
    sources: Iterable[str | Path] = (),
    run: dict[str, Any] | None = None,
    evals: Sequence[tuple[str, Any]] = (),
) -> Path:
    """`save` of a checkpoint that is already on disk (a stage of surgery's own), without loading
    it: weight and tokenizer files cloned, config and metadata rewritten as `save` writes them."""
    from transformers import AutoConfig

    out, src = Path(out), Path(src)
    config = AutoConfig.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    with atomic_dir(out, force, [*sources, src]) as tmp:
        copy_unchanged(src, tmp)
        config.save_pretrained(tmp)
        finish(tmp, config, base_model, card_extra, run, files, evals)
    log.info("saved %s (from %s, not loaded)", out, src)
    return out


def apply_config_only(
    patch: Patch,
    src: Path,
    out: str | Path,
    *,
    base_model: str | None = None,
    force: bool = False,
    consume: bool = False,
) -> tuple[Path, PatchRecord]:
    """Apply a config-only patch to a checkpoint on disk without reading its weights: the patch
    runs on a skeleton (meta parameters, real rotary buffers) so it is checked and verified exactly
    as in memory; then the new config is written next to clones of the weight files (`consume`:
    moved instead, from a stage of surgery's own that is discarded next)."""

    assert patch.config_only, f"{patch.name} changes weights"
    out, src = Path(out), Path(src)
    with reserve(out, force, [src]):
        model, _, dtype = checked_skeleton(src)  # a corrupt or incomplete checkpoint is refused, not copied
        record = patch.apply(model)
        model.config.dtype = dtype  # from_config would otherwise record the skeleton's float32
        with atomic_dir(out, force, [src]) as tmp:
            copy_unchanged(src, tmp, move=consume)
            model.config.save_pretrained(tmp)
            write_metadata(tmp, model.config, base_model)
    return out, record


def copy_unchanged(src: Path, dst: Path, skip: Iterable[str] = (), move: bool = False) -> None:
    """Carry over the files of a checkpoint that a patch leaves alone: never code or pickles, nor
    the files the writer regenerates. `move` renames them instead (a stage about to be discarded)."""
    for f in sorted(src.iterdir()):
        if carried_over(f) and f.name not in NOT_COPIED and f.name not in skip:
            if move:
                f.replace(dst / f.name)
            else:
                clone_file(f, dst / f.name)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    api: Any = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    gguf: Sequence[str | Path] = (),
) -> str:
    """Upload a saved checkpoint directory, and the `gguf` files exported from it, to the Hub in one
    commit through huggingface_hub, and return its URL (the pull request's with `create_pr`: the
    commit is proposed, not made on the branch). `api` defaults to `HfApi()`, which finds the
    token itself (HF_TOKEN or the login cache): this function never reads, prints or stores it.
    Tests inject an API object writing a local folder."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from surgery.errors import SurgeryError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SurgeryError(f"{folder} is not a saved model (no config.json); push a directory written by save")
    refuse_foreign(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise SurgeryError(f"repository id '{repo_id}' must look like user/name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise SurgeryError(f"repository id '{repo_id}' is not valid: {str(err).splitlines()[0]}") from None
    files = {str(f.relative_to(folder)): f for f in sorted(folder.rglob("*")) if f.is_file() and not hidden(f, folder)}
    added: dict[str, Path] = {}
    for extra in map(Path, gguf):
        if not extra.exists():
            raise SurgeryError(f"--gguf {extra}: no such file")
        if extra.is_symlink() or not extra.is_file() or not is_gguf(extra):
            raise SurgeryError(f"{extra} is not a GGUF file; pass one written by `surgery export gguf`")
        problem = gguf_mismatch(extra, folder)
        if problem:
            raise SurgeryError(f"--gguf {extra}: {problem}; export it from {folder} with `surgery export gguf`")
        if extra.name in added:
            if added[extra.name].resolve() == extra.resolve():
                continue  # the same file named twice
            raise SurgeryError(f"two GGUF files are named {extra.name}; rename one")
        if extra.name in files:
            raise SurgeryError(f"{folder} already holds a file named {extra.name}; rename the GGUF")
        added[extra.name] = extra
    files |= added
    api = api if api is not None else HfApi()
    message = commit_message or f"surgery: {', '.join(r['name'] for r in read_patches(folder)) or 'upload'}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id=repo_id,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(f)) for name, f in files.items()],
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except Exception as err:  # HTTP errors, and the HTTP client's own connection errors (not OSError)
        raise SurgeryError(
            f"push to {repo_id} failed: {reason(err)}; check `hf auth login` or HF_TOKEN and your network"
        ) from None
    url = f"https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else "")
    url = (getattr(info, "pr_url", None) or url) if create_pr else url
    log.info("pushed %s to %s", folder, url)
    return url


def hidden(path: Path, root: Path) -> bool:
    """A dot-file or a file in a dot-directory (locks, caches): never uploaded."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def refuse_foreign(folder: Path) -> None:
    """Never publish code, pickles or pointers at custom code: a folder holding any is refused."""
    for f in sorted(folder.rglob("*")):
        if f.is_symlink():
            raise UnsafeInput(f"{folder}/{f.relative_to(folder)} is a symbolic link; surgery pushes regular files only")
        if f.is_file() and not carried_over(f):
            raise UnsafeInput(f"{folder} holds {f.relative_to(folder)} (code or a pickle); surgery pushes neither")
        if f.suffix == ".json" and auto_map_of(f) is not None:
            raise UnsafeInput(f"{folder}/{f.relative_to(folder)} points at custom code (auto_map); remove it first")


def gguf_mismatch(path: Path, folder: Path) -> str | None:
    """Why a GGUF file is not an export of the checkpoint in `folder` (None when it is): unreadable,
    not written by surgery, or a header whose shape or patch list differs from the config's."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
        values = {k: fields[k].contents() for k in fields if not k.startswith("tokenizer.")}
        config = json.loads((folder / "config.json").read_text())
    except Exception as err:  # the reader raises ValueError, KeyError, struct and numpy errors
        return f"it is not a complete GGUF file ({type(err).__name__})"
    if "surgery.patches" not in values:
        return "it was not written by surgery (no surgery.patches key)"
    arch = values.get("general.architecture")
    text = config.get("text_config") or config
    want = {
        "block_count": text.get("num_hidden_layers"),
        "embedding_length": text.get("hidden_size"),
        "attention.head_count": text.get("num_attention_heads"),
        "attention.head_count_kv": text.get("num_key_value_heads") or text.get("num_attention_heads"),
    }
    for key, expected in want.items():
        got = values.get(f"{arch}.{key}")
        if expected is not None and got != expected:
            return f"its {key.split('.')[-1]} is {got}, the checkpoint's {expected}: it was exported from another model"
    patches = [r.get("name") for r in (config.get("surgery") or []) if isinstance(r, dict)]
    if json.loads(values["surgery.patches"]) != patches:
        return f"it records the patches {values['surgery.patches']}, the checkpoint {json.dumps(patches)}"
    return None


def read_patches(folder: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("patches", [])
    except (OSError, ValueError):
        return []
