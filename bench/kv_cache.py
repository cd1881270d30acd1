"""Every KV cache on the embedded model, in one run: bytes held at a long context, decode time per
token there, and held-out perplexity fed through the cache in chunks (so quantization is seen).

    python bench/kv_cache.py [--context 4096] [--decode 32] [--ppl-length 4096] [--chunk 512] [--divergence]

Caches: transformers' dynamic cache (the baseline, in the model's float32), surgery's KIVI int8 /
int4 / int2, transformers' fp8 backend (dynamic: the first chunk's absmax), surgery's fp8 with
static scales calibrated on the train split (per tensor and per kv head, as vLLM runs them), and
optimum-quanto int4 when that package imports. `--divergence` adds mean KL and top-1 agreement
against the exact model on the same held-out windows, fed through the cache in chunks. The
16-bit figure is half the measured float32 cache: a dynamic cache's bytes are numel x element
size, so this is exact, not an estimate. Ratios are against the baseline measured in this run."""

from __future__ import annotations

import argparse
import copy
import importlib.util

import surgery
from surgery.evaluate import make_eval


def variants() -> dict[str, dict | None]:
    out: dict[str, dict | None] = {
        "dynamic (fp32)": None,
        "kivi int8": {"bits": 8},
        "kivi int4": {"bits": 4},
        "kivi int2": {"bits": 2},
        "kivi int2 g32": {"bits": 2, "group_size": 32},
        "fp8 (transformers)": {"method": "fp8"},
        "fp8 tensor scales": {"method": "fp8", "scales": "tensor"},
        "fp8 head scales": {"method": "fp8", "scales": "head"},
    }
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        out["quanto int4"] = {"quanto": 4}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--ppl-length", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--only", help="comma-separated variant names (substring match)")
    parser.add_argument("--rounds", type=int, default=2, help="speed rounds, alternating order; the best is kept")
    parser.add_argument("--divergence", action="store_true", help="also mean KL and top-1 against the exact model")
    args = parser.parse_args()
    base, tokenizer = surgery.load_model("smollm2", dtype="float32")
    speed = make_eval("speed", context=args.context, decode=args.decode)
    ppl = make_eval("perplexity", lengths=[args.ppl_length], chunk=args.chunk)
    chosen = {n: p for n, p in variants().items() if not args.only or any(s in n for s in args.only.split(","))}
    models = {}
    for name, params in chosen.items():
        model = copy.deepcopy(base)
        if params and "quanto" in params:
            model.generation_config.cache_implementation = "quantized"
            model.generation_config.cache_config = {"backend": "quanto", "nbits": params["quanto"]}
        elif params:
            surgery.apply(model, "kv-quant", tokenizer=tokenizer, **params)
        models[name] = model
    speeds: dict[str, list[dict[str, float]]] = {n: [] for n in chosen}
    for r in range(args.rounds):  # alternate the order so drift on a shared machine hits all caches alike
        for name in list(chosen)[:: 1 if r % 2 == 0 else -1]:
            speeds[name].append(speed.run(models[name], tokenizer).metrics)
            print(f"round {r + 1} {name:20s} decode {speeds[name][-1]['speed.decode_ms']:7.1f} ms/token", flush=True)
    rows, agreement = [], {}
    div = make_eval("divergence", reference="smollm2", length=args.ppl_length, samples=2, chunk=args.chunk)
    for name in chosen:
        runs = speeds[name]
        p = ppl.run(models[name], tokenizer).metrics[f"perplexity.ppl@{args.ppl_length}"]
        if args.divergence:
            m = div.run(models[name], tokenizer).metrics
            kl = next(v for k, v in m.items() if k.endswith(f".kl@{args.ppl_length}"))
            top1 = next(v for k, v in m.items() if k.endswith(f".top1@{args.ppl_length}"))
            agreement[name] = (kl, top1)
        kv = next(v for k, v in runs[0].items() if ".kv_bytes@" in k)
        dec = min(m["speed.decode_ms"] for m in runs)
        pre = max(m["speed.prefill_tok_s"] for m in runs)
        rows.append((name, kv, dec, pre, p))
        print(f"{name:20s} kv {kv / 2**20:8.2f} MiB  decode {dec:7.1f} ms/token  ppl {p:.4f}", flush=True)
    kv0, dec0, _, ppl0 = rows[0][1], rows[0][2], rows[0][3], rows[0][4]
    tokens = args.context + args.decode
    print(
        f"\n{tokens} tokens in the cache; decode: best of {args.rounds} rounds; ppl@{args.ppl_length} fed in chunks of {args.chunk}"
    )
    extra = " mean KL | top-1 |" if agreement else ""
    print("| cache | KV MiB | vs 16-bit | decode ms/token | vs dynamic | prefill tok/s | ppl | vs dynamic |" + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if agreement else ""))
    for name, kv, dec, pre, p in rows:
        kl = f" {agreement[name][0]:.2e} | {agreement[name][1]:.4f} |" if agreement else ""
        print(
            f"| {name} | {kv / 2**20:.2f} | {kv / (kv0 / 2):.3f}x | {dec:.1f} | {dec / dec0:.2f}x | {pre:.0f} "
            f"| {p:.4f} | {100 * (p / ppl0 - 1):+.2f}% |" + kl
        )


if __name__ == "__main__":
    main()
