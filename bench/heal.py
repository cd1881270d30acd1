"""Heals judged where they did not train: fitted MQA (3 -> 1 kv heads) on the embedded model, then
each heal variant, measured by perplexity on the held-out parts of three offline domains (pydoc,
docs, licenses) against the original, and by mean KL from the original on docs.

    python bench/heal.py [--variants current kl ...] [--out runs/heal] [--length 2048] [--samples 8]

A domain the heal trained on is marked "in"; the others are out of domain. Each variant's row is
kept in OUT/heal.json, so variants can be run one at a time (`--variants kl`) and the table is
written from all rows so far. The fitted model is built once (OUT/fitted)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import surgery
from surgery.data import components
from surgery.evaluate import make_eval
from surgery.recipes.finetune import Finetune, run_finetune

ORIGINAL = "smollm2"
DOMAINS = ("pydoc", "docs", "licenses")
ATTENTION = {"method": "full", "trainable": ["*.self_attn.*"], "seq_len": 512, "batch_size": 2, "warmup_steps": 10}
# The recipe's heal: the attention projections, distilling the original on pydoc+docs.
KL_MIX = {**ATTENTION, "max_steps": 200, "learning_rate": 1e-3, "text": "pydoc+docs", "loss": "kl"}
VARIANTS: dict[str, dict | None] = {
    "fitted, no heal": None,
    "current": {**ATTENTION, "max_steps": 200, "learning_rate": 1e-3, "text": "pydoc"},
    "kl": {**KL_MIX, "text": "pydoc"},
    "kl + ce": {**KL_MIX, "text": "pydoc", "kl_weight": 0.5},
    "kl mix": KL_MIX,
    "kl mix, lr 3e-4": {**KL_MIX, "learning_rate": 3e-4},
    "kl mix, 100 steps": {**KL_MIX, "max_steps": 100},
    "kl mix, 2048-token windows": {**KL_MIX, "seq_len": 2048, "batch_size": 1, "max_steps": 100},
    "fit mix, kl mix": {**KL_MIX, "fit": {"calibration_text": "pydoc+docs"}},
    "fit 2048, no heal": {"fit": {"fit_seq_len": 2048}},
    "fit 2048, kl mix": {**KL_MIX, "fit": {"fit_seq_len": 2048}},
    "lora kl": {
        "method": "lora",
        "lora_r": 64,
        "lora_alpha": 64,
        "max_steps": 200,
        "learning_rate": 1e-3,
        "seq_len": 512,
        "batch_size": 2,
        "warmup_steps": 10,
        "text": "pydoc",
        "loss": "kl",
    },
}
SHORT = {
    "current": "full attention, ce, pydoc",
    "kl": "full attention, kl, pydoc",
    "kl + ce": "full attention, kl 0.5 + ce 0.5, pydoc",
    "kl mix": "full attention, kl, pydoc+docs",
    "lora kl": "LoRA r64 on q/k/v/o, kl, pydoc",
    "kl mix, lr 3e-4": "full attention, kl, pydoc+docs, lr 3e-4",
    "kl mix, 100 steps": "full attention, kl, pydoc+docs, 100 steps",
    "kl mix, 2048-token windows": "full attention, kl, pydoc+docs, 100 steps of 1 x 2048 tokens (same tokens)",
    "fit mix, kl mix": "fitted on pydoc+docs; full attention, kl, pydoc+docs",
    "fit 2048, no heal": "fitted on 2048-token windows (same 8192 tokens)",
    "fit 2048, kl mix": "fitted on 2048-token windows; full attention, kl, pydoc+docs",
}


def measure(model, tok, length: int, samples: int) -> dict[str, float]:
    out = {}
    for domain in DOMAINS:
        e = make_eval("perplexity", lengths=[length], samples=samples, text=domain)
        out[domain] = e.run(model, tok).metrics[f"perplexity.ppl@{length}"]
    e = make_eval("divergence", reference=ORIGINAL, length=length, samples=max(2, samples // 4), text="docs")
    metrics = e.run(model, tok).metrics
    out["kl"], out["top1"] = metrics[f"divergence.docs.kl@{length}"], metrics[f"divergence.docs.top1@{length}"]
    return out


def show_progress_lines() -> None:
    """surgery's progress lines (one a minute), for benchmarks run under nohup."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("surgery").setLevel(logging.INFO)


def main() -> None:
    show_progress_lines()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/heal"))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "heal.json"
    rows = json.loads(store.read_text()) if store.is_file() else {}
    if "original" not in rows:
        model, tok = surgery.load_model(ORIGINAL, dtype="float32")
        rows["original"] = {"ppl": measure(model, tok, args.length, args.samples), "seconds": 0, "trained": []}
        del model
    for name in args.variants:
        settings = dict(VARIANTS[name] or {})
        changes = settings.pop("fit", {})  # to the mqa patch's fit settings
        fit, label = {"calibration_text": "pydoc", **changes}, "-".join(map(str, changes.values()))
        fitted = args.out / ("fitted" if not label else f"fitted-{label}")
        if not (fitted / "config.json").is_file():
            model, tok = surgery.load_model(ORIGINAL, dtype="float32")
            start = time.perf_counter()
            surgery.apply(model, "mqa", tokenizer=tok, method="fitted", **fit)
            surgery.save(model, tok, fitted, base_model=ORIGINAL, force=True)
            rows[f"fit seconds ({label or 'pydoc'})"] = time.perf_counter() - start
            del model
        model, tok = surgery.load_model(str(fitted), dtype="float32")
        seconds, trained = 0.0, sorted(components(fit["calibration_text"]))  # the fit calibrates on its text
        if settings:
            torch.manual_seed(0)
            result = run_finetune(model, tok, Finetune(**settings), seed=0, teacher=ORIGINAL)
            seconds = result["seconds"]
            trained = sorted(set(trained) | components(settings["text"]))
        rows[name] = {"ppl": measure(model, tok, args.length, args.samples), "seconds": seconds, "trained": trained}
        store.write_text(json.dumps(rows, indent=2) + "\n")
        print(name, json.dumps(rows[name]), flush=True)
        del model
    store.write_text(json.dumps(rows, indent=2) + "\n")
    base = rows["original"]["ppl"]
    lines = [
        f"Perplexity at {args.length} tokens ({args.samples} held-out windows per domain; x = the original's), "
        "mean KL from the original on docs, heal wall time (2 CPU cores). 'in': the fit or heal saw that domain.",
        "",
        "| variant | " + " | ".join(DOMAINS) + " | KL (docs) | heal s |",
        "|---|" + "---:|" * (len(DOMAINS) + 2),
        "| original | " + " | ".join(f"{base[d]:.2f}" for d in DOMAINS) + " | 0 | |",
    ]
    for name, row in rows.items():
        if name == "original" or name.startswith("fit seconds"):
            continue
        cells = [
            f"{row['ppl'][d]:.2f} (x{row['ppl'][d] / base[d]:.2f}{', in' if d in row['trained'] else ''})"
            for d in DOMAINS
        ]
        label = f"{name}: {SHORT[name]}" if name in SHORT else name
        lines.append(f"| {label} | {' | '.join(cells)} | {row['ppl']['kl']:.3f} | {row['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "heal.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
