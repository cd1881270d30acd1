"""Overhead of the perplexity eval over the bare model forwards it needs, measured in one run.

    python bench/perplexity_overhead.py [--length 4096] [--repeat 3]

Bare: `model(ids, use_cache=False)` on the same window (full logits, no loss); also
`model(ids, labels=ids)`, the naive way to the same number. Eval: the whole `perplexity` run (text
loading, tokenisation, sliced lm_head, loss). Runs alternate; medians."""

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
    bare, with_loss, full = [], [], []
    with torch.inference_mode():
        model(ids[:, :256], use_cache=False)  # warm-up
    for _ in range(args.repeat):
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False)
        bare.append(time.perf_counter() - start)
        full.append(ppl.run(model, tokenizer).seconds)
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, labels=ids, use_cache=False)
        with_loss.append(time.perf_counter() - start)
    b, f, w = statistics.median(bare), statistics.median(full), statistics.median(with_loss)
    print(f"at {args.length} tokens, medians of {args.repeat}:")
    print(f"  bare forward (logits)           {b:6.2f} s")
    print(f"  forward + loss (labels=ids)     {w:6.2f} s")
    print(f"  perplexity eval                 {f:6.2f} s")
    print(f"  overhead: {f / b:.3f}x the bare forward, {f / w:.3f}x forward + loss")


if __name__ == "__main__":
    main()
