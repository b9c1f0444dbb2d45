"""Training throughput: the whole loop (shards -> loss -> step) against the bare model step.

    python bench/train_bench.py [--arch simple-cnn] [--size 64] [--batch 64] [--device cpu]
                                [--terms erm,cf,f_mrand,f_fgsm,sal] [--json FILE]

Measured in one run on the same machine: (a) the bare step, forward + backward + SGD step of the
model on one in-memory batch of the same shape, repeated; (b) the full loop on built-in-dataset
shards (DataLoader workers decoding JPEGs, device-side normalisation and masks, the objective,
the step) for ERM and for each added term. Prints images/s (best of --repeats runs), each
term's cost relative to the ERM loop, and loop/bare for ERM as the median of ratios between
each ERM run and a bare-step run timed just before it (this machine's speed drifts). --json
writes the figures for bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfrobust.datasets import open_dataset
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import TrainShards, make_loader, shuffle_ramp_batches
from cfrobust.trainer.config import TrainConfig
from cfrobust.distributed import DistEnv
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.optim import Schedule, make_optimizer
from cfrobust.trainer.train import Precision, TrainingParts, make_model, optimizer_step

TERMS = {
    "erm": {},
    "cf": {"cf": "tile"},
    "f_mrand": {"f": "mrand"},
    "f_fgsm": {"f": "fgsm"},
    "sal": {"reg": "bbox_o"},
}


def make_shards(root: Path, size: int, count: int, workers: int) -> Path:
    """Built-in-dataset shards, at least 8 and at least one per loader worker."""
    shard_count = max(8, workers)
    shards = root / f"shards-{size}-{count}-{shard_count}"
    if not (shards / "train" / "_info.json").exists():
        source = open_dataset("synthetic", sizes=(count, 0, 0), image_size=size)
        preprocess(source, shards, ["tile"], shard_size=max(1, count // shard_count), progress=False, overwrite=True,
                   workers=min(8, os.cpu_count() or 1))
    return shards


def parts_for(config: TrainConfig, env: DistEnv) -> TrainingParts:
    model, wrapped = make_model(config, 2, env)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator(env.device).manual_seed(0)
    return TrainingParts(wrapped, Objective(config, generator), optimizer, Schedule(optimizer, config, 1000),
                         Precision(config.precision, env.device), generator, env, config)


def bare_step(config: TrainConfig, env: DistEnv, size: int, steps: int, warmup: int) -> float:
    """Images/s of forward + backward + step on one in-memory batch (no data, no objective)."""
    model, _ = make_model(config, 2, env)
    optimizer = make_optimizer(model, config)
    precision = Precision(config.precision, env.device)
    x = torch.randn(config.batch, 3, size, size, device=env.device)
    y = torch.randint(0, 2, (config.batch,), device=env.device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(env)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        precision.backward(loss)
        precision.step(optimizer)
    sync(env)
    return steps * config.batch / (time.perf_counter() - start)


def loop(config: TrainConfig, env: DistEnv, steps: int, warmup: int) -> float:
    """Images/s of the real loop: shards through DataLoader workers, objective, step."""
    parts = parts_for(config, env)
    data = TrainShards(Path(config.shards) / "train", config.batch, [config.cf] if config.cf != "none" else [],
                       seed=0, num_workers=config.workers)
    done = 0
    while done < warmup + steps:
        for batch in make_loader(data, config.workers, pin_memory=env.device.type == "cuda"):
            if done == warmup:
                sync(env)
                start = time.perf_counter()
            optimizer_step(parts, batch.to(env.device, non_blocking=True))
            done += 1
            if done == warmup + steps:
                break
        data.set_epoch(data.epoch + 1)
    sync(env)
    return steps * config.batch / (time.perf_counter() - start)


def sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, help="untimed steps (default: until every loader worker's shuffle "
                        "buffer is full, so the timed steps read one sample per sample)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--terms", default=",".join(TERMS))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cfrobust-train-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    env = DistEnv(0, 1, 0, device)
    if args.warmup is None:
        args.warmup = shuffle_ramp_batches(args.batch, args.workers)
    samples = args.batch * (args.steps + args.warmup) * 2
    shards = make_shards(args.work, args.size, max(samples, 16 * args.workers * args.batch), args.workers)
    base = dict(shards=str(shards), out="", arch=args.arch, batch=args.batch, workers=args.workers, lr=0.01)
    # Each loop run is paired with a bare-step run just before it: this VM's speed drifts by
    # tens of percent within minutes, and a ratio of neighbours cancels most of that.
    bare: list[float] = []
    loops: dict[str, list[float]] = {name: [] for name in args.terms.split(",")}
    ratios: list[float] = []
    for _ in range(args.repeats):
        for name in loops:
            bare.append(bare_step(TrainConfig(**base), env, args.size, args.steps, args.warmup))
            loops[name].append(loop(TrainConfig(**base, **TERMS[name]), env, args.steps, args.warmup))
            if name == "erm":
                ratios.append(loops[name][-1] / bare[-1])
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "arch": args.arch, "size": args.size, "batch": args.batch, "bare_images_per_s": max(bare), "loop": {}}
    print(f"{args.arch} at {args.size} px, batch {args.batch}, {results['device']}, {args.workers} loader worker(s), "
          f"best of {args.repeats}")
    print(f"{'bare model step (in-memory batch)':40s} {max(bare):8.1f} images/s")
    erm_speed = max(loops["erm"]) if "erm" in loops else None
    for name, speeds in loops.items():
        speed = results["loop"][name] = max(speeds)
        if name == "erm":
            results["erm_over_bare"] = statistics.median(ratios)
            note = (f"{results['erm_over_bare']:.2f}x the bare step (median of {len(ratios)} paired runs: "
                    f"{', '.join(f'{r:.2f}' for r in ratios)})")
        else:
            note = f"{erm_speed / speed:.2f}x the ERM loop's time per image" if erm_speed else ""
        print(f"{'loop ' + name:40s} {speed:8.1f} images/s   {note}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
