"""Load times of the embedded model and the cost of `surgery apply yarn` with weights loaded vs
config-only, measured in one run. Each step runs as a fresh `surgery` process (what a user pays,
imports included); peak RSS comes from the kernel's accounting of that child.

    python bench/apply_config_only.py [--model smollm2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SURGERY = [sys.executable, "-m", "surgery.cli"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one child process."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
        out.seek(0)
        return wall, rusage.ru_maxrss / 1024, out.read().strip()


def load_cmd(model: str) -> list[str]:
    code = f"import surgery, time; t=time.perf_counter(); surgery.load_model({model!r}); print(time.perf_counter()-t)"
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surgery-bench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SURGERY_CACHE": str(work / "cache")}
    rows = []
    try:
        first = timed(load_cmd(args.model), env)  # empty cache: GGUF conversion
        cached = [timed(load_cmd(args.model), env) for _ in range(args.repeat)]
        rows.append(("load_model, first (converts GGUF)", first[:2]))
        rows.append(("load_model, cached", median(cached)))
        inner = statistics.median(float(c[2]) for c in cached)
        for label, extra in (("apply yarn x4, weights loaded", ["--load-weights"]), ("apply yarn x4, config only", [])):
            runs = []
            for i in range(args.repeat):
                out = work / f"out-{i}"
                runs.append(
                    timed([*SURGERY, "apply", "yarn", "--factor", "4", args.model, "-o", str(out), *extra], env)
                )
                shutil.rmtree(out, ignore_errors=True)
            rows.append((label, median(runs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'step':40s} {'wall s':>8s} {'peak RSS MiB':>13s}")
    for label, (wall, rss) in rows:
        print(f"{label:40s} {wall:8.2f} {rss:13.0f}")
    print(f"load_model call alone, cached, fresh process: {inner:.2f} s (first: {float(first[2]):.2f} s)")
    loaded, config_only = rows[2][1], rows[3][1]
    print(
        f"config-only / weights-loaded: time {config_only[0] / loaded[0]:.2f}x, peak RSS {config_only[1] / loaded[1]:.2f}x"
    )


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


if __name__ == "__main__":
    main()
