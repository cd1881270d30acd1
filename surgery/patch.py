"""The Patch protocol: a patch class *is* its parameters (a frozen pydantic model), registered by
name in `PATCHES`. Authors write `rewrite` and `verify` (and `check` for what the architecture list
does not cover); the shared `apply` checks the architecture, runs check -> rewrite -> verify and
appends a `PatchRecord` to `model.config.surgery`, so provenance travels with `config.json`. A
patch without its own `verify` does not register: every patch proves its effect."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from surgery.arch import kv_bytes_per_token, text_config
from surgery.errors import (
    InvalidParams,
    SurgeryError,
    UnknownPatch,
    UnsupportedModel,
    did_you_mean,
    numbers_not_bools,
    validation_problems,
)
from surgery.lazy import torch

log = logging.getLogger(__name__)

Persist = Literal["config", "runtime"]


class PatchRecord(BaseModel):
    """What one patch did to one model; stored as a dict in `config.surgery`."""

    name: str
    params: dict[str, Any]
    persist: Persist
    config_diff: dict[str, dict[str, Any]] = Field(
        description="top-level config keys that changed: {key: {before, after}}"
    )
    parameters_before: int
    parameters_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    notes: list[str] = []
    details: dict[str, Any] = {}


class Snapshot(BaseModel):
    """State of a model before a patch, for diffing and verification."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    config: dict[str, Any]
    parameters: int
    kv_bytes_per_token: int
    buffers: dict[str, Any]  # name -> tensor


def snapshot(model: torch.nn.Module) -> Snapshot:
    config = model.config.to_dict()
    config.pop("surgery", None)
    dtype = next(model.parameters()).dtype
    return Snapshot(
        config=config,
        parameters=sum(p.numel() for p in model.parameters()),
        kv_bytes_per_token=kv_bytes_per_token(model.config, dtype.itemsize),
        buffers={n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"},
    )


def config_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = sorted(set(before) | set(after))
    return {k: {"before": before.get(k), "after": after.get(k)} for k in keys if before.get(k) != after.get(k)}


@dataclasses.dataclass
class Context:
    """One application of a patch: what it may read (the tokenizer, for calibration text) and
    what it leaves for `details` (`state`). Patches are frozen; per-application state lives here."""

    tokenizer: Any = None
    state: dict[str, Any] = dataclasses.field(default_factory=dict)


class Patch(BaseModel):
    """Base class of every patch. Subclasses declare fields (the parameters) and class attributes."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_not_bools(cls, data: Any) -> Any:
        return numbers_not_bools(cls, data)

    name: ClassVar[str]
    """Registry key as typed on the CLI (`yarn`, `gqa`, `sliding-window`)."""
    persist: ClassVar[Persist] = "config"
    """`config`: config + weights describe the result; `runtime`: re-applied by `load_model`."""
    config_only: ClassVar[bool] = False
    """True when the patch changes only the config and derived buffers: a checkpoint on disk can
    be patched without reading its weights."""
    examples: ClassVar[list[dict[str, Any]]] = []
    """Valid parameter sets; each enrols the patch in the generic tests."""
    architectures: ClassVar[tuple[str, ...]] = ()
    """model_type values the patch is tested on (shown by `surgery list`)."""
    streamable: ClassVar[bool] = False
    """True when `tensor_transform` can convert a checkpoint on disk one tensor at a time."""
    config_data: ClassVar[bool] = False
    """True when a config-only patch can also run on config.json read as data (`check_config`,
    `rewrite_config`, `verify_config`): the config route then imports neither torch nor
    transformers' model code. Its result must equal the patch applied to a skeleton (tested)."""

    def check(self, model: torch.nn.Module) -> None:
        """Raise `UnsupportedModel` (why, and what would work) if this patch cannot run, beyond
        the architecture list, which `apply` checks itself."""

    def check_config(self, config: Any) -> None:
        """`check` on the config alone, for `config_data` patches."""
        raise NotImplementedError(f"{self.name} needs the model to check")

    def rewrite_config(self, config: Any, ctx: Context) -> list[str]:
        """`rewrite` on the config alone (attribute access, as data), for `config_data` patches."""
        raise NotImplementedError(f"{self.name} needs the model to rewrite")

    def verify_config(self, config: Any, before: dict[str, Any], ctx: Context) -> None:
        """`verify` on the config alone: raise `PatchDidNotTakeEffect` unless it shows the patch."""
        raise NotImplementedError(f"{self.name} needs the model to verify")

    def details_config(self, config: Any, ctx: Context) -> dict[str, Any]:
        """`details` on the config alone."""
        return {}

    def calibration_sources(self) -> list[str]:
        """Text sources this patch reads to compute its result (data-aware patches); evaluations
        on them are in-domain for the patched model."""
        return []

    def rewrite(self, model: torch.nn.Module, ctx: Context) -> list[str]:
        """Do the surgery in place; return human-readable notes."""
        raise NotImplementedError

    def verify(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> None:
        """Raise `PatchDidNotTakeEffect` unless the model shows the patch's effect. Required."""
        raise NotImplementedError

    @classmethod
    def saved_config(cls, config: Any) -> dict[str, Any]:
        """Keys to write into a saved config.json that `save_pretrained` leaves out (the attention
        backend), for a model this patch was applied to; None values remove a key."""
        return {}

    def persistence(self, model: torch.nn.Module) -> Persist:
        """How this application persists on this model (patches whose route depends on the model,
        such as sliding-window, override it); called after `check`, before `rewrite`."""
        return self.persist

    def details(self, model: torch.nn.Module, before: Snapshot, ctx: Context) -> dict[str, Any]:
        """Extra facts stored in the record (e.g. the pre-patch RoPE origin)."""
        return {}

    def restore(self, model: torch.nn.Module, directory: Any) -> None:
        """Called by `surgery.load_model` for each recorded patch of a loaded checkpoint (`directory`:
        its local files, or None): re-attach what transformers does not rebuild from the files (the
        calibrated fp8 cache). Runtime patches are re-applied by `rewrite` instead."""

    def tokenizer_for(self, model: torch.nn.Module, ctx: Context) -> Any:
        """The tokenizer data-aware patches read calibration text with: the one passed to `apply`,
        else the model's own from its local directory."""
        if ctx.tokenizer is not None:
            return ctx.tokenizer
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            method = getattr(self, "method", None)
            raise SurgeryError(
                f"{self.name}{f' method={method}' if method else ''} needs the model's tokenizer for calibration "
                "text; pass tokenizer= to apply()"
            ) from err

    def tensor_transform(self, config: Any):
        """For streamable patches: a function (checkpoint tensor name, tensor) -> new tensor,
        built from the config before the patch. Raise `SurgeryError` for unstreamable parameters."""
        raise NotImplementedError(f"{self.name} cannot stream")

    def dry_run(self) -> Patch:
        """The patch to simulate on a meta-device skeleton (`surgery validate --model`): itself,
        unless it needs real weights (data-aware methods return their shape-equivalent variant)."""
        return self

    def short(self) -> str:
        """How reports name what this patch did: `yarn ×2`, `gqa → 1 kv heads`; by default the
        name and every parameter that differs from its default."""
        defaults = {k: f.default for k, f in type(self).model_fields.items()}
        changed = [
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.model_dump().items()
            if v != defaults.get(k)
        ]
        return " ".join([self.name, *changed])

    def slug(self) -> str:
        """Short name for default output directories: `yarn-factor4`."""
        parts = [self.name]
        defaults = {k: f.default for k, f in type(self).model_fields.items()}
        for key, value in self.model_dump().items():
            if value != defaults.get(key):
                text = f"{value:g}" if isinstance(value, float) else str(value)
                parts.append(f"{key.replace('_', '')}{text}".replace(" ", "").replace("/", "_"))
        return "-".join(parts)

    def supports(self, model: torch.nn.Module) -> None:
        """Raise `UnsupportedModel` unless this patch can run on `model`: the architecture list
        (one message for every patch), then the patch's own `check`. Works on a meta skeleton."""
        self.check_architecture(model.config)
        self.check(model)

    def check_architecture(self, config: Any) -> None:
        """Raise `UnsupportedModel` unless the model type (or its text model's) is in the list."""
        types = {config.model_type, text_config(config).model_type}
        if not types & set(self.architectures):
            raise UnsupportedModel(
                f"{self.name} supports model types {', '.join(self.architectures)}; got '{config.model_type}'"
            )

    def apply(self, model: torch.nn.Module, tokenizer: Any = None) -> PatchRecord:
        """check -> rewrite -> verify, then record the result in `model.config.surgery`.
        `tokenizer` is only read by data-aware patches (calibration text)."""
        ctx = Context(tokenizer=tokenizer)
        self.supports(model)
        persist = self.persistence(model)
        before = snapshot(model)
        notes = self.rewrite(model, ctx) or []
        self.verify(model, before, ctx)
        after = snapshot(model)
        record = PatchRecord(
            name=self.name,
            params=self.model_dump(mode="json"),
            persist=persist,
            config_diff=config_diff(before.config, after.config),
            parameters_before=before.parameters,
            parameters_after=after.parameters,
            kv_bytes_per_token_before=before.kv_bytes_per_token,
            kv_bytes_per_token_after=after.kv_bytes_per_token,
            notes=notes,
            details=self.details(model, before, ctx),
        )
        model.config.surgery = [*history(model.config), record.model_dump(mode="json")]
        log.debug("applied %s: %s", self.name, "; ".join(notes) or "done")
        return record


def apply_to_config(patch: Patch, config: Any, parameters: int, dtype_bytes: float) -> PatchRecord:
    """`Patch.apply` for a `config_data` patch on a config read as data (`surgery.info.ConfigData`):
    architecture list, check, rewrite, verify, and the same record, with the parameter count and
    dtype the caller read from the safetensors headers."""
    assert patch.config_data, f"{patch.name} cannot run on a config alone"
    ctx = Context()
    patch.check_architecture(config)
    patch.check_config(text_config(config))
    before = {k: v for k, v in config.to_dict().items() if k != "surgery"}
    kv_before = kv_bytes_per_token(config, dtype_bytes)
    notes = patch.rewrite_config(text_config(config), ctx)
    patch.verify_config(text_config(config), before, ctx)
    after = {k: v for k, v in config.to_dict().items() if k != "surgery"}
    record = PatchRecord(
        name=patch.name,
        params=patch.model_dump(mode="json"),
        persist=patch.persist,
        config_diff=config_diff(before, after),
        parameters_before=parameters,
        parameters_after=parameters,
        kv_bytes_per_token_before=kv_before,
        kv_bytes_per_token_after=kv_bytes_per_token(config, dtype_bytes),
        notes=notes,
        details=patch.details_config(text_config(config), ctx),
    )
    config.surgery = [*history(config), record.model_dump(mode="json")]
    return record


def history(config: Any) -> list[dict[str, Any]]:
    """The PatchRecords (as dicts) already applied to a model, oldest first."""
    return list(getattr(config, "surgery", None) or [])


def method_fields(patch: Patch, reads: dict[str, tuple[str, ...]]) -> None:
    """For patches with a `method`: refuse a field set away from its default (`calibration_*`,
    `fit_*`) that the chosen method does not read. `reads` maps each method to the prefixes it reads."""
    for name, field in type(patch).model_fields.items():
        prefix = name.split("_")[0]
        readers = [method for method, prefixes in reads.items() if prefix in prefixes]
        if readers and prefix not in reads[patch.method] and getattr(patch, name) != field.default:
            raise ValueError(f"{name} applies to method {' or '.join(readers)}, not {patch.method}")


PATCHES: dict[str, type[Patch]] = {}


def register(cls: type[Patch]) -> type[Patch]:
    """Class decorator: enrol a patch under `cls.name`. The contract is checked here: a patch
    names its architectures and examples and proves its effect with its own `verify`."""
    assert cls.name not in PATCHES, f"patch {cls.name!r} registered twice"
    if cls.verify is Patch.verify or cls.rewrite is Patch.rewrite:
        raise TypeError(f"patch {cls.name!r} must implement rewrite and verify (every patch proves its effect)")
    if not cls.architectures or not cls.examples:
        raise TypeError(f"patch {cls.name!r} must list its architectures and at least one example")
    PATCHES[cls.name] = cls
    return cls


def get_patch(name: str) -> type[Patch]:
    """The patch class registered as `name`, or `UnknownPatch` with a did-you-mean."""
    if name not in PATCHES:
        raise UnknownPatch(f"unknown patch '{name}'{did_you_mean(name, list(PATCHES))}")
    return PATCHES[name]


def construct(cls: type[BaseModel], prefix: str, params: dict[str, Any], rename: dict[str, str] | None = None) -> Any:
    """`cls(**params)` with every validation error as one `InvalidParams` line; `rename` maps field
    names to what the user typed (`factor` -> `--factor`)."""
    try:
        return cls(**params)
    except ValidationError as err:
        problems = validation_problems(err, list(cls.model_fields), rename=rename)
        raise InvalidParams(f"{prefix}: " + "; ".join(problems)) from None


def make_patch(name: str, **params: Any) -> Patch:
    """Build a validated patch from its name and raw parameters; errors become `InvalidParams`."""
    return construct(get_patch(name), name, params)
