"""A whole `cfrobust train` on the CPU with and without one of the process settings that
`cfrobust` makes before training, run alternately.

    python bench/process_settings_bench.py --setting {malloc,openmp} [--repeats 4] [--epochs 2]
                                           [--arch simple-cnn] [--cf tile]

--setting malloc: glibc's malloc defaults (CFROBUST_SYSTEM_MALLOC=1) against the freed-memory
retention of cfrobust/host_memory.py. --setting openmp: libgomp's default spin-waiting
(CFROBUST_OPENMP_DEFAULTS=1) against the shorter spin of cfrobust/openmp_spin.py. Each run is a
fresh `python -m cfrobust train` process (built-in dataset, 64 px, batch 64, no loader workers).
This machine's speed drifts between runs, so runs alternate and the ratios are medians over the
pairs of neighbouring runs. Prints median wall time and peak resident memory with those ratios.
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

from cfrobust.host_memory import USER_SETTINGS as MALLOC_SETTINGS
from cfrobust.openmp_spin import USER_SETTINGS as OPENMP_SETTINGS

# setting -> (name and environment of the baseline, name of cfrobust's choice)
SETTINGS = {
    "malloc": (("glibc defaults", {"CFROBUST_SYSTEM_MALLOC": "1"}), "retained"),
    "openmp": (("libgomp spin", {"CFROBUST_OPENMP_DEFAULTS": "1"}), "short spin"),
}


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
    # Neither the user's malloc nor OpenMP settings: both runs start from cfrobust's own choices.
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS + OPENMP_SETTINGS} | extra_env
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, required=True)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--cf", default="tile")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cfrobust-process-settings-bench")
    args = parser.parse_args()
    (baseline, baseline_env), chosen = SETTINGS[args.setting]
    shards = make_shards(args.work)
    runs: dict[str, list] = {baseline: [], chosen: []}
    for _ in range(args.repeats):
        runs[baseline].append(timed_train(shards, args.work / "run", args, baseline_env))
        runs[chosen].append(timed_train(shards, args.work / "run", args, {}))
    print(f"cfrobust train --arch {args.arch} --cf {args.cf} --epochs {args.epochs}, built-in dataset at 64 px; "
          f"medians of {args.repeats} alternating runs, ratios to the {baseline} run beside each")
    for mode, results in runs.items():
        seconds, memory = (statistics.median(column) for column in zip(*results))
        time_ratio, memory_ratio = (statistics.median(mine / theirs for mine, theirs in zip(column, base_column))
                                    for column, base_column in zip(zip(*results), zip(*runs[baseline])))
        print(f"{mode:16s} {seconds:7.1f} s ({time_ratio:.2f}x)   peak {memory:7.0f} MiB ({memory_ratio:.2f}x)")


if __name__ == "__main__":
    main()
