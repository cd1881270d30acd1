"""Held-out perplexity of the embedded model after 3 -> 1 kv-head pooling, without fine-tuning:
original, `mean`, and `aligned` with growing calibration text (train split), in one run.

    python bench/gqa_pooling.py [--length 2048] [--calibration 512,2048,8192]"""

from __future__ import annotations

import argparse
import time

import surgery
from surgery.evaluate import make_eval


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--calibration", default="512,2048,8192")
    args = parser.parse_args()
    ppl = make_eval("perplexity", lengths=[args.length])
    key = f"perplexity.ppl@{args.length}"
    runs = [("original", None), ("mean", {"method": "mean"})]
    runs += [
        (f"aligned, {n} calibration tokens", {"method": "aligned", "calibration_tokens": int(n)})
        for n in args.calibration.split(",")
    ]
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
        print(f"  {label:34s} {value:10.2f}   {value / base:8.2f}x original   (conversion {convert:.1f} s)")


if __name__ == "__main__":
    main()
