"""The guard's truth table: seeded damaging and benign changes to the embedded model, each judged by
`surgery check smollm2 VARIANT`. A damaging change must fail (exit 1), a benign one must pass
(exit 0); inconclusive (exit 3) counts as neither caught nor a false alarm, and is listed.

    python bench/guard.py [--length 2048] [--budget 2] [--out runs/guard] [--only NAME ...]
                          [--healed out/smollm2-mqa-healed] [--kl-length 4096]

Variants are built once into OUT/models (reused by later runs). The mqa-heal row is the model
saved by recipes/smollm2-mqa-heal.yaml (`--healed`; run that recipe first, ~30-60 CPU minutes).
For each row the table gives the verdict, the gate that caught it, the wall time of the check,
and whether the gates surgery had before `check` (perplexity on pydoc within 5%, passkey
retrieval at least 0.8) would have caught it, computed from the same run (the pydoc perplexity
ratio, and the single-needle task where the battery has tasks).

`--kl-length` adds the table of mean KL and top-1 agreement at that length for the KV caches,
yarn x2 and fitted MQA before and after the heal (divergence on pydoc, 2 windows)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import surgery

ORIGINAL = "smollm2"


def swap_kv_heads(model, layer: int = 15) -> None:
    """Exchange kv heads 0 and 1 of one layer's k and v projections: each query group now reads the
    other group's keys and values (a silent wiring bug, no patch record)."""
    attn = model.model.layers[layer].self_attn
    d = model.config.head_dim if getattr(model.config, "head_dim", None) else 64
    for proj in (attn.k_proj, attn.v_proj):
        w = proj.weight.data
        a, b = w[:d].clone(), w[d : 2 * d].clone()
        w[:d], w[d : 2 * d] = b, a


def patch(name: str, **params) -> Callable:
    return lambda model, tok: surgery.apply(model, name, tokenizer=tok, **params)


# name -> (expected, how the variant is made: a function of (model, tokenizer), or a path to load)
DAMAGING: dict[str, Callable | str] = {
    "mqa mean-pooled": patch("mqa"),
    "mqa fitted, no heal": patch("mqa", method="fitted"),
    "mqa-heal recipe model": "HEALED",
    "kv-quant int2 g64": patch("kv-quant", bits=2, group_size=64),
    "sliding window 256": patch("sliding-window", window=256),
    "linear x4": patch("linear", factor=4),
    "ntk x8 (base 8.4x, unneeded)": patch("ntk", factor=8),
    "kv heads swapped in layer 15": lambda model, tok: swap_kv_heads(model),
}
BENIGN: dict[str, Callable | str] = {
    "save/reload round trip": lambda model, tok: None,
    "attention sdpa -> eager": patch("attention", impl="eager"),
    "yarn x1": patch("yarn", factor=1),
    "kv-quant int8": patch("kv-quant", bits=8),
    "gqa to the current 3 heads": patch("gqa", num_kv_heads=3),
    "sliding window 4096 (>= checked)": patch("sliding-window", window=4096),
    "yarn x2": patch("yarn", factor=2),
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build(name: str, make: Callable | str, root: Path, healed: Path) -> Path | None:
    if make == "HEALED":
        if not (healed / "config.json").is_file():
            print(f"skipped {name}: {healed} is missing; run recipes/smollm2-mqa-heal.yaml first (or pass --healed)")
            return None
        return healed
    out = root / slug(name)
    if not (out / "config.json").is_file():
        model, tok = surgery.load_model(ORIGINAL, dtype="float32")
        make(model, tok)
        surgery.save(model, tok, out, base_model=ORIGINAL, force=True)
        del model
    return out


def run_check(path: Path, report: Path, length: int, budget: float) -> tuple[int, float, dict]:
    cmd = [sys.executable, "-m", "surgery.cli", "check", ORIGINAL, str(path), "--length", str(length)]
    cmd += ["--budget", str(budget), "-o", str(report), "--force"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode == 2:
        raise SystemExit(f"check of {path} failed to run:\n{proc.stderr}")
    (report / "check.log").write_text(proc.stdout + proc.stderr)  # the battery, the budget's scale, progress
    payload = json.loads((report / "check.json").read_text())
    payload["patched_results"] = json.loads((report / "patched.json").read_text())["results"]
    payload["original_results"] = json.loads((report / "original.json").read_text())["results"]
    return proc.returncode, seconds, payload


def metric(results: list[dict], name: str) -> float | None:
    for r in results:
        if name in r["metrics"]:
            return r["metrics"][name]
    return None


def old_gates(payload: dict, length: int) -> str:
    """What the pre-check gates (pydoc perplexity within 5%, passkey >= 0.8) say on this row."""
    ratio = metric(payload["patched_results"], f"divergence.pydoc.ppl_ratio@{length}")
    passkey = metric(payload["patched_results"], f"ruler.niah_single@{length}")
    caught = ratio is not None and ratio > 1.05
    caught = caught or (passkey is not None and passkey < 0.8)
    shown = f"ppl x{ratio:.3f}" + (f", passkey {passkey:.2f}" if passkey is not None else ", no passkey run")
    return ("caught" if caught else "missed") + f" ({shown})"


def caught_by(payload: dict, status: str) -> str:
    gates = [g for g in payload["gates"] if g["status"] == status]
    return "; ".join(f"{g['metric']} {g['after']:.4g}" for g in gates[:3]) or "—"


def with_ci(result, name: str) -> str:
    low, high = result.intervals[name]
    return f"{result.metrics[name]:.3g} [{low:.3g}, {high:.3g}]"


def kl_table(root: Path, healed: Path, length: int) -> list[str]:
    """Mean KL and top-1 agreement at `length` on pydoc (2 windows), chunked through the cache."""
    from surgery.evaluate import make_eval

    rows = ["| variant | mean KL [95%] | top-1 agreement [95%] | ppl ratio |", "|---|---:|---:|---:|"]
    variants = {
        "kv-quant int8": patch("kv-quant", bits=8),
        "kv-quant int4": patch("kv-quant", bits=4),
        "kv-quant int2": patch("kv-quant", bits=2),
        "fp8 (transformers)": patch("kv-quant", method="fp8"),
        "yarn x2": patch("yarn", factor=2),
        "mqa fitted, no heal": str(root / slug("mqa fitted, no heal")),
        "mqa fitted + heal (recipe)": str(healed),
    }
    for name, make in variants.items():
        if isinstance(make, str):
            if not Path(make, "config.json").is_file():
                rows.append(f"| {name} | (missing {make}) | | |")
                continue
            model, tok = surgery.load_model(make, dtype="float32")
        else:
            model, tok = surgery.load_model(ORIGINAL, dtype="float32")
            make(model, tok)
        chunk = 512 if name.startswith(("kv", "fp8")) else None
        e = make_eval("divergence", reference=ORIGINAL, length=length, samples=2, chunk=chunk)
        r = e.run(model, tok)
        d = f"divergence.{e.domain}"  # pydoc-chunk512 when the cache is read
        shown = [with_ci(r, f"{d}.{m}@{length}") for m in ("kl", "top1")]
        rows.append(f"| {name} | {' | '.join(shown)} | {r.metrics[f'{d}.ppl_ratio@{length}']:.3f} |")
        print(rows[-1], flush=True)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=2.0, help="minutes per check (scales samples)")
    parser.add_argument("--out", type=Path, default=Path("runs/guard"))
    parser.add_argument("--healed", type=Path, default=Path("out/smollm2-mqa-healed"))
    parser.add_argument("--only", nargs="*", help="run only these rows")
    parser.add_argument("--kl-length", type=int, default=0, help="also the KL table at this length")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = args.out / "models"
    root.mkdir(parents=True, exist_ok=True)
    done = json.loads((args.out / "guard.json").read_text()) if (args.out / "guard.json").is_file() else []
    rows = [r for r in done if args.only and r["variant"] not in args.only]  # --only reruns some rows, keeps the rest
    # cheap rows first, the ones that need minutes of fitting or a recipe run last
    order = sorted(
        [("damaging", n, m) for n, m in DAMAGING.items()] + [("benign", n, m) for n, m in BENIGN.items()],
        key=lambda row: (row[2] == "HEALED", "fitted" in row[1]),
    )
    for expected, name, make in order:
        if args.only and name not in args.only:
            continue
        path = build(name, make, root, args.healed)
        if path is None:
            continue
        code, seconds, payload = run_check(path, args.out / "reports" / path.name, args.length, args.budget)
        status = {0: "pass", 1: "fail", 3: "inconclusive"}[code]
        row = {
            "variant": name,
            "expected": expected,
            "status": status,
            "right": (status == "fail") if expected == "damaging" else (status == "pass"),
            "seconds": seconds,
            "budget": args.budget,
            "caught_by": caught_by(payload, "fail" if status == "fail" else "inconclusive"),
            "old_gates": old_gates(payload, args.length),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "guard.json").write_text(json.dumps(rows, indent=2) + "\n")
    damaging = [r for r in rows if r["expected"] == "damaging"]
    benign = [r for r in rows if r["expected"] == "benign"]
    lines = [
        f"Checked at {args.length} tokens, on {os.cpu_count()} CPU cores; budget: the `--budget` of each check (minutes).",
        "",
        "| variant | expected | verdict | gate that decided | pre-check gates | budget | wall s |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        verdict = r["status"].upper() if r["right"] else f"**{r['status'].upper()}**"
        lines.append(
            f"| {r['variant']} | {r['expected']} | {verdict} | {r['caught_by']} | {r['old_gates']} "
            f"| {r.get('budget', args.budget):g} | {r['seconds']:.0f} |"
        )
    if damaging:
        lines.append(f"\ncatch rate {sum(r['status'] == 'fail' for r in damaging)}/{len(damaging)}")
    if benign:
        lines.append(f"false alarms {sum(r['status'] == 'fail' for r in benign)}/{len(benign)}")
    unsure = [r["variant"] for r in rows if r["status"] == "inconclusive"]
    if unsure:
        lines.append(f"inconclusive: {', '.join(unsure)}")
    missed = [r["variant"] for r in damaging if r["old_gates"].startswith("missed")]
    lines.append(f"missed by the pre-check gates: {', '.join(missed) or 'none'}")
    if args.kl_length:
        lines += ["", f"Divergence at {args.kl_length} tokens (pydoc, 2 windows):", ""]
        lines += kl_table(root, args.healed, args.kl_length)
    text = "\n".join(lines) + "\n"
    (args.out / "guard.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
