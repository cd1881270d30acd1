"""How fast the quick commands start: `surgery --help`, `list`, `validate RECIPE` (no --model) and
`apply yarn --help`, each in a fresh interpreter, against `python -c "import torch, transformers"`
(the floor of any command that touches a tensor) measured in the same run.

    python bench/startup.py [--repeat 5]

Each figure is the fastest of `--repeat` runs (the least disturbed by other work on the machine),
and the last column the ratio to the import baseline."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "import torch, transformers": [sys.executable, "-c", "import torch, transformers"],
    "surgery --help": [sys.executable, "-m", "surgery.cli", "--help"],
    "surgery list": [sys.executable, "-m", "surgery.cli", "list"],
    "surgery validate RECIPE": [sys.executable, "-m", "surgery.cli", "validate", "recipes/smollm2-mqa-heal.yaml"],
    "surgery apply yarn --help": [sys.executable, "-m", "surgery.cli", "apply", "yarn", "--help"],
}


def fastest(command: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    times = {name: fastest(command, args.repeat) for name, command in COMMANDS.items()}
    base = times["import torch, transformers"]
    print(f"| command | wall s (fastest of {args.repeat}) | vs importing torch + transformers |")
    print("|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
