"""A whole `cfrobust train` on the CPU with glibc's malloc defaults and with the freed-memory
retention that `cfrobust train` sets up (cfrobust/host_memory.py), run alternately.

    python bench/host_memory_bench.py [--repeats 4] [--epochs 2] [--arch simple-cnn] [--cf tile]

Each run is a fresh `python -m cfrobust train` process (built-in dataset, 64 px, batch 64, no
loader workers); CFROBUST_SYSTEM_MALLOC=1 gives the baseline. Prints the median wall time and
peak resident memory of each and their ratios.
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

MODES = {"glibc defaults": {"CFROBUST_SYSTEM_MALLOC": "1"}, "retained": {}}


def make_shards(work: Path) -> Path:
    shards = work / "shards"
    if not (shards / "train" / "_info.json").exists():
        subprocess.run([sys.executable, "-m", "cfrobust", "preprocess", "--dataset", "synthetic", "--out", str(shards),
                        "--size", "64", "--cf", "tile", "--overwrite"], check=True, capture_output=True)
    return shards


def timed_train(shards: Path, out: Path, args, extra_env: dict) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one training process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cfrobust", "train", "--shards", str(shards), "--out", str(out), "--quiet",
               "--arch", args.arch, "--epochs", str(args.epochs), "--batch", "64", "--workers", "0", "--cf", args.cf]
    env = {k: v for k, v in os.environ.items() if k != "CFROBUST_SYSTEM_MALLOC"} | extra_env
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--cf", default="tile")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cfrobust-host-memory-bench")
    args = parser.parse_args()
    shards = make_shards(args.work)
    runs = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, extra_env in MODES.items():
            runs[mode].append(timed_train(shards, args.work / "run", args, extra_env))
    print(f"cfrobust train --arch {args.arch} --cf {args.cf} --epochs {args.epochs}, built-in dataset at 64 px; "
          f"medians of {args.repeats} alternating runs")
    base_seconds, base_memory = (statistics.median(column) for column in zip(*runs["glibc defaults"]))
    for mode, results in runs.items():
        seconds, memory = (statistics.median(column) for column in zip(*results))
        print(f"{mode:16s} {seconds:7.1f} s ({seconds / base_seconds:.2f}x)   peak {memory:7.0f} MiB "
              f"({memory / base_memory:.2f}x)")


if __name__ == "__main__":
    main()
