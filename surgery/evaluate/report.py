"""Results on disk (results.json, report.md, PNG plots) and before/after comparison tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from surgery.errors import SurgeryError
from surgery.evaluate.base import EvalResult, higher_is_better
from surgery.evaluate.gates import GateOutcome
from surgery.evaluate.stats import Estimate, combine, paired


class Report(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    model: str
    results: list[EvalResult]

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v for r in self.results for k, v in r.metrics.items()}

    @property
    def estimates(self) -> dict[str, Estimate]:
        """Every metric that has an interval, with it."""
        return estimates_of(self.results)


def estimates_of(results: list[EvalResult], first: bool = False) -> dict[str, Estimate]:
    """{metric: Estimate} of results with intervals; the first or the last value of each."""
    out: dict[str, Estimate] = {}
    for r in results:
        for k in r.intervals:
            if not first or k not in out:
                out[k] = r.estimate(k)
    return out


class Row(BaseModel):
    metric: str
    before: float | None
    after: float | None
    before_ci: tuple[float, float] | None = None
    after_ci: tuple[float, float] | None = None
    paired_ci: tuple[float, float] | None = None

    @property
    def delta_ci(self) -> tuple[float, float] | None:
        if self.paired_ci is not None:
            return self.paired_ci
        if None in (self.before_ci, self.after_ci, self.before, self.after):
            return None
        d = combine(Estimate(self.before, *self.before_ci, 0), Estimate(self.after, *self.after_ci, 0))
        return d.low, d.high

    @classmethod
    def of(cls, metric: str, before: Estimate | float | None, after: Estimate | float | None) -> Row:
        """A row from two estimates (or plain values); the Δ interval is paired when both were
        measured on the same windows or prompts."""
        row = cls(
            metric=metric,
            before=before.value if isinstance(before, Estimate) else before,
            after=after.value if isinstance(after, Estimate) else after,
            before_ci=(before.low, before.high) if isinstance(before, Estimate) else None,
            after_ci=(after.low, after.high) if isinstance(after, Estimate) else None,
        )
        if isinstance(before, Estimate) and isinstance(after, Estimate):
            d = paired(before, after)
            if d is not None:
                row.paired_ci = (d.low, d.high)
        return row

    @property
    def delta(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    @property
    def relative(self) -> float | None:
        return None if self.delta is None or not self.before else self.delta / abs(self.before)


def interval_problem(result: EvalResult) -> str | None:
    """Why a result's intervals cannot be trusted (None when they can): each must be finite, hold
    its value, and come with a sample count that matches its units."""
    import math

    for metric, (low, high) in result.intervals.items():
        value = result.metrics.get(metric)
        if value is None:
            return f"an interval for '{metric}', which has no value"
        if not (math.isfinite(low) and math.isfinite(high)):
            return f"'{metric}' has a non-finite interval"
        slack = 1e-9 * max(1.0, abs(value))
        if not low - slack <= value <= high + slack:
            return f"'{metric}' = {value:g} lies outside its interval [{low:g}, {high:g}]"
        units = result.units.get(metric)
        if units is not None and len(units) != result.counts.get(metric, len(units)):
            return f"'{metric}' has {len(units)} units but a count of {result.counts.get(metric)}"
    return None


def load_report(path: str | Path) -> Report:
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise SurgeryError(f"no results file at {path}; pass the results.json written by `surgery eval`")
    try:
        report = Report.model_validate_json(path.read_bytes())
    except OSError as err:
        raise SurgeryError(f"cannot read {path}: {err.strerror}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SurgeryError(f"{path} is not a surgery results file ({where}: {first['msg']})") from None
    for result in report.results:
        problem = interval_problem(result)
        if problem:
            raise SurgeryError(f"{path}: {problem}; pass results written by surgery")
    return report


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def compare_rows(
    before: dict[str, float],
    after: dict[str, float],
    intervals: tuple[dict[str, Estimate], dict[str, Estimate]] = ({}, {}),
) -> list[Row]:
    """One row per metric in either; intervals where the results carry them."""
    bi, ai = intervals
    return [
        Row.of(m, bi.get(m, before.get(m)), ai.get(m, after.get(m)))
        for m in sorted(set(before) | set(after), key=_metric_key)
    ]


def with_ci(value: float | None, ci: tuple[float, float] | None) -> str:
    """`12.3 [11.9, 12.8]`: a value with its 95% interval, when it has one."""
    if ci is None or value is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _metric_key(metric: str) -> tuple:
    """Sort ppl@512 before ppl@2048: numbers compare as numbers."""
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", metric))


SHOWN = {"pass": "pass", "fail": "**FAIL**", "inconclusive": "*inconclusive*"}


def markdown_table(rows: list[Row], outcomes: list[GateOutcome] | None = None) -> str:
    """Before / after / Δ with 95% intervals in brackets; ▼ marks a change for the worse of more
    than 1%, and ▼▼ one whose interval excludes zero."""
    lines = ["| metric | before | after | Δ [95%] | Δ% |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r.relative * 100:+.2f}%" if r.relative is not None else "—"
        worse = r.delta is not None and (r.delta < 0 if higher_is_better(r.metric) else r.delta > 0)
        ci = r.delta_ci
        certain = ci is not None and (ci[0] > 0 or ci[1] < 0)
        mark = (" ▼▼" if certain else " ▼") if worse and r.relative is not None and abs(r.relative) > 0.01 else ""
        cells = [with_ci(r.before, r.before_ci), with_ci(r.after, r.after_ci), with_ci(r.delta, ci)]
        lines.append(f"| {r.metric} | {' | '.join(cells)} | {rel}{mark} |")
    if outcomes:
        lines += ["", "| gate | metric | result | detail |", "|---|---|---|---|"]
        for o in outcomes:
            lines.append(f"| `{o.gate}` | {o.metric} | {SHOWN[o.status]} | {o.message} |")
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _details(reports: dict[str, Report], eval_name: str, key: str) -> dict[str, Any]:
    """{label: details[key]} of each report's `eval_name` result that has it."""
    return {
        label: r.details[key]
        for label, report in reports.items()
        for r in report.results
        if r.name == eval_name and r.details.get(key)
    }


def plot_perplexity(reports: dict[str, Report], path: Path) -> Path | None:
    """Perplexity by position, one line per report, on one figure; None without perplexity data."""
    plt = pyplot()
    curves = _details(reports, "perplexity", "ppl_by_position")
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot([p for p, _ in curve], [v for _, v in curve], label=label, marker=".")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity (bucket mean)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Perplexity by position")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_needle(reports: dict[str, Report], path: Path) -> Path | None:
    """Accuracy heatmaps (length x depth), one panel per report; None without needle data."""
    plt = pyplot()
    grids = _details(reports, "needle", "grid")
    if not grids:
        return None
    # constrained layout keeps titles, labels and the colour bar apart; cividis reads the same
    # to colour-blind eyes and in greyscale, and each cell's text takes the contrasting colour
    fig, axes = plt.subplots(
        1, len(grids), figsize=(4.2 * len(grids) + 1, 3.6), squeeze=False, sharey=True, layout="constrained"
    )
    cmap = plt.get_cmap("cividis")
    for k, (ax, (label, grid)) in enumerate(zip(axes[0], grids.items(), strict=True)):
        lengths = sorted(grid, key=int)
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        values = [[grid[n].get(d, float("nan")) for d in depths] for n in lengths]
        image = ax.imshow(values, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), lengths)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                color = "white" if v == v and v < 0.55 else "black"  # dark cells (low accuracy) get white text
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xlabel("needle depth")
        if k == 0:
            ax.set_ylabel("context length (tokens)")
        ax.set_title(label, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy", shrink=0.9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_divergence(reports: dict[str, Report], path: Path) -> Path | None:
    """KL(original ‖ model) and top-1 agreement by position, one line per report and text domain;
    None without divergence data."""
    plt = pyplot()
    curves = {
        f"{label}, {r.params.get('text', 'pydoc')}"
        + (f", chunk {r.params['chunk']}" if r.params.get("chunk") else ""): r.details["kl_by_position"]
        for label, report in reports.items()
        for r in report.results
        if r.name == "divergence" and r.details.get("kl_by_position")
    }
    if not curves:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, layout="constrained")
    for label, curve in curves.items():
        top.plot([p for p, _, _ in curve], [max(k, 1e-6) for _, k, _ in curve], label=label, marker=".")
        bottom.plot([p for p, _, _ in curve], [a for _, _, a in curve], label=label, marker=".")
    top.set_yscale("log")
    top.set_ylabel("KL(original ‖ model), nats")
    bottom.set_ylabel("same top-1 token")
    bottom.set_ylim(0, 1.02)
    bottom.set_xlabel("token position")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    top.set_title("Divergence from the original by position")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ruler(reports: dict[str, Report], path: Path) -> Path | None:
    """Long-context task heatmaps (length x depth per task), one row per report."""
    from surgery.evaluate.ruler import plot_ruler as plot_grids

    grids = _details(reports, "ruler", "grid")
    return plot_grids(grids, path) if grids else None


def write_report(report: Report, directory: Path) -> list[Path]:
    """results.json, report.md and plots into `directory` (an existing, usually temporary, dir)."""
    (directory / "results.json").write_text(report.model_dump_json(indent=2) + "\n")
    rows = [
        Row(metric=m, before=None, after=v)
        for m, v in sorted(report.metrics.items(), key=lambda kv: _metric_key(kv[0]))
    ]
    from surgery.evaluate.divergence import kl_bound_warnings

    est, bounds = report.estimates, kl_bound_warnings(report.results)
    lines = [f"# Evaluation of {report.model}", "", "| metric | value | 95% interval | n |", "|---|---:|---:|---:|"]
    for r in rows:
        e = est.get(r.metric)
        ci = f"[{fmt(e.low)}, {fmt(e.high)}] | {e.n}" if e else "— | —"
        warn = " (lower bound)" if r.metric in bounds else ""
        lines.append(f"| {r.metric} | {fmt(r.after)}{warn} | {ci} |")
    lines += [""] + [f"**Warning:** `{m}` is {text}." for m, text in bounds.items()] if bounds else []
    lines += ["", "| eval | seconds |", "|---|---:|"] + [f"| {r.name} | {r.seconds:.1f} |" for r in report.results]
    written = [directory / "results.json", directory / "report.md"]
    plot = plot_perplexity({report.model: report}, directory / "perplexity.png")
    if plot:
        lines += ["", "![perplexity by position](perplexity.png)"]
        written.append(plot)
    heatmap = plot_needle({report.model: report}, directory / "needle.png")
    if heatmap:
        lines += ["", "![passkey accuracy](needle.png)"]
        written.append(heatmap)
    for plot, name, alt in (
        (plot_divergence, "divergence.png", "divergence by position"),
        (plot_ruler, "ruler.png", "long-context tasks"),
    ):
        if plot({report.model: report}, directory / name):
            lines += ["", f"![{alt}]({name})"]
            written.append(directory / name)
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    return written


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'perplexity lengths=2048,8192 band=4096' -> ('perplexity', {...}); values as YAML scalars."""
    import yaml

    words = spec.split()
    if not words:
        raise SurgeryError("empty --eval; write e.g. --eval 'perplexity lengths=2048,8192'")
    params: dict[str, Any] = {}
    for word in words[1:]:
        key, eq, raw = word.partition("=")
        if not eq or not key:
            raise SurgeryError(f"bad eval parameter '{word}' in '{spec}'; write key=value")
        name = key.replace("-", "_")
        if name in params:
            raise SurgeryError(f"eval parameter '{key}' is given twice in '{spec}'; give it once")
        try:
            values = [yaml.safe_load(v) for v in raw.split(",")] if "," in raw else yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SurgeryError(f"bad value in '{word}'; write plain numbers or words, e.g. lengths=2048,8192") from None
        params[name] = values
    return words[0], params
