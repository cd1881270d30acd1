"""The Patch protocol: a patch class *is* its parameters (a frozen pydantic model), registered by
name in `PATCHES`. Authors write `check` and `rewrite` (and `verify` when the effect is not visible
in the config); the shared `apply` runs check -> rewrite -> verify and appends a `PatchRecord` to
`model.config.surgery`, so provenance travels with `config.json`."""

from __future__ import annotations

import difflib
import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from surgery.errors import InvalidParams, SurgeryError

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
    buffers: dict[str, torch.Tensor]


def snapshot(model: torch.nn.Module) -> Snapshot:
    from surgery.models import kv_bytes_per_token

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


class Patch(BaseModel):
    """Base class of every patch. Subclasses declare fields (the parameters) and class attributes."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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

    _tokenizer: Any = PrivateAttr(None)  # for data-aware patches (calibration text); set by apply

    def check(self, model: torch.nn.Module) -> None:
        """Raise `UnsupportedModel` (why, and what would work) if this patch cannot run."""

    def rewrite(self, model: torch.nn.Module) -> list[str]:
        """Do the surgery in place; return human-readable notes."""
        raise NotImplementedError

    def verify(self, model: torch.nn.Module, before: Snapshot) -> None:
        """Raise `PatchDidNotTakeEffect` unless the model shows the patch's effect."""

    def persistence(self, model: torch.nn.Module) -> Persist:
        """How this application persists on this model (patches whose route depends on the model,
        such as sliding-window, override it); called after `check`, before `rewrite`."""
        return self.persist

    def details(self, model: torch.nn.Module, before: Snapshot) -> dict[str, Any]:
        """Extra facts stored in the record (e.g. the pre-patch RoPE origin)."""
        return {}

    def tensor_transform(self, config: Any):
        """For streamable patches: a function (checkpoint tensor name, tensor) -> new tensor,
        built from the config before the patch. Raise `SurgeryError` for unstreamable parameters."""
        raise NotImplementedError(f"{self.name} cannot stream")

    def dry_run(self) -> Patch:
        """The patch to simulate on a meta-device skeleton (`surgery validate --model`): itself,
        unless it needs real weights (data-aware methods return their shape-equivalent variant)."""
        return self

    def slug(self) -> str:
        """Short name for default output directories: `yarn-factor4`."""
        parts = [self.name]
        defaults = {k: f.default for k, f in type(self).model_fields.items()}
        for key, value in self.model_dump().items():
            if value != defaults.get(key):
                text = f"{value:g}" if isinstance(value, float) else str(value)
                parts.append(f"{key.replace('_', '')}{text}".replace(" ", "").replace("/", "_"))
        return "-".join(parts)

    def apply(self, model: torch.nn.Module, tokenizer: Any = None) -> PatchRecord:
        """check -> rewrite -> verify, then record the result in `model.config.surgery`.
        `tokenizer` is only read by data-aware patches (calibration text)."""
        self._tokenizer = tokenizer
        self.check(model)
        persist = self.persistence(model)
        before = snapshot(model)
        notes = self.rewrite(model) or []
        self.verify(model, before)
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
            details=self.details(model, before),
        )
        model.config.surgery = [*history(model.config), record.model_dump(mode="json")]
        log.debug("applied %s: %s", self.name, "; ".join(notes) or "done")
        return record


def history(config: Any) -> list[dict[str, Any]]:
    """The PatchRecords (as dicts) already applied to a model, oldest first."""
    return list(getattr(config, "surgery", None) or [])


PATCHES: dict[str, type[Patch]] = {}


def register(cls: type[Patch]) -> type[Patch]:
    """Class decorator: enrol a patch under `cls.name`."""
    assert cls.name not in PATCHES, f"patch {cls.name!r} registered twice"
    PATCHES[cls.name] = cls
    return cls


class UnknownPatch(SurgeryError):
    pass


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(sorted(choices))}"


def get_patch(name: str) -> type[Patch]:
    """The patch class registered as `name`, or `UnknownPatch` with a did-you-mean."""
    if name not in PATCHES:
        raise UnknownPatch(f"unknown patch '{name}'{did_you_mean(name, list(PATCHES))}")
    return PATCHES[name]


def format_validation_error(prefix: str, err: ValidationError, fields: list[str]) -> str:
    """One line naming every invalid field, with a did-you-mean for unknown keys."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown parameter '{where}'{did_you_mean(str(e['loc'][-1]), fields)}")
        elif not where:  # a check across fields: the message says which
            parts.append(message)
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            parts.append(f"{where}: {message}{got}")
    return f"{prefix}: " + "; ".join(parts)


def construct(cls: type[BaseModel], prefix: str, params: dict[str, Any], rename: dict[str, str] | None = None) -> Any:
    """`cls(**params)` with every validation error as one `InvalidParams` line; `rename` maps field
    names to what the user typed (`factor` -> `--factor`)."""
    try:
        return cls(**params)
    except ValidationError as err:
        message = format_validation_error(prefix, err, list(cls.model_fields))
        for name, shown in (rename or {}).items():
            message = message.replace(f" {name}:", f" {shown}:")
        raise InvalidParams(message) from None


def make_patch(name: str, **params: Any) -> Patch:
    """Build a validated patch from its name and raw parameters; errors become `InvalidParams`."""
    return construct(get_patch(name), name, params)
