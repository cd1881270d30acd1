"""Held-out perplexity of the embedded model after 3 -> 1 kv-head pooling, without fine-tuning:
original, `mean`, `aligned` with growing calibration text (train split), and `fitted` with growing
fitting budgets, in one run, with the time each conversion took.

    python bench/gqa_pooling.py [--length 2048] [--calibration 512,2048,8192] [--fit 8192:50,32768:100]
                                [--methods mean,aligned,fitted]"""

from __future__ import annotations

import argparse
import time

import surgery
from surgery.evaluate import make_eval


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--calibration", default="512,2048,8192", help="aligned: calibration tokens per run")
    parser.add_argument("--fit", default="8192:50,32768:100", help="fitted: fit_tokens:fit_steps per run")
    parser.add_argument("--methods", default="mean,aligned,fitted")
    args = parser.parse_args()
    methods = args.methods.split(",")
    ppl = make_eval("perplexity", lengths=[args.length])
    key = f"perplexity.ppl@{args.length}"
    runs = [("original", None)] + ([("mean", {"method": "mean"})] if "mean" in methods else [])
    if "aligned" in methods:
        runs += [
            (f"aligned, {n} calibration tokens", {"method": "aligned", "calibration_tokens": int(n)})
            for n in args.calibration.split(",")
        ]
    if "fitted" in methods:
        for spec in args.fit.split(","):
            tokens, steps = map(int, spec.split(":"))
            params = {"method": "fitted", "fit_tokens": tokens, "fit_steps": steps}
            runs.append((f"fitted, {tokens} tokens, {steps} steps/layer", params))
    base = None
    print(f"held-out perplexity at {args.length} tokens (pydoc held-out topics)")
    for label, params in runs:
        model, tokenizer = surgery.load_model("smollm2", dtype="float32")
        start = time.perf_counter()
        if params:
            surgery.apply(model, "gqa", tokenizer=tokenizer, num_kv_heads=1, **params)
        convert = time.perf_counter() - start
        value = ppl.run(model, tokenizer).metrics[key]
        base = base or value
        print(f"  {label:40s} {value:10.2f}   {value / base:8.2f}x original   (conversion {convert:.1f} s)")


if __name__ == "__main__":
    main()
