"""Overhead of the perplexity eval over the bare model forwards it needs, measured in one run.

    python bench/perplexity_overhead.py [--length 4096] [--repeat 3]

Bare: `model(ids, use_cache=False)` on the same window (full logits, no loss). Eval: the whole
`perplexity` run (text loading, tokenisation, sliced lm_head, loss). Runs alternate; medians."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import surgery
from surgery.evaluate import make_eval


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = surgery.load_model("smollm2", dtype="float32")
    ppl = make_eval("perplexity", lengths=[args.length])
    ids = ppl.windows(tokenizer)
    bare, full = [], []
    with torch.inference_mode():
        model(ids[:, :256], use_cache=False)  # warm-up
    for _ in range(args.repeat):
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False)
        bare.append(time.perf_counter() - start)
        full.append(ppl.run(model, tokenizer).seconds)
    b, f = statistics.median(bare), statistics.median(full)
    print(f"bare forward at {args.length}: {b:.2f} s; perplexity eval: {f:.2f} s; overhead {f / b:.3f}x")


if __name__ == "__main__":
    main()
