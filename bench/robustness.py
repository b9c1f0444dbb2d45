"""Robustness on the built-in benchmark family: the recipe against ERM, its terms alone and in pairs,
the ideal (ERM on the uncorrelated twin) and the group-balanced oracle, on test worst-group accuracy.

    python bench/robustness.py --out /tmp/robustness [--quick] [--members shapes,small]
                               [--seeds 0,1,2] [--arch simple-cnn] [--runs erm,recipe,ideal]
                               [--json FILE] [--set KEY=VALUE ...]

Every member of the family (`cfrobust preprocess --dataset synthetic --variant NAME`) is made
twice per seed, correlated and as its twin (the same objects, backgrounds drawn independently of
the label), into shards at 64 px; each run trains with the CLI's defaults except the options
named in RUNS (and --set, for trying a change everywhere). The table gives mean ± std over the
seeds of the test split's worst-group and mean accuracy, and writes them as JSON.
Runs are cached under --out by their settings, so an interrupted bench continues where it stopped.
--quick: `small` (two classes, so the default factual pairing with its blend erosion, and objects
of 10-20% of the side, whose thin outlines a cruder erosion lost), one seed, ERM / recipe / ideal,
for a check within the 10-minute goal on 2 cores (README gives its time). `four-class`, the member
with the official pairing, takes about 11 minutes so: `--members four-class --seeds 0 --runs
erm,recipe,ideal`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from cfrobust.openmp_spin import shorten_openmp_spin

shorten_openmp_spin()  # as `cfrobust` does before torch loads

from cfrobust.datasets import open_dataset  # noqa: E402
from cfrobust.datasets.synthetic_variants import VARIANT_NAMES  # noqa: E402
from cfrobust.preprocess.pipeline import preprocess  # noqa: E402
from cfrobust.trainer.config import TrainConfig  # noqa: E402
from cfrobust.trainer.train import train  # noqa: E402

RECIPE = {"cf": "tile", "f": "mrand", "reg": "bbox_o"}  # every other option at the CLI's default
RUNS = {
    "erm": ({}, "correlated"),
    "recipe": (RECIPE, "correlated"),
    "cf_only": ({"cf": "tile"}, "correlated"),
    "f_only": ({"f": "mrand"}, "correlated"),
    "sal_only": ({"reg": "bbox_o"}, "correlated"),
    "f_cf": ({"cf": "tile", "f": "mrand"}, "correlated"),  # the recipe without Sal
    "f_sal": ({"f": "mrand", "reg": "bbox_o"}, "correlated"),  # the recipe without CF
    "ideal": ({}, "twin"),
    "oracle": ({"balance_groups": True}, "correlated"),
}
FIGURES = ("worst_group_accuracy", "accuracy")
FULL_SIZES = (2400, 400, 800)
QUICK = {"members": ["small"], "seeds": [0], "runs": ["erm", "recipe", "ideal"], "sizes": FULL_SIZES}


def make_shards(root: Path, member: str, seed: int, twin: bool, sizes) -> Path:
    shards = root / "data" / f"{member}-seed{seed}-{'twin' if twin else 'correlated'}-{'x'.join(map(str, sizes))}"
    if not (shards / "test" / "_info.json").exists():
        dataset = open_dataset("synthetic", seed=seed, sizes=sizes, variant=member, twin=twin)
        preprocess(dataset, shards, ["tile"], shard_size=max(1, sizes[0] // 8), overwrite=True, progress=False)
    return shards


def run_one(root: Path, member: str, seed: int, run: str, arch: str, sizes, extra: dict) -> dict:
    options, data = RUNS[run]
    shards = root / "data" / f"{member}-seed{seed}-{'twin' if data == 'twin' else 'correlated'}-{'x'.join(map(str, sizes))}"
    config = TrainConfig(shards=str(shards), arch=arch, seed=seed, workers=0, quiet=True, overwrite=True,
                         **{**options, **extra})
    # Cached by every setting of the run: a changed default or --set trains anew.
    settings = json.dumps({k: v for k, v in config.to_dict().items() if k not in ("out", "shards")}, sort_keys=True)
    out = root / "runs" / member / f"{run}-seed{seed}-{hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()}"
    if not (out / "eval.json").exists():
        make_shards(root, member, seed, data == "twin", sizes)
        train(replace(config, out=str(out)))
    return json.loads((out / "eval.json").read_text())["splits"]["test"]


def parse_sets(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs, each value typed as TrainConfig's field."""
    defaults = TrainConfig()
    values = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"--set {key}: not a train option (TrainConfig field)")
        kind = type(getattr(defaults, key))
        values[key] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
    return values


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--members", default=None, help=f"comma-separated, from {', '.join(VARIANT_NAMES[1:])}")
    parser.add_argument("--seeds", default=None)
    parser.add_argument("--runs", default=None, help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--sizes", default=None, help="train,val,test images per member (default 2400,400,800)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig option for every run")
    args = parser.parse_args()
    members = args.members.split(",") if args.members else (QUICK["members"] if args.quick else list(VARIANT_NAMES[1:]))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else (QUICK["seeds"] if args.quick else [0, 1, 2])
    runs = args.runs.split(",") if args.runs else (QUICK["runs"] if args.quick else list(RUNS))
    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else (QUICK["sizes"] if args.quick else FULL_SIZES)
    extra = parse_sets(args.set)
    results: dict = {}
    start = time.perf_counter()
    for member in members:
        for run in runs:
            for seed in seeds:
                test = run_one(args.out, member, seed, run, args.arch, sizes, extra)
                cell = results.setdefault(member, {}).setdefault(run, {f: [] for f in FIGURES})
                for figure in FIGURES:
                    cell[figure].append(test[figure])
                print(f"{member} {run} seed {seed}: worst group {test['worst_group_accuracy']:.3f}, "
                      f"accuracy {test['accuracy']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\ntest split, {args.arch}, seeds {','.join(map(str, seeds))}, mean ± std; worst-group / accuracy")
    print("| member | " + " | ".join(runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for member, by_run in results.items():
        cells = [f"{summary(by_run[r]['worst_group_accuracy'])} / {summary(by_run[r]['accuracy'])}" for r in runs]
        print(f"| {member} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "seeds": seeds, "sizes": sizes, "set": extra,
                                         "results": results}, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
