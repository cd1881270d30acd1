"""Streaming vs in-memory `gqa` conversion of a synthetic Llama-2-style MHA checkpoint (random
fp16 weights, several shards), both paths in one run, each as a fresh `surgery` process.

    python bench/gqa_streaming.py [--layers 24] [--hidden 2048] [--kv 4] [--shard-mb 500]

Prints the parameter count, wall time and peak RSS of each path and their ratios, and checks the
two outputs are identical tensor for tensor. The orchestrating process imports only the standard
library: Linux carries a parent's peak RSS into its children, so generation and verification run
as subprocesses too."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def synthetic_checkpoint(path: Path, layers: int, hidden: int, shard_mb: int) -> int:
    """Write a random MHA Llama checkpoint shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from surgery.models import skeleton

    heads = hidden // 128
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=4096,
        dtype="float16",
    )
    config.architectures = ["LlamaForCausalLM"]
    path.mkdir(parents=True)
    config.save_pretrained(path)
    shapes = {n: p.shape for n, p in skeleton(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        size += current[name].numel() * 2
        if size >= shard_mb * 2**20:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(t.numel() * 2 for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(s.numel() for s in shapes.values())


def sectors_written() -> int:
    """Sectors written to all block devices so far (/proc/diskstats), 0 where unavailable."""
    try:
        return sum(int(line.split()[9]) for line in Path("/proc/diskstats").read_text().splitlines())
    except (OSError, IndexError, ValueError):
        return 0


def wait_for_idle_disk(quiet_s: int = 5, limit_s: int = 120) -> None:
    """Block until nothing was written to disk for `quiet_s` seconds: after a multi-GB write and
    sync the file system keeps writing (journal, discards) for a while, and a run started then pays
    for the previous one. Measured here: 500 MB copies took 1.7-2.5 s in that window, 0.5 s after."""
    os.sync()
    deadline, last, quiet = time.time() + limit_s, sectors_written(), 0
    while quiet < quiet_s and time.time() < deadline:
        time.sleep(1)
        now = sectors_written()
        quiet = quiet + 1 if now == last else 0
        last = now


def timed(cmd: list[str]) -> tuple[float, float]:
    wait_for_idle_disk()  # each run starts on an idle disk, whatever the previous one wrote
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, rusage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, rusage.ru_maxrss / 1024


def verify(streamed_dir: Path, loaded_dir: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    loaded = {}  # tensor name -> file of the in-memory output
    for f in loaded_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            loaded.update(dict.fromkeys(h.keys(), f))
    count = 0
    for shard in sorted(streamed_dir.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            with safe_open(loaded[name], "pt") as h:
                assert torch.equal(tensor, h.get_tensor(name)), name
            count += 1
    assert count == len(loaded)
    print(f"outputs identical tensor for tensor ({count} tensors)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--verify", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--kv", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (I/O timings on shared disks vary)")
    args = parser.parse_args()
    if args.generate:
        params = synthetic_checkpoint(args.generate, args.layers, args.hidden, args.shard_mb)
        nshards = len(list(args.generate.glob("*.safetensors")))
        print(f"synthetic MHA checkpoint: {params / 1e9:.2f}B parameters, fp16, {nshards} shards")
        return
    if args.verify:
        verify(*args.verify)
        return
    work = Path(tempfile.mkdtemp(prefix="surgery-stream-"))
    me = [sys.executable, __file__]
    try:
        src = work / "mha"
        shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--shard-mb", str(args.shard_mb)]
        subprocess.run([*me, "--generate", str(src), *shape], check=True)
        runs: dict[str, list[tuple[float, float]]] = {"--no-streaming": [], "--streaming": []}
        order = ("--no-streaming", "--streaming", "--streaming", "--no-streaming") * args.rounds  # ABBA...
        for mode in order:
            out = work / mode.lstrip("-")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "surgery.cli", "apply", "gqa", "--num-kv-heads", str(args.kv)]
            runs[mode].append(timed([*cmd, str(src), "-o", str(out), mode]))
            print(f"{mode:16s} wall {runs[mode][-1][0]:7.1f} s   peak RSS {runs[mode][-1][1]:8.0f} MiB")
        summary = {m: (statistics.median(r[0] for r in v), max(r[1] for r in v)) for m, v in runs.items()}
        (t_mem, r_mem), (t_str, r_str) = summary["--no-streaming"], summary["--streaming"]
        for m, v in runs.items():
            walls = sorted(r[0] for r in v)
            print(f"{m}: median wall {statistics.median(walls):.1f} s (range {walls[0]:.1f}-{walls[-1]:.1f})")
        print(f"streaming / in-memory: time {t_str / t_mem:.2f}x, peak RSS {r_str / r_mem:.2f}x")
        subprocess.run([*me, "--verify", str(work / "streaming"), str(work / "no-streaming")], check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
