"""The `surgery` command. Thin: parse, call the library, print. User errors are one line, exit 2."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

import surgery
from surgery.cli_apply import FORCE_HELP, ApplyGroup, describe_patch, out_option, output_path
from surgery.errors import SurgeryError
from surgery.io import terminate_cleanly
from surgery.patch import PATCHES


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
@click.option("-q", "--quiet", is_flag=True, help="No progress: no bars on a terminal, no progress lines in a log.")
@click.version_option(surgery.__version__, prog_name="surgery")
def main(verbose: bool, quiet: bool) -> None:
    """Model surgery for HuggingFace causal LMs: rewrite, verify, evaluate, save."""
    surgery.io.QUIET = quiet
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        logging.getLogger("surgery").setLevel(logging.INFO)
        for noisy in ("transformers", "lm-eval", "lm_eval", "datasets"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet or not sys.stderr.isatty():  # loading and saving bars are for terminals, not for logs
        quiet_progress_bars()


def quiet_progress_bars() -> None:
    """No hub, transformers or other tqdm bars: through the environment for libraries not imported
    yet (HF_HUB_DISABLE_PROGRESS_BARS is read at import, TQDM_DISABLE by every bar; importing them
    here would cost seconds), and through their switches for those already imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # any other library's tqdm bars (compressed-tensors')
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()


# ---------------------------------------------------------------- list


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
    from surgery.info import inspect, local_description, parse_length, render
    from surgery.models import resolve

    contexts = tuple(parse_length(c) for c in context.split(",") if c.strip())
    source = resolve(model)
    config, parameters = local_description(Path(source.location)) if source.kind == "dir" else (None, None)
    if config is None or parameters is None:  # a hub id, a gguf, an old config, or no weights: transformers reads it
        config = surgery.load_config(model)
    info = inspect(config, contexts, batch, kv_dtype, parameters)
    click.echo(info.model_dump_json(indent=2) if as_json else render(info))


# ---------------------------------------------------------------- apply


@main.command("eval")
@click.argument("model")
@click.option(
    "--eval",
    "specs",
    multiple=True,
    required=True,
    help="'NAME key=value ...', repeatable, e.g. 'perplexity lengths=2048,8192'.",
)
@out_option(help="Output directory (default: ./MODEL-eval).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--dtype", default="float32", show_default=True, help="Load dtype.")
def eval_cmd(model: str, specs: tuple[str, ...], out: str | None, force: bool, dtype: str) -> None:
    """Evaluate MODEL; write results.json, report.md and plots to --out."""
    from surgery.evaluate import make_eval
    from surgery.evaluate.divergence import kl_bound_warnings
    from surgery.evaluate.report import Report, parse_spec, write_report
    from surgery.io import atomic_dir, reserve
    from surgery.models import TOKENIZER_FILES, parse_dtype, resolve

    evals = [make_eval(name, **params) for name, params in map(parse_spec, specs)]  # all validated before loading
    parse_dtype(dtype)
    source = resolve(model)
    path = Path(source.location) if source.kind == "dir" else None
    if path is not None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise SurgeryError(f"{model} has no tokenizer, which evaluation needs; save one with the model")
    target = output_path(out, Path.cwd() / f"{source.name}-eval")
    sources = source.paths()
    with reserve(target, force, sources):  # an unwritable or busy output fails before the evaluation
        loaded, tokenizer = surgery.load_model(model, dtype=dtype)
        results = []
        for e in evals:
            click.echo(f"{e.name} ...")
            result = e.run(loaded, tokenizer)
            bounds = kl_bound_warnings([result])
            for k, v in result.metrics.items():
                click.echo(f"  {k} = {v:.4g}" + (f"  WARNING: {bounds[k]}" if k in bounds else ""))
            click.echo(f"  ({result.seconds:.1f} s)")
            results.append(result)
        with atomic_dir(target, force, sources) as tmp:
            write_report(Report(model=model, results=results), tmp)
    click.echo(f"wrote {target}: results.json, report.md, plots")


@main.command("compare")
@click.argument("before")
@click.argument("after")
@click.option("--gate", "gates", multiple=True, help="METRIC:RULE=VALUE, e.g. 'perplexity.ppl@2048:max_increase=5%'.")
@out_option(help="Write comparison.md, comparison.json and plots here.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def compare_cmd(before: str, after: str, gates: tuple[str, ...], out: str | None, force: bool) -> None:
    """Compare two results.json files (or eval directories), with 95% intervals. Exit 0 when every
    gate passed, 1 when one failed, 3 when one was inconclusive."""
    from surgery.evaluate.gates import EXIT_CODES, evaluate_gates, parse_gate, verdict
    from surgery.evaluate.report import compare_rows, load_report, markdown_table, plot_needle, plot_perplexity
    from surgery.io import atomic_dir, check_target

    parsed = [parse_gate(g) for g in gates]
    b, a = load_report(before), load_report(after)
    target = output_path(out, Path()) if out is not None else None
    if target is not None:
        check_target(target, force, [Path(before), Path(after)])
    intervals = (b.estimates, a.estimates)
    rows = compare_rows(b.metrics, a.metrics, intervals)
    outcomes = evaluate_gates(parsed, b.metrics, a.metrics, intervals)
    table = markdown_table(rows, outcomes)
    click.echo(table, nl=False)
    if target is not None:
        with atomic_dir(target, force, [Path(before), Path(after)]) as tmp:
            (tmp / "comparison.md").write_text(f"# {b.model} -> {a.model}\n\n{table}")
            payload = {"rows": [r.model_dump() for r in rows], "gates": [o.model_dump() for o in outcomes]}
            (tmp / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n")
            labels = {f"before: {Path(b.model).name}": b, f"after: {Path(a.model).name}": a}
            plot_perplexity(labels, tmp / "perplexity.png")
            plot_needle(labels, tmp / "needle.png")
        click.echo(f"wrote {out}")
    status = verdict(outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("fail", "inconclusive")}
    if status == "fail":
        click.echo(f"{counts['fail']} of {len(outcomes)} gate checks failed", err=True)
    elif status == "inconclusive":
        click.echo(
            f"{counts['inconclusive']} of {len(outcomes)} gate checks inconclusive: more samples needed", err=True
        )
    elif outcomes:
        click.echo(f"all {len(outcomes)} gate checks passed")
    sys.exit(EXIT_CODES[status])


@main.command("check")
@click.argument("original")
@click.argument("patched")
@out_option(help="Report directory (default: ./PATCHED-check).")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option(
    "--budget",
    type=click.FloatRange(0.1, 100000),
    help="Minutes to spend: sample counts scale to the measured speed (default: full counts).",
)
@click.option(
    "--length", type=click.IntRange(16, 1 << 22), help="Tokens checked (default: min(original context, 4096))."
)
@click.option(
    "--gate", "gates", multiple=True, help="Extra gate, e.g. 'divergence.docs.kl@4096:max=0.05,confidence=0.95'."
)
@click.option("--dtype", default="float32", show_default=True, help="Load dtype of both models.")
@click.option(
    "--dry-run", is_flag=True, help="Plan the battery, time one forward and say what it would cost; measure nothing."
)
def check_cmd(
    original: str,
    patched: str,
    out: str | None,
    force: bool,
    budget: float | None,
    length: int | None,
    gates: tuple[str, ...],
    dtype: str,
    dry_run: bool,
) -> None:
    """Check PATCHED against ORIGINAL with the battery its patch records call for: divergence on
    two text domains, long-context tasks where a patch touches them, gates at 95% confidence.
    Exit 0 pass, 1 a regression, 3 inconclusive (more samples needed), 2 bad input."""
    from surgery.check import context_of, patch_records, run_check, same_model, write_check
    from surgery.evaluate.gates import EXIT_CODES, parse_gate
    from surgery.io import atomic_dir, reserve
    from surgery.models import load_tokenizer, parse_dtype, resolve
    from surgery.recipes.schema import recipe_trained

    for g in gates:
        parse_gate(g)
    if budget is not None and budget != budget:
        raise SurgeryError("--budget must be a number of minutes, e.g. --budget 10")
    parse_dtype(dtype)
    same_model(original, patched)
    sources = resolve(original).paths() + resolve(patched).paths()
    patched_config = surgery.load_config(patched)
    records = patch_records(patched_config)
    trained, unread = recipe_trained(patched)
    target = output_path(out, Path.cwd() / f"{resolve(patched).name}-check")
    with reserve(target, force, sources):
        outcome = run_check(
            original,
            records,
            lambda: surgery.load_model(patched, dtype=dtype),
            length=length,
            budget=budget,
            extra_gates=list(gates),
            trained=trained,
            notes=[unread] if unread else [],
            dtype=dtype,
            patched_context=context_of(patched_config),
            patched_tokenizer=load_tokenizer(patched),
            dry_run=dry_run,
            say=click.echo,
        )
        if outcome is None:
            click.echo("dry run: nothing measured, nothing written")
            return
        click.echo(outcome.table, nl=False)
        with atomic_dir(target, force, sources) as tmp:
            write_check(outcome, original, patched, tmp)
    click.echo(f"wrote {target}: report.md, check.json, plots")
    click.echo(outcome.verdict_line())
    sys.exit(EXIT_CODES[outcome.status])


SET_HELP = "Override a recipe value before validation, e.g. --set steps.1.factor=8 (repeatable)."


@main.command("validate")
@click.argument("recipe")
@click.option("--model", help="Also dry-run the patches on this model's config (meta device, no weights).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def validate_cmd(recipe: str, model: str | None, overrides: tuple[str, ...]) -> None:
    """Check a recipe without loading weights: every problem at once, with its location."""
    from surgery.recipes import dry_run, load_recipe
    from surgery.recipes.steps import domain_warnings

    parsed = load_recipe(recipe, list(overrides))
    click.echo(f"{recipe}: valid, {len(parsed.compiled)} steps")
    for step in parsed.compiled:
        click.echo(f"  {step.index + 1}. {step.label}")
    for warning in domain_warnings(parsed.compiled):
        click.echo(f"  warning: {warning}")
    if model:
        from surgery.recipes.runner import disk_steps

        for line in dry_run(parsed, model):
            click.echo(f"  dry run {line}")
        for step in disk_steps(parsed, model):
            click.echo(f"  before loading, on disk: {step.describe()}")


@main.command("run")
@click.argument("recipe")
@out_option(help="Report directory (default: runs/RECIPE-NAME).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last completed step.")
@click.option("--force", is_flag=True, help="Replace the report directory and an interrupted run (surgery's own only).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def run_cmd(recipe: str, out: str | None, resume: bool, force: bool, overrides: tuple[str, ...]) -> None:
    """Run a recipe: steps in order with progress, then the before/after table. Exit 0 when every
    gate passed, 1 when one failed, 3 when one was inconclusive (its samples could not tell)."""
    from surgery.evaluate.gates import EXIT_CODES
    from surgery.recipes import load_recipe, run_recipe

    parsed = load_recipe(recipe, list(overrides))
    target = output_path(out, Path("runs") / Path(recipe).stem)
    outcome = run_recipe(parsed, target, resume=resume, force=force, echo=click.echo)
    sys.exit(EXIT_CODES[outcome.state.status])


@main.command("push")
@click.argument("directory")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--gguf", "gguf", multiple=True, metavar="FILE", help="A GGUF exported from DIRECTORY, uploaded with it.")
def push_cmd(
    directory: str, repo_id: str, private: bool, revision: str | None, create_pr: bool, gguf: tuple[str, ...]
) -> None:
    """Upload a saved model DIRECTORY to the Hub as REPO_ID in one commit (token from HF_TOKEN or
    `hf auth login`)."""
    from surgery.hub import push

    url = push(directory, repo_id, private=private, revision=revision, create_pr=create_pr, gguf=gguf)
    click.echo(f"{'pull request' if create_pr else 'pushed'}: {url}")


@main.group("export")
def export_group() -> None:
    """Write a saved model in a serving engine's format."""


@export_group.command("gguf")
@click.argument("model")
@click.option("-o", "--out", "out", required=True, help="The GGUF file to write (FILE.gguf).")
@click.option("--type", "kind", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--allow-loss", is_flag=True, help="Export even what GGUF cannot express, naming what is left out.")
@click.option("--tokenizer-pre", default=None, help="llama.cpp's pre-tokenizer name (llama-bpe, qwen2, smollm, ...).")
def export_gguf_cmd(model: str, out: str, kind: str, force: bool, allow_loss: bool, tokenizer_pre: str | None) -> None:
    """Export MODEL (a saved Llama, Mistral, Qwen2 or Qwen3 checkpoint) to one GGUF file for
    llama.cpp and Ollama, with the applied patches in its metadata."""
    from surgery.export import export_gguf

    def warn(line: str) -> None:
        click.echo(f"warning: {line}", err=True)

    done = export_gguf(
        model, out, type=kind, force=force, allow_loss=allow_loss, tokenizer_pre=tokenizer_pre, warn=warn
    )
    click.echo(
        f"wrote {done.path} ({done.type}, {done.tensors} tensors, {done.bytes / 1e6:.1f} MB, {done.seconds:.1f} s)"
    )


main.add_command(
    ApplyGroup("apply", help="Apply a patch to MODEL and save the result: surgery apply PATCH [--param v]... MODEL")
)


if __name__ == "__main__":
    main()
