"""MLA against MQA at equal and smaller KV bytes on the embedded model, before and after the same heal.

    python bench/mla.py [--rows "mla 128" ...] [--heal "mla 128" ...] [--out runs/mla] [--mqa-fitted DIR]

Rows: MQA (3 -> 1 kv heads, fitted; 128 values per token and layer) and `mla --method fitted` with
a 32-dimension RoPE key and a latent of 96, 64 and 32 (128, 96 and 64 values: 3x, 4x and 6x smaller
than the original's 384). Each is measured as `bench/heal.py` measures a heal: perplexity at 2048
tokens on the held-out parts of pydoc, docs and licenses against the original's, and mean KL and
top-1 agreement with the original on docs. The heal is the MQA recipe's (full attention training,
kl toward the original, pydoc+docs, 200 steps); the fits calibrate on pydoc, so licenses is unseen
by both. Rows are kept in OUT/mla.json, so rows and heals can run one at a time."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from heal import DOMAINS, KL_MIX, ORIGINAL, measure, show_progress_lines

import surgery
from surgery.data import components
from surgery.recipes.finetune import Finetune, run_finetune

ROWS = {
    "mqa": ("mqa", {"method": "fitted"}),
    "mla 128": ("mla", {"kv_rank": 96, "rope_dim": 32, "method": "fitted"}),
    "mla 96": ("mla", {"kv_rank": 64, "rope_dim": 32, "method": "fitted"}),
    "mla 64": ("mla", {"kv_rank": 32, "rope_dim": 32, "method": "fitted"}),
}
VALUES = {"mqa": 128, "mla 128": 128, "mla 96": 96, "mla 64": 64}
HEAL = KL_MIX  # the MQA recipe's heal, so the two compare


def converted(name: str, out: Path, mqa_fitted: Path | None, rows: dict) -> Path:
    """The row's fitted conversion, saved once under OUT (MQA may reuse bench/heal.py's)."""
    if name == "mqa" and mqa_fitted is not None:
        return mqa_fitted
    where = out / name.replace(" ", "-")
    if not (where / "config.json").is_file():
        model, tok = surgery.load_model(ORIGINAL, dtype="float32")
        patch, params = ROWS[name]
        start = time.perf_counter()
        surgery.apply(model, patch, tokenizer=tok, **params)
        rows.setdefault(name, {})["convert seconds"] = time.perf_counter() - start
        surgery.save(model, tok, where, base_model=ORIGINAL, force=True)
        del model
    return where


def main() -> None:
    show_progress_lines()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--heal", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path("runs/mla"))
    parser.add_argument("--mqa-fitted", type=Path, help="a saved `mqa --method fitted` model (bench/heal.py's)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "mla.json"
    rows = json.loads(store.read_text()) if store.is_file() else {}

    def keep() -> None:
        store.write_text(json.dumps(rows, indent=2) + "\n")

    if "original" not in rows:
        model, tok = surgery.load_model(ORIGINAL, dtype="float32")
        rows["original"] = {"before": measure(model, tok, args.length, args.samples)}
        keep()
        del model
    for name in args.rows:
        where = converted(name, args.out, args.mqa_fitted, rows)
        row = rows.setdefault(name, {})
        if "before" not in row:
            model, tok = surgery.load_model(str(where), dtype="float32")
            row["before"] = measure(model, tok, args.length, args.samples)
            keep()
            print(name, "before heal", json.dumps(row["before"]), flush=True)
        if name in args.heal and "after" not in row:
            model, tok = surgery.load_model(str(where), dtype="float32")
            torch.manual_seed(0)
            result = run_finetune(model, tok, Finetune(**HEAL), seed=0, teacher=ORIGINAL)
            row["heal seconds"] = result["seconds"]
            row["after"] = measure(model, tok, args.length, args.samples)
            keep()
            print(name, "after heal", json.dumps(row["after"]), flush=True)
            del model
    keep()
    print(table(rows, args.length, args.samples))
    (args.out / "mla.md").write_text(table(rows, args.length, args.samples))


def table(rows: dict, length: int, samples: int) -> str:
    base = rows["original"]["before"]
    healed = sorted(components(HEAL["text"]))
    lines = [
        f"Perplexity at {length} tokens ({samples} held-out windows per domain; x = the original's), mean KL and "
        "top-1 agreement with the original on docs. Fits calibrate on pydoc; the heal trains on "
        f"{'+'.join(healed)}; licenses is unseen by both. Values: cached per token and layer (original 384).",
        "",
        "| row | values | stage | " + " | ".join(DOMAINS) + " | KL (docs) | top-1 | s |",
        "|---|---:|---|" + "---:|" * (len(DOMAINS) + 3),
        "| original | 384 | | " + " | ".join(f"{base[d]:.2f}" for d in DOMAINS) + " | 0 | 1 | |",
    ]
    for name in ROWS:
        row = rows.get(name, {})
        for stage, key, seen, seconds in (
            ("fitted", "before", {"pydoc"}, row.get("convert seconds")),
            ("healed", "after", {"pydoc", *healed}, row.get("heal seconds")),
        ):
            if key not in row:
                continue
            m = row[key]
            cells = [f"{m[d]:.2f} (x{m[d] / base[d]:.2f}{', in' if d in seen else ''})" for d in DOMAINS]
            time_cell = f"{seconds:.0f}" if seconds else ""
            lines.append(
                f"| {name} | {VALUES[name]} | {stage} | {' | '.join(cells)} | {m['kl']:.3f} | {m['top1']:.3f} "
                f"| {time_cell} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
