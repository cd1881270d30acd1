"""The `surgery` command. Thin: parse, call the library, print. User errors are one line, exit 2."""

from __future__ import annotations

import json
import logging
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import click

import surgery
from surgery.errors import SurgeryError
from surgery.io import terminate_cleanly
from surgery.patch import PATCHES, Patch, get_patch


class Group(click.Group):
    """A click group whose errors are one line on stderr: `error: ...`, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        terminate_cleanly()  # SIGTERM removes temporary output directories like an error does
        try:
            rv = super().main(args, prog_name or "surgery", **kwargs)
        except SurgeryError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Group)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(surgery.__version__, prog_name="surgery")
def main(verbose: bool) -> None:
    """Model surgery for HuggingFace causal LMs: rewrite, verify, evaluate, save."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        logging.getLogger("surgery").setLevel(logging.INFO)
        for noisy in ("transformers", "lm-eval", "lm_eval", "datasets"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # loading and saving bars are for terminals, not for logs
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
        disable_progress_bars()


# ---------------------------------------------------------------- list


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


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_patches(as_json: bool) -> None:
    """List the registered patches, their parameters and supported architectures."""
    described = [describe_patch(PATCHES[name]) for name in sorted(PATCHES)]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for d in described:
        click.echo(f"{d['name']}  [{d['persist']}]  {d['description']}")
        for p in d["parameters"]:
            default = "required" if p["required"] else f"default {p['default']}"
            click.echo(f"    --{p['name'].replace('_', '-')} {p['type']} ({default}): {p['description']}")
        click.echo(f"    architectures: {', '.join(d['architectures'])}")


# ---------------------------------------------------------------- inspect


@main.command("inspect")
@click.argument("model")
@click.option("--context", default="4k,32k,128k", show_default=True, help="Context lengths for KV size.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 1 << 20), help="Sequences in the batch.")
@click.option(
    "--kv-dtype", default=None, help="KV element type (bf16, fp16, fp32, fp8, int8, int4, int2); default the model's."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(model: str, context: str, batch: int, kv_dtype: str | None, as_json: bool) -> None:
    """Describe MODEL from its config alone (no weights are read)."""
    from surgery.info import inspect, parse_length, render

    contexts = tuple(parse_length(c) for c in context.split(",") if c.strip())
    info = inspect(surgery.load_config(model), contexts, batch, kv_dtype)
    click.echo(info.model_dump_json(indent=2) if as_json else render(info))


# ---------------------------------------------------------------- apply


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
                help="Convert the checkpoint on disk tensor by tensor (default: when it would not fit in memory).",
            )
        )

    def run(model: str, out: str | None, force: bool, dtype: str, load_weights: bool, **params: Any) -> None:
        streaming = params.pop("streaming", False)
        apply_patch(cls, model, out, force, dtype, load_weights, params, streaming)

    return click.Command(
        cls.name,
        callback=run,
        help=(cls.__doc__ or "").strip(),
        params=[
            *options,
            click.Argument(["model"]),
            click.Option(["-o", "--out", "--output", "out"], help="Output directory (default: ./MODEL-PATCH-PARAMS)."),
            click.Option(["--force"], is_flag=True, help=FORCE_HELP),
            click.Option(
                ["--dtype"], default="auto", show_default=True, help="Load dtype (auto, float32, bfloat16, float16)."
            ),
            click.Option(["--load-weights"], is_flag=True, help="Load the weights even for a config-only patch."),
        ],
    )


FORCE_HELP = "Replace the output directory if surgery wrote it (never a source or a directory it did not write)."


def apply_patch(
    cls: type[Patch],
    model: str,
    output: str | None,
    force: bool,
    dtype: str,
    load_weights: bool,
    params: dict[str, Any],
    streaming: bool | None = False,
) -> None:
    from surgery.io import reserve
    from surgery.models import parse_dtype, resolve, source_paths
    from surgery.patch import construct

    flags = {n: "--" + n.replace("_", "-") for n in cls.model_fields}
    patch = construct(cls, cls.name, {k: v for k, v in params.items() if v is not None}, rename=flags)
    parse_dtype(dtype)
    source = resolve(model)
    out = Path(output) if output else Path.cwd() / f"{source.name}-{patch.slug()}"
    with reserve(out, force, source_paths(model)):  # checked and locked before any work
        record, how, seconds = apply_reserved(patch, model, source, out, force, dtype, load_weights, streaming)
    for note in record.notes:
        click.echo(f"  {note}")
    click.echo(f"wrote {out} ({how}, {seconds:.1f} s)")


def apply_reserved(
    patch: Patch,
    model: str,
    source: Any,
    out: Path,
    force: bool,
    dtype: str,
    load_weights: bool,
    streaming: bool | None,
) -> tuple[Any, str, float]:
    from surgery.hub import apply_config_only, skeleton
    from surgery.models import local_dir, source_paths
    from surgery.streaming import apply_streaming, should_stream

    cls = type(patch)
    start = time.perf_counter()
    on_disk = source.kind != "hub" and dtype == "auto"
    if streaming and not on_disk:
        raise SurgeryError("--streaming needs a local checkpoint and --dtype auto (tensors keep their dtype)")
    if streaming is None and on_disk and cls.streamable and should_stream(local_dir(source)):
        try:
            patch.tensor_transform(surgery.load_config(model))
            streaming = True
            click.echo("the checkpoint would not fit in memory: converting it tensor by tensor (--streaming)")
        except SurgeryError as err:
            click.echo(f"warning: the checkpoint may not fit in memory, but {err}", err=True)
    if streaming:
        patch.tensor_transform(surgery.load_config(model))  # refuses unstreamable parameters up front
        out, record = apply_streaming(patch, local_dir(source), out, base_model=source.base_model, force=force)
        how = "streamed tensor by tensor"
    elif patch.config_only and not load_weights and on_disk:
        out, record = apply_config_only(patch, local_dir(source), out, base_model=source.base_model, force=force)
        how = "config only, weights copied"
    else:
        patch.check(skeleton(surgery.load_config(model)))  # refuse before reading any weights
        loaded, tokenizer = surgery.load_model(model, dtype=dtype)
        record = patch.apply(loaded, tokenizer=tokenizer)
        surgery.save(loaded, tokenizer, out, base_model=source.base_model, force=force, sources=source_paths(model))
        how = "weights loaded"
    return record, how, time.perf_counter() - start


# ---------------------------------------------------------------- eval / compare


@main.command("eval")
@click.argument("model")
@click.option(
    "--eval",
    "specs",
    multiple=True,
    required=True,
    help="'NAME key=value ...', repeatable, e.g. 'perplexity lengths=2048,8192'.",
)
@click.option("-o", "--out", "--output", "out", help="Output directory (default: ./MODEL-eval).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--dtype", default="float32", show_default=True, help="Load dtype.")
def eval_cmd(model: str, specs: tuple[str, ...], out: str | None, force: bool, dtype: str) -> None:
    """Evaluate MODEL; write results.json, report.md and plots to --out."""
    from surgery.evaluate import make_eval
    from surgery.evaluate.report import Report, parse_spec, write_report
    from surgery.io import atomic_dir, reserve
    from surgery.models import parse_dtype, resolve, source_paths

    evals = [make_eval(name, **params) for name, params in map(parse_spec, specs)]  # all validated before loading
    parse_dtype(dtype)
    target = Path(out) if out else Path.cwd() / f"{resolve(model).name}-eval"
    sources = source_paths(model)
    with reserve(target, force, sources):  # an unwritable or busy output fails before the evaluation
        loaded, tokenizer = surgery.load_model(model, dtype=dtype)
        results = []
        for e in evals:
            click.echo(f"{e.name} ...")
            result = e.run(loaded, tokenizer)
            for k, v in result.metrics.items():
                click.echo(f"  {k} = {v:.4g}")
            click.echo(f"  ({result.seconds:.1f} s)")
            results.append(result)
        with atomic_dir(target, force, sources) as tmp:
            write_report(Report(model=model, results=results), tmp)
    click.echo(f"wrote {target}: results.json, report.md, plots")


@main.command("compare")
@click.argument("before")
@click.argument("after")
@click.option("--gate", "gates", multiple=True, help="METRIC:RULE=VALUE, e.g. 'perplexity.ppl@2048:max_increase=5%'.")
@click.option("-o", "--out", "--output", "out", help="Write comparison.md, comparison.json and plots here.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def compare_cmd(before: str, after: str, gates: tuple[str, ...], out: str | None, force: bool) -> None:
    """Compare two results.json files (or eval directories); exit 1 when a gate fails."""
    from surgery.evaluate.gates import evaluate_gates, parse_gate
    from surgery.evaluate.report import compare_rows, load_report, markdown_table, plot_needle, plot_perplexity
    from surgery.io import atomic_dir, check_target

    parsed = [parse_gate(g) for g in gates]
    b, a = load_report(before), load_report(after)
    if out:
        check_target(Path(out), force, [Path(before), Path(after)])
    rows = compare_rows(b, a)
    outcomes = evaluate_gates(parsed, b.metrics, a.metrics)
    table = markdown_table(rows, outcomes)
    click.echo(table, nl=False)
    if out:
        with atomic_dir(Path(out), force, [Path(before), Path(after)]) as tmp:
            (tmp / "comparison.md").write_text(f"# {b.model} -> {a.model}\n\n{table}")
            payload = {"rows": [r.model_dump() for r in rows], "gates": [o.model_dump() for o in outcomes]}
            (tmp / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
            labels = {f"before: {Path(b.model).name}": b, f"after: {Path(a.model).name}": a}
            plot_perplexity(labels, tmp / "perplexity.png")
            plot_needle(labels, tmp / "needle.png")
        click.echo(f"wrote {out}")
    failed = [o for o in outcomes if not o.passed]
    if failed:
        click.echo(f"{len(failed)} of {len(outcomes)} gate checks failed", err=True)
        sys.exit(1)
    if outcomes:
        click.echo(f"all {len(outcomes)} gate checks passed")


SET_HELP = "Override a recipe value before validation, e.g. --set steps.1.factor=8 (repeatable)."


@main.command("validate")
@click.argument("recipe")
@click.option("--model", help="Also dry-run the patches on this model's config (meta device, no weights).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def validate_cmd(recipe: str, model: str | None, overrides: tuple[str, ...]) -> None:
    """Check a recipe without loading weights: every problem at once, with its location."""
    from surgery.recipes import dry_run, load_recipe

    parsed = load_recipe(recipe, list(overrides))
    click.echo(f"{recipe}: valid, {len(parsed.compiled)} steps")
    for step in parsed.compiled:
        click.echo(f"  {step.index + 1}. {step.label}")
    if model:
        for line in dry_run(parsed, model):
            click.echo(f"  dry run {line}")


@main.command("run")
@click.argument("recipe")
@click.option("-o", "--out", "--output", "out", help="Report directory (default: runs/RECIPE-NAME).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last completed step.")
@click.option("--force", is_flag=True, help="Replace the report directory and an interrupted run (surgery's own only).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def run_cmd(recipe: str, out: str | None, resume: bool, force: bool, overrides: tuple[str, ...]) -> None:
    """Run a recipe: steps in order with progress, then the before/after table; exit 1 when a gate fails."""
    from surgery.recipes import load_recipe, run_recipe

    parsed = load_recipe(recipe, list(overrides))
    target = Path(out) if out else Path("runs") / Path(recipe).stem
    outcome = run_recipe(parsed, target, resume=resume, force=force, echo=click.echo)
    if not outcome.passed:
        sys.exit(1)


@main.command("push")
@click.argument("directory")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", help="Branch to push to (created if missing).")
def push_cmd(directory: str, repo_id: str, private: bool, revision: str | None) -> None:
    """Upload a saved model DIRECTORY to the Hub as REPO_ID (token from HF_TOKEN or `hf auth login`)."""
    from surgery.hub import push

    click.echo(f"pushed: {push(directory, repo_id, private=private, revision=revision)}")


main.add_command(
    ApplyGroup("apply", help="Apply a patch to MODEL and save the result: surgery apply PATCH [--param v]... MODEL")
)


if __name__ == "__main__":
    main()
