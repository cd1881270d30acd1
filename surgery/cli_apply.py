"""`surgery apply PATCH ... MODEL`: one click command per registered patch, its options built from
the patch's pydantic fields (so `--help`, `surgery list` and the docs share the descriptions), and
the route each application takes: config only, streamed tensor by tensor, or loaded."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import click

from surgery.errors import SurgeryError
from surgery.patch import PATCHES, Patch, get_patch

FORCE_HELP = "Replace the output directory if surgery wrote it (never a source or a directory it did not write)."


class OutOption(click.Option):
    """`-o/--out DIR` on every command that writes; the older `--output` still works, unlisted."""

    def __init__(self, param_decls: Any = None, **attrs: Any) -> None:
        super().__init__(["-o", "--out", "--output", "out"], **attrs)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        return (record[0].replace(", --output", ""), record[1]) if record else None


def output_path(out: str | None, default: Path) -> Path:
    """The directory -o names (never an empty name, which would mean the working directory)."""
    if out is None:
        return default
    if not out.strip():
        raise SurgeryError("-o is empty; name an output directory")
    return Path(out)


def out_option(help: str) -> Any:
    return click.option("--out", cls=OutOption, help=help)


class LiteralChoice(click.Choice):
    """A click choice that hands back the Literal's own value (8, not "8")."""

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.values = {str(v): v for v in values}
        super().__init__(list(self.values))

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        return self.values[str(super().convert(value, param, ctx))]


class IntList(click.ParamType):
    """Comma-separated integers: `--layers 0,2,4`."""

    name = "int,int,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"expected comma-separated integers such as 0,2,4; got {value!r}", param, ctx)


def field_type(annotation: Any) -> tuple[str, Any]:
    """(display name, click type) for a pydantic field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return field_type(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return "|".join(str(v) for v in values), LiteralChoice(values)
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (int,):
        return "int,int,...", IntList()
    simple = {
        float: ("float", click.FLOAT),
        int: ("int", click.INT),
        bool: ("bool", click.BOOL),
        str: ("text", click.STRING),
    }
    return simple.get(annotation, ("text", click.STRING))


def describe_patch(cls: type[Patch]) -> dict[str, Any]:
    return {
        "name": cls.name,
        "description": (cls.__doc__ or "").strip(),
        "persist": cls.persist if cls.persistence is Patch.persistence else "config or runtime (by model / parameters)",
        "config_only": cls.config_only,
        "architectures": list(cls.architectures),
        "parameters": [
            {
                "name": name,
                "type": field_type(f.annotation)[0],
                "required": f.is_required(),
                "default": None if f.is_required() else f.default,
                "description": f.description or "",
            }
            for name, f in cls.model_fields.items()
        ],
    }


class ApplyGroup(click.Group):
    """`surgery apply PATCH ...`: one subcommand per registered patch, options from its fields."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(PATCHES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command:
        return apply_command(get_patch(name))


def apply_command(cls: type[Patch]) -> click.Command:
    options = []
    for name, f in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind, ctype = field_type(f.annotation)
        default = "required" if f.is_required() else f"default: {f.default}"
        if kind == "bool":
            options.append(
                click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=f"{f.description} ({default})")
            )
        else:
            options.append(click.Option([flag, name], type=ctype, default=None, help=f"{f.description} ({default})"))

    if cls.streamable:
        options.append(
            click.Option(
                ["--streaming/--no-streaming"],
                default=None,
                help="Convert the checkpoint on disk tensor by tensor (default: yes for a local checkpoint kept in its dtype).",
            )
        )

    def run(model: str, out: str | None, force: bool, dtype: str, load_weights: bool, **params: Any) -> None:
        streaming = params.pop("streaming", None)
        apply_patch(cls, model, out, force, dtype, load_weights, params, streaming)

    return click.Command(
        cls.name,
        callback=run,
        help=(cls.__doc__ or "").strip(),
        params=[
            *options,
            click.Argument(["model"]),
            OutOption(help="Output directory (default: ./MODEL-PATCH-PARAMS)."),
            click.Option(["--force"], is_flag=True, help=FORCE_HELP),
            click.Option(
                ["--dtype"], default="auto", show_default=True, help="Load dtype (auto, float32, bfloat16, float16)."
            ),
            click.Option(["--load-weights"], is_flag=True, help="Load the weights even for a config-only patch."),
        ],
    )


def apply_patch(
    cls: type[Patch],
    model: str,
    output: str | None,
    force: bool,
    dtype: str,
    load_weights: bool,
    params: dict[str, Any],
    streaming: bool | None = None,
) -> None:
    from surgery.models import parse_dtype, resolve
    from surgery.patch import construct
    from surgery.routes import apply_to_checkpoint

    flags = {n: "--" + n.replace("_", "-") for n in cls.model_fields}
    patch = construct(cls, cls.name, {k: v for k, v in params.items() if v is not None}, rename=flags)
    parse_dtype(dtype)
    source = resolve(model)
    out = output_path(output, Path.cwd() / f"{source.name}-{patch.slug()}")
    if streaming and (source.kind == "hub" or dtype != "auto"):
        raise SurgeryError("--streaming needs a local checkpoint and --dtype auto (tensors keep their dtype)")
    route = "memory" if load_weights or streaming is False else "stream" if streaming else "auto"
    done = apply_to_checkpoint(model, [patch], out, route=route, dtype=dtype, force=force, say=lambda line: None)
    step = done.plan.steps[0]
    for note in done.plan.notes:
        click.echo(f"warning: {note}", err=True)
    for note in done.records[0].notes:
        click.echo(f"  {note}")
    how = {"config": "config only, weights cloned", "stream": "streamed tensor by tensor", "memory": "weights loaded"}
    click.echo(f"wrote {out} ({how[step.route]}: {step.why}, {done.seconds:.1f} s)")


# ---------------------------------------------------------------- eval / compare
