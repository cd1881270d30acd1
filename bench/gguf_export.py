"""GGUF export of the embedded model, all in one run: export wall time and file size for f32, f16
and q8_0, and how the logits transformers' own GGUF loader computes from each file agree with the
safetensors checkpoint's on held-out pydoc (mean KL per token, top-1 agreement, max |difference|).

    python bench/gguf_export.py [--tokens 512] [--windows 2] [--out DIR]"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import surgery
from surgery.data import load_text, token_stream
from surgery.export import export_gguf
from surgery.models import local_dir, resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    src = local_dir(resolve("smollm2"))
    model, tokenizer = surgery.load_model(str(src), dtype="float32")
    ids = token_stream(tokenizer, load_text("pydoc"))[: args.tokens * args.windows].view(args.windows, args.tokens)
    with torch.no_grad():
        exact = model(ids).logits.log_softmax(-1)
    out = args.out or Path(tempfile.mkdtemp(prefix="surgery-gguf-"))
    print(
        f"embedded model: {sum(p.numel() for p in model.parameters()):,} parameters; {args.windows} x {args.tokens} tokens"
    )
    print("| type | export s | MB | mean KL | top-1 | max abs log-prob diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("f32", "f16", "q8_0"):
        path = out / f"smollm2-{kind}.gguf"
        start = time.perf_counter()
        done = export_gguf(src, path, type=kind, force=True)
        seconds = time.perf_counter() - start
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = loaded(ids).logits.log_softmax(-1)
        kl = (exact.exp() * (exact - got)).sum(-1).mean().item()
        top1 = (exact.argmax(-1) == got.argmax(-1)).float().mean().item()
        diff = (exact - got).abs().max().item()
        print(f"| {kind} | {seconds:.1f} | {done.bytes / 1e6:.1f} | {kl:.2e} | {top1:.4f} | {diff:.3g} |", flush=True)
        del loaded


if __name__ == "__main__":
    main()
