"""Passkey retrieval of the embedded model with full attention vs a sliding window, and the gate
that must catch the long-range loss.

    python bench/sliding_needle.py [--length 4096] [--window 1024] [--out out/sliding-needle]

Writes results.json for both runs (so `surgery compare OUT/full OUT/window` works), a side-by-side
heatmap, and prints the gate outcome of `needle.acc@LENGTH:min=0.8`."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import surgery
from surgery.evaluate import make_eval
from surgery.evaluate.gates import evaluate_gates, parse_gate
from surgery.evaluate.report import Report, compare_rows, markdown_table, plot_needle, write_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--out", default="out/sliding-needle")
    args = parser.parse_args()
    base, tokenizer = surgery.load_model("smollm2", dtype="float32")
    needle = make_eval("needle", lengths=[args.length])
    windowed = copy.deepcopy(base)
    record = surgery.apply(windowed, "sliding-window", window=args.window)
    print("; ".join(record.notes))
    reports = {}
    for name, model in (("full", base), (f"window{args.window}", windowed)):
        result = needle.run(model, tokenizer)
        reports[name] = Report(model=f"smollm2 {name}", results=[result])
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        write_report(reports[name], out)
        cells = result.details["answers"]
        print(f"{name}: acc@{args.length} = {result.metrics[f'needle.acc@{args.length}']:.2f} ({result.seconds:.0f} s)")
        for row in cells:
            print(f"  depth {row['depth']:.2f} key {row['key']} -> {row['answer']!r}")
    full, window = reports["full"], reports[f"window{args.window}"]
    gate = parse_gate(f"needle.acc@{args.length}:min=0.8")
    outcomes = evaluate_gates([gate], full.metrics, window.metrics)
    print(markdown_table(compare_rows(full, window), outcomes))
    plot = plot_needle(reports, Path(args.out) / "needle.png")
    print(f"gate {'PASSED' if all(o.passed for o in outcomes) else 'FAILED'}; heatmap {plot}")


if __name__ == "__main__":
    main()
