"""Passkey accuracy of the embedded model on a length x depth grid, with its heatmap.

python bench/needle_grid.py [--lengths 1024,4096] [--out out/needle]"""

from __future__ import annotations

import argparse
from pathlib import Path

import surgery
from surgery.evaluate import make_eval
from surgery.evaluate.report import Report, write_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--out", default="out/needle")
    args = parser.parse_args()
    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    result = make_eval("needle", lengths=[int(n) for n in args.lengths.split(",")]).run(model, tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(Report(model="smollm2", results=[result]), out)
    for k, v in result.metrics.items():
        print(f"{k} = {v:.2f}")
    for row in result.details["answers"]:
        print(f"  {row['length']:>5} depth {row['depth']:.2f} key {row['key']} -> {row['answer']!r}")
    print(f"{result.seconds:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
