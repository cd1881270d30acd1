"""The regression a RoPE gate exists for, on the embedded model: perplexity by position band out
to 16k (twice SmolLM2's 8k pretraining length), without scaling and with YaRN, in one run.

    python bench/rope_gate.py [--length 16384] [--band 4096] [--factor 2] [--out out/rope-gate]

Prints the band table, wall time per eval and the process's peak RSS; writes results.json for
both models, the comparison table and a before/after perplexity-by-position plot to --out."""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import surgery
from surgery.evaluate import make_eval
from surgery.evaluate.report import Report, compare_rows, markdown_table, plot_perplexity


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--band", type=int, default=4096)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--out", default="out/rope-gate")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ppl = make_eval("perplexity", lengths=[args.length // 2, args.length], band=args.band)
    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    reports = {}
    for label in ("original", f"yarn x{args.factor:g}"):
        if label != "original":
            surgery.apply(model, "yarn", factor=args.factor)
        start = time.perf_counter()
        result = ppl.run(model, tokenizer)
        print(f"{label}: {time.perf_counter() - start:.1f} s")
        reports[label] = Report(model=f"smollm2 {label}", results=[result])
        (out / f"{label.replace(' ', '-')}.json").write_text(reports[label].model_dump_json(indent=2))
    before, after = reports.values()
    table = markdown_table(compare_rows(before.metrics, after.metrics, (before.estimates, after.estimates)))
    (out / "comparison.md").write_text(table)
    plot_perplexity(reports, out / "perplexity.png")
    print(table)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; wrote {out}")


if __name__ == "__main__":
    main()
