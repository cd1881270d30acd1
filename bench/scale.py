"""Scale on a synthetic >= 1B-parameter checkpoint (the one bench/gqa_streaming.py builds: random
fp16 Llama-2-style MHA weights in several shards), everything measured in one run, each step as a
fresh process (what a user pays, imports included; peak RSS from the kernel's accounting):

- `surgery apply yarn --factor 4` by the config route (no weights read) against `--load-weights`;
- the recipe gqa (mean, 4 kv heads) + yarn x4 + save through `surgery run`, whose leading patch
  steps run on disk (stream, then config), against the same patches fully in memory
  (`surgery.apply_to_checkpoint(..., route="memory")`); the outputs are checked identical;
- the start-up of the quick commands against `python -c "import torch, transformers"`.

    python bench/scale.py [--layers 24] [--hidden 2048] [--work DIR] [--out bench/results/scale.md]

`--work` puts the checkpoints on another file system: the config route clones weight files, by
reflink where the file system has them (XFS, btrfs: no byte copied), else by copy_file_range.

The orchestrating process imports only the standard library (a parent's peak RSS would carry into
its children)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gqa_streaming import timed, wait_for_idle_disk  # noqa: E402  (standard library only)
from startup import fastest  # noqa: E402

SURGERY = [sys.executable, "-m", "surgery.cli"]
MEMORY = """
import sys, surgery
surgery.apply_to_checkpoint(sys.argv[1], [surgery.make_patch("gqa", num_kv_heads={kv}, method="mean"),
                            surgery.make_patch("yarn", factor=4)], sys.argv[2], route="memory")
"""


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (the longest mount point above it)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, fs, *_ = line.split()
        if str(path.resolve()).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fs
    return kind


def size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e9


def row(name: str, wall: float, rss: float, base: tuple[float, float] | None) -> str:
    ratio = f"{base[0] / wall:.1f}x faster, {rss / base[1]:.2f}x the RSS" if base else "baseline"
    return f"| {name} | {wall:.1f} | {rss:,.0f} | {ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--kv", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints go (default: the temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surgery-scale-", dir=args.work))
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    try:
        src = work / "mha"
        gen = [sys.executable, str(HERE / "gqa_streaming.py"), "--generate", str(src)]
        made = subprocess.run(
            [*gen, "--layers", str(args.layers), "--hidden", str(args.hidden)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        say(f"{made}; {size_gb(src):.2f} GB on {file_system(src)}")
        say()
        say("| yarn x4 | wall s | peak RSS MiB | vs loading the weights |")
        say("|---|---:|---:|---|")
        yarn = [*SURGERY, "apply", "yarn", "--factor", "4", str(src), "--out"]
        loaded = timed([*yarn, str(work / "yarn-loaded"), "--load-weights"])
        shutil.rmtree(work / "yarn-loaded")
        config = timed([*yarn, str(work / "yarn-config")])
        shutil.rmtree(work / "yarn-config")
        say(row("--load-weights (memory route)", *loaded, None))
        say(row("config route (weights copied, not read)", *config, loaded))
        say()

        say(f"| gqa mean {args.kv} kv heads + yarn x4 | wall s | peak RSS MiB | vs in memory |")
        say("|---|---:|---:|---|")
        memory_out = work / "memory"
        in_memory = timed([sys.executable, "-c", MEMORY.format(kv=args.kv), str(src), str(memory_out)])
        recipe = work / "recipe.yaml"
        routed_out = work / "routed"
        steps = [
            {"patch": "gqa", "num_kv_heads": args.kv, "method": "mean"},
            {"patch": "yarn", "factor": 4},
            {"save": str(routed_out)},
        ]
        recipe.write_text(json.dumps({"model": str(src), "dtype": "float16", "steps": steps}))
        routed = timed([*SURGERY, "run", str(recipe), "--out", str(work / "run")])
        say(row("apply_to_checkpoint(route='memory')", *in_memory, None))
        say(row("surgery run RECIPE (stream, then config)", *routed, in_memory))
        check = [sys.executable, str(HERE / "gqa_streaming.py"), "--verify", str(routed_out), str(memory_out)]
        say(subprocess.run(check, check=True, capture_output=True, text=True).stdout.strip())
        for d in (memory_out, routed_out, work / "run"):
            shutil.rmtree(d, ignore_errors=True)
        say()

        wait_for_idle_disk()
        say("| start-up (fastest of 3) | wall s | vs import torch, transformers |")
        say("|---|---:|---:|")
        commands = {
            "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers"],
            "surgery --help": [*SURGERY, "--help"],
            "surgery list": [*SURGERY, "list"],
            "surgery validate RECIPE": [*SURGERY, "validate", str(recipe)],
            "surgery inspect CHECKPOINT": [*SURGERY, "inspect", str(src)],
        }
        base = None
        for name, cmd in commands.items():
            wall = fastest(cmd, 3)
            base = base or wall
            say(f"| {name} | {wall:.2f} | {wall / base:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
