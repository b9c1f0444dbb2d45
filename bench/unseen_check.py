"""The recipe on data nobody tuned for: bench/unseen_waterbirds.py's hold-out set, run as a user would.

    python bench/unseen_check.py --out /tmp/unseen [--seeds 0,1,2] [--runs erm,recipe,ideal]
                                 [--arch simple-cnn] [--corr 0.95] [--sizes 2400,400,800]
                                 [-- EXTRA TRAIN OPTIONS]

For each seed it writes the hold-out set and its uncorrelated twin in the Waterbirds layout, turns
each into shards with `cfrobust preprocess --dataset waterbirds` (every option at its default,
so the stored size is the default rule's), and trains with `cfrobust train`, naming nothing but
the architecture, the seed and the run's terms:

    erm     cfrobust train --shards DATA --arch ARCH --seed S
    recipe  cfrobust train --shards DATA --arch ARCH --seed S --cf tile --f mrand --reg bbox_o
    ideal   cfrobust train --shards TWIN --arch ARCH --seed S

Everything goes through the installed `cfrobust` command, in subprocesses, the way a user's data
would. Finished runs (an eval.json) are kept and read back, so an interrupted check continues.
Options after `--` go to every `cfrobust train`; they and the trainer's defaults name the run folder,
so a change of either trains anew.
Prints the test split's worst-group and mean accuracy per seed and as mean ± std, and the
recipe's share of the ideal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cfrobust.trainer.config import TrainConfig

HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = "2400,400,800"  # train, val, test images
CFROBUST = str(Path(sys.executable).with_name("cfrobust"))
RUNS = {
    "erm": ([], "data"),
    "recipe": (["--cf", "tile", "--f", "mrand", "--reg", "bbox_o"], "data"),
    "ideal": ([], "twin"),
}


def shell(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def size_tag(sizes: str) -> str:
    """What folder names add for sizes other than the default ('-9600x400x800')."""
    return "" if sizes == DEFAULT_SIZES else "-" + sizes.replace(",", "x")


def make_shards(out: Path, seed: int, twin: bool, corr: float, sizes: str) -> Path:
    name = f"seed{seed}-{'twin' if twin else f'corr{corr}'}{size_tag(sizes)}"
    images, shards = out / "images" / name, out / "shards" / name
    if not (shards / "test" / "_info.json").exists():
        shell([sys.executable, str(HERE / "unseen_waterbirds.py"), "--out", str(images), "--seed", str(seed),
               "--corr", str(corr), "--sizes", sizes, "--overwrite", *(["--twin"] if twin else [])])
        shell([CFROBUST, "preprocess", "--dataset", "waterbirds", "--root", str(images), "--out", str(shards),
               "--cf", "tile", "--overwrite"])
    return shards


def run_one(out: Path, seed: int, run: str, arch: str, corr: float, sizes: str, extra: list[str]) -> dict:
    terms, data = RUNS[run]
    # Named by the options passed and by every default of the trainer: a changed default trains anew.
    settings = json.dumps({"extra": extra, "defaults": TrainConfig().to_dict()}, sort_keys=True)
    tag = hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()
    folder = out / "runs" / f"{run}-{arch}-seed{seed}-corr{corr}{size_tag(sizes)}-{tag}"
    if not (folder / "eval.json").exists():
        shards = make_shards(out, seed, data == "twin", corr, sizes)
        shell([CFROBUST, "train", "--shards", str(shards), "--out", str(folder), "--arch", arch,
               "--seed", str(seed), *terms, *extra, "--quiet", "--overwrite"])
    return json.loads((folder / "eval.json").read_text())["splits"]["test"]


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default="erm,recipe,ideal", help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--corr", type=float, default=0.95, help="training correlation of label and place")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="train,val,test images (val and test: multiples of 4)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    seeds, runs = [int(s) for s in args.seeds.split(",")], args.runs.split(",")
    worst: dict[str, list[float]] = {run: [] for run in runs}
    accuracy: dict[str, list[float]] = {run: [] for run in runs}
    start = time.perf_counter()
    for seed in seeds:
        for run in runs:
            test = run_one(args.out, seed, run, args.arch, args.corr, args.sizes, extra)
            worst[run].append(test["worst_group_accuracy"])
            accuracy[run].append(test["accuracy"])
            print(f"seed {seed} {run}: worst group {test['worst_group_accuracy']:.3f}, accuracy {test['accuracy']:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\ntest split, {args.arch}, corr {args.corr}, sizes {args.sizes}, seeds {args.seeds}{' ' + ' '.join(extra) if extra else ''}; "
          f"worst group mean ± std / accuracy mean")
    for run in runs:
        print(f"{run:8s} {mean_std(worst[run])} / {statistics.mean(accuracy[run]):.3f}   per seed: "
              + ", ".join(f"{value:.3f}" for value in worst[run]))
    if "recipe" in runs and "ideal" in runs and statistics.mean(worst["ideal"]) > 0:
        print(f"recipe / ideal (worst group): {statistics.mean(worst['recipe']) / statistics.mean(worst['ideal']):.2f}x")


if __name__ == "__main__":
    main()
