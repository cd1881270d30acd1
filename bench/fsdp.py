"""Time per finetune step of one process against two under accelerate launch (data parallel, and
FSDP2 with the shipped configs/accelerate/fsdp-8gpu.yaml), on CPU over gloo, with the same global
batch: a small random Llama and the character tokenizer, full fine-tuning of every parameter.

    python bench/fsdp.py [--steps 20] [--hidden 256] [--layers 4] [--seq-len 128] [--batch 8]

For the record: every process runs one thread, so two processes use two cores where one uses
one; the FSDP row against the data-parallel row is the cost of sharding (gathers, reduce-scatters). Each run's time is the
finetune's own (state.json), not process start-up."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp-8gpu.yaml"


def build(path: Path, hidden: int, layers: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgery
    from tests.conftest import char_tokenizer

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    surgery.save(LlamaForCausalLM(config), char_tokenizer(), path)


def run(work: Path, model: Path, name: str, batch: int, args: argparse.Namespace, launch: list[str]) -> dict:
    heal = {"method": "full", "max_steps": args.steps, "seq_len": args.seq_len, "batch_size": batch}
    recipe = work / f"{name}.yaml"
    recipe.write_text(json.dumps({"model": str(model), "dtype": "float32", "seed": 0, "steps": [{"finetune": heal}]}))
    out = work / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread per process
    tail = ["-m", "surgery.cli", "run", str(recipe), "--out", str(out)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, *tail] if launch else [sys.executable, *tail]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads((out / "state.json").read_text())["finetunes"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    args = parser.parse_args()
    two = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with tempfile.TemporaryDirectory(prefix="surgery-fsdp-") as tmp:
        work = Path(tmp)
        model = work / "model"
        subprocess.run(
            [sys.executable, __file__, "--build", str(model), str(args.hidden), str(args.layers)], check=True
        )
        runs = {
            "1 process": run(work, model, "one", args.batch, args, []),
            "2 processes, data parallel": run(work, model, "ddp", args.batch // 2, args, ["--multi_gpu", *two]),
            "2 processes, FSDP2": run(work, model, "fsdp", args.batch // 2, args, ["--config_file", str(CONFIG), *two]),
        }
    base = runs["1 process"]
    print(
        f"full fine-tune, {args.steps} steps of {args.batch} x {args.seq_len} tokens (global), {args.layers} layers x {args.hidden}"
    )
    print("| run | s/step | vs 1 process | final loss | loss gap to 1 process |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        step = r["seconds"] / args.steps
        gap = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        print(
            f"| {name} ({r['parallel']}) | {step:.3f} | {step / (base['seconds'] / args.steps):.2f} | {r['losses'][-1]:.4f} | {gap:.1e} |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
