"""Training throughput: the whole loop (shards -> loss -> step) against the bare model step.

    python bench/train_bench.py [--arch simple-cnn] [--size 64] [--batch 64] [--device cpu]
                                [--workers 1] [--steps 20] [--repeats 3] [--block 5]
                                [--terms erm,cf,f_mrand,f_fgsm,sal] [--json FILE]
                                [--shards DIR_OR_URL] [--serve-http]

    python bench/train_bench.py --terms erm --serve-http   # ERM from loopback HTTP against the folder

    python bench/train_bench.py --size 224 --batch 16 --workers 0 --steps 30 --repeats 4 \
        --terms erm,erm_aug,erm_rrc,f_mrand_box,f_mrand     # what augmentation and masks cost

    python bench/train_bench.py --steps 30 --workers 0 --repeats 3 --terms erm,sal,sal_fd
    python bench/train_bench.py --arch resnet18 --steps 10 --workers 0 --repeats 3 \
        --terms erm,cf_f_sal,cf_f_sal_fd                    # the saliency penalty's two implementations

Measured in one run on the same machine: (a) the bare step, forward + backward + SGD step of the
model on one in-memory batch of the same shape, repeated; (b) the full loop on built-in-dataset
shards (the loader decoding JPEGs, device-side normalisation and masks, the objective, the
step) for ERM and for each added term. This machine's speed drifts by tens of percent within
minutes, so every loop timing is paired with a bare-step timing taken just before it, and the
figures are medians over the pairs: with --workers 0, --repeats x --steps / --block
alternating blocks of --block steps through one warm loop; with loader workers (which read
ahead while the bare step runs), --repeats whole runs of --steps steps, each with a fresh
loader warmed up untimed. Prints images/s, loop/bare for ERM (the median of the pairs'
ratios, with their quartiles) and each term's time per image relative to the ERM loop.
The loop is train_one_epoch's: the parts build_training makes (masks read when F or Sal uses
them, the run's augmentation), each batch augmented on the device before optimizer_step.
Augmented rows also give the augmentation's own time as a share of the ERM loop's, and a row
with a baseline (BASELINES: masks against boxes, augmentation against none) its time against
that row's. --json writes the figures for bench/gpu_check.sh. --shards reads given shards (a
folder or a URL) instead of making built-in ones; --serve-http serves the shard folder on a
loopback HTTP server and adds the row erm_http, ERM streamed from it, with its throughput
against the ERM loop from the folder (bare-normalised, in the same run).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cfrobust.openmp_spin import shorten_openmp_spin

shorten_openmp_spin()  # as `cfrobust` does before torch loads (bench/process_settings_bench.py compares)

import torch

from cfrobust.datasets import open_dataset
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import make_loader, shuffle_ramp_batches, split_info
from cfrobust.shards.remote import location
from cfrobust.trainer.config import TrainConfig
from cfrobust.distributed import DistEnv, setup_distributed
from cfrobust.trainer.optim import make_optimizer
from cfrobust.trainer.models import resolve_arch
from cfrobust.trainer.train import Precision, build_training, make_model, optimizer_step

# Options of each row; a function of --size where a crop side depends on it. F and Sal use the
# default object region, the mask (the reader then decodes KEY.mask.png); *_box use the boxes.
TERMS = {
    "erm": {},
    # The presets' augmentation (a box-keeping crop of 224 from 256, 7/8 of the side, + flip) at
    # --size: the model sees fewer pixels than ERM's, so the augmentation's own time is the figure.
    "erm_aug": lambda size: {"crop": size * 7 // 8, "hflip": True},
    # A random-resized crop back to --size + flip: the model's input as ERM's, so the whole loop's
    # time against ERM's is the augmentation's cost.
    "erm_rrc": lambda size: {"crop": size, "crop_scale": "0.35,1", "hflip": True},
    "erm_jitter": lambda size: {"crop": size, "crop_scale": "0.35,1", "hflip": True, "color_jitter": "0.4,0.4,0.4,0.1"},
    "cf": {"cf": "tile"},
    "f_mrand": {"f": "mrand"},
    "f_mrand_box": {"f": "mrand", "object_region": "box"},
    "f_fgsm": {"f": "fgsm"},
    "sal": {"reg": "bbox_o"},  # --reg-impl exact: double backpropagation
    "sal_fd": {"reg": "bbox_o", "reg_impl": "finite-diff"},
    # Lazy regularisation (--reg-every 2): the penalty on every other step at twice its weight.
    "sal_fd_every2": {"reg": "bbox_o", "reg_impl": "finite-diff", "reg_every": 2},
    "sal_box": {"reg": "bbox_o", "object_region": "box"},
    # The whole method, CF + F + Sal, with each implementation of the penalty.
    "cf_f_sal": {"cf": "tile", "f": "mrand", "reg": "bbox_o"},
    "cf_f_sal_fd": {"cf": "tile", "f": "mrand", "reg": "bbox_o", "reg_impl": "finite-diff"},
    "cf_f_sal_fd_every2": {"cf": "tile", "f": "mrand", "reg": "bbox_o", "reg_impl": "finite-diff", "reg_every": 2},
}
DEFAULT_TERMS = "erm,cf,f_mrand,f_fgsm,sal,sal_fd"
# Row -> the row it is compared with, besides ERM: the same loop without the one thing it adds
# (or, for the finite-difference rows, with the exact penalty instead).
BASELINES = {"erm_aug": "erm", "erm_rrc": "erm", "erm_jitter": "erm_rrc", "f_mrand": "f_mrand_box",
             "sal": "sal_box", "sal_fd": "sal", "sal_fd_every2": "sal_fd",
             "cf_f_sal_fd": "cf_f_sal", "cf_f_sal_fd_every2": "cf_f_sal_fd"}


def term_options(name: str, size: int) -> dict:
    options = TERMS[name]
    return options(size) if callable(options) else options


def make_shards(root: Path, size: int, count: int, workers: int) -> Path:
    """Built-in-dataset shards, at least 8 and at least one per loader worker."""
    shard_count = max(8, workers)
    shards = root / f"shards-{size}-{count}-{shard_count}"
    if not (shards / "train" / "_info.json").exists():
        source = open_dataset("synthetic", sizes=(count, 0, 0), image_size=size)
        preprocess(source, shards, ["tile"], shard_size=max(1, count // shard_count), progress=False, overwrite=True,
                   workers=min(8, os.cpu_count() or 1))
    return shards


class BareSteps:
    """Forward + backward + step of the model on one in-memory batch (no data, no objective)."""

    def __init__(self, config: TrainConfig, env: DistEnv, size: int):
        self.env, self.config = env, config
        self.model, _ = make_model(config, 2, env)
        self.optimizer = make_optimizer(self.model, config)
        self.precision = Precision(config.precision, env.device)
        self.x = torch.randn(config.batch, 3, size, size, device=env.device)
        self.y = torch.randint(0, 2, (config.batch,), device=env.device)

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps."""
        sync(self.env)
        start = time.perf_counter()
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
            self.precision.backward(loss)
            self.precision.step(self.optimizer)
        sync(self.env)
        return time.perf_counter() - start


class LoopSteps:
    """The real loop: shards through the loader (and its workers), augmentation, objective, step;
    epochs follow one another as in training. Built by build_training, as `cfrobust train` builds
    it, so the reader loads masks and the parts augment exactly when a run would."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        self.env, self.config = env, config
        _, self.data, self.parts = build_training(config, split_info(location(config.shards) / "train"), env)
        self.batches = self._endless()
        self.augment_seconds = 0.0  # time inside the augmentation, summed over the timed steps
        self.step = 0  # optimizer steps so far, for --reg-every (an even --block times its rows fairly)

    def _endless(self):
        while True:
            batches = iter(make_loader(self.data, self.data.workers, pin_memory=self.env.device.type == "cuda"))
            try:
                yield from batches
            finally:
                del batches  # stops its workers now, before a later loader forks again
            self.data.set_epoch(self.data.epoch + 1)

    def close(self) -> None:
        self.batches.close()

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps; adds the augmentation's share to augment_seconds."""
        sync(self.env)
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(self.batches).to(self.env.device, non_blocking=True)
            batch = self.augment(batch)
            self.parts.objective.set_step(self.step)
            optimizer_step(self.parts, batch)
            self.step += 1
        sync(self.env)
        return time.perf_counter() - start

    def augment(self, batch):
        """train_one_epoch's augmentation (keyed by the loader's epoch), timed on its own; the
        extra synchronisation is a no-op without augmentation and on the CPU."""
        if not self.parts.augmentation.active:
            return batch
        sync(self.env)
        start = time.perf_counter()
        batch = self.parts.augmentation(batch, self.data.epoch)
        sync(self.env)
        self.augment_seconds += time.perf_counter() - start
        return batch


def paired_times(config: TrainConfig, env: DistEnv, size: int, steps: int, warmup: int, pairs: int) -> list[tuple]:
    """(bare seconds, loop seconds, augmentation seconds within the loop's) for `steps` steps
    each, timed one after the other, `pairs` times. Loader workers would read ahead while the bare step runs, so with workers every
    pair times the bare run first, then starts a fresh loader (warmed up untimed) and times a
    whole run; without them the loop does nothing between its steps, and short alternating
    blocks of one warm loop pair up bare and loop time within a second of each other."""
    bare = BareSteps(config, env, size)
    bare.run(warmup)
    if config.workers == 0:
        loop = LoopSteps(config, env)
        loop.run(warmup)
        times = [(bare.run(steps), *timed_block(loop, steps)) for _ in range(pairs)]
        loop.close()
        return times
    times = []
    for _ in range(pairs):
        bare_seconds = bare.run(steps)  # before the loader exists: its workers would read ahead
        loop = LoopSteps(config, env)
        loop.run(warmup)
        times.append((bare_seconds, *timed_block(loop, steps)))
        loop.close()
    return times


def timed_block(loop: LoopSteps, steps: int) -> tuple[float, float]:
    """(loop seconds, augmentation seconds within them) for `steps` steps."""
    loop.augment_seconds = 0.0
    return loop.run(steps), loop.augment_seconds


def serve_folder(folder: Path) -> str:
    """Serve a folder on a loopback port with Python's plain file server, in a process of its own
    (as a remote server would be: not competing with the training process for its GIL); returns
    its URL. The server ends with this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(server.terminate)
    for _ in range(100):  # until it answers
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}"


def sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="simple-cnn", help="a `cfrobust train --arch` name; auto is the net it picks "
                        "without --pretrained (simple-cnn)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, help="untimed steps (default: until every loader worker's shuffle "
                        "buffer is full, so the timed steps read one sample per sample)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per term (with --workers > 0)")
    parser.add_argument("--block", type=int, default=5, help="steps per timed block with --workers 0: "
                        "--repeats x --steps / --block bare/loop block pairs per term")
    parser.add_argument("--terms", default=DEFAULT_TERMS, help=f"comma-separated rows of: {', '.join(TERMS)}")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cfrobust-train-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shards", help="read these shards (a folder or a URL) instead of making built-in ones")
    parser.add_argument("--serve-http", action="store_true", help="also time ERM reading the shard folder from a "
                        "loopback HTTP server (row erm_http), with its throughput against the folder's")
    args = parser.parse_args()
    args.arch = resolve_arch(args.arch, "")  # the bench loads no weights
    env = setup_distributed(args.device)  # the process set up as `cfrobust train` sets it up
    device = env.device
    if args.warmup is None:
        args.warmup = shuffle_ramp_batches(args.batch, args.workers)
    if min(args.steps, args.repeats, args.block) < 1 or (args.workers == 0 and args.repeats * args.steps < args.block):
        parser.error("--steps, --repeats and --block must give at least one timed block of at least one step")
    pairs = args.repeats if args.workers else args.repeats * args.steps // args.block
    steps = args.steps if args.workers else args.block
    # One epoch holds every step a loader takes (each run's, or the one warm loop's), with room
    # for the batches lost to rounding across shards and workers: no timed block meets an epoch's
    # restart.
    loop_steps = args.warmup + (steps if args.workers else pairs * steps)
    samples = args.batch * (loop_steps + 2 * max(8, args.workers)) * 5 // 4
    shards = args.shards or make_shards(args.work, args.size, max(samples, 16 * args.workers * args.batch), args.workers)
    rows = {name: term_options(name, args.size) for name in args.terms.split(",")}
    if args.serve_http:  # the same shards, streamed from a loopback server
        rows["erm_http"] = {"shards": f"{serve_folder(Path(shards).parent)}/{Path(shards).name}"}
    base = dict(shards=str(shards), out="", arch=args.arch, batch=args.batch, workers=args.workers, lr=0.01)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "arch": args.arch, "size": args.size, "batch": args.batch, "workers": args.workers, "loop": {}}
    over_bare, augment_over_bare, bare_times = {}, {}, []
    for name, options in rows.items():
        config = TrainConfig(**{**base, **options})
        times = paired_times(config, env, args.size, steps, args.warmup, pairs)
        over_bare[name] = [bare / loop for bare, loop, _ in times]
        if any(augment for _, _, augment in times):
            augment_over_bare[name] = [augment / bare for bare, _, augment in times]
        bare_times += [bare for bare, _, _ in times]
        results["loop"][name] = steps * args.batch / statistics.median(loop for _, loop, _ in times)
    results["bare_images_per_s"] = steps * args.batch / statistics.median(bare_times)
    how = f"{pairs} runs of {steps} steps" if args.workers else f"{pairs} alternating blocks of {steps} steps"
    print(f"{args.arch} at {args.size} px, batch {args.batch}, {results['device']}, {args.workers} loader worker(s); "
          f"medians of {how}")
    print(f"{'bare model step (in-memory batch)':40s} {results['bare_images_per_s']:8.1f} images/s")
    for name in over_bare:
        print(f"{'loop ' + name:40s} {results['loop'][name]:8.1f} images/s   "
              + "; ".join(row_notes(name, over_bare, augment_over_bare, results)))
    if "erm_http" in over_bare and "erm" in over_bare:
        results["http_over_folder"] = ratio = statistics.median(over_bare["erm_http"]) / statistics.median(over_bare["erm"])
        print(f"ERM loop streaming from loopback HTTP: {ratio:.3f}x the images/s of the ERM loop from the folder")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.exit(0)


def row_notes(name: str, over_bare: dict, augment_over_bare: dict, results: dict) -> list[str]:
    """The row's figures against its references, each a ratio of medians of bare-normalised
    times (bare / loop per pair), so that the machine's drift between rows cancels; also
    recorded in `results`."""
    ratio = statistics.median(over_bare[name])
    results.setdefault("over_bare", {})[name] = ratio
    if name == "erm":
        results["erm_over_bare"] = ratio
        ratios = over_bare[name]
        spread = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratio] * 3
        return [f"{ratio:.2f}x the bare step (pairs' quartiles {spread[0]:.2f}-{spread[2]:.2f})"]
    notes = []
    erm = statistics.median(over_bare["erm"]) if "erm" in over_bare else None
    if erm:
        notes.append(f"{erm / ratio:.2f}x the ERM loop's time per image")
    baseline = BASELINES.get(name)
    if baseline in over_bare and baseline != "erm":
        results.setdefault("over_baseline", {})[name] = over = statistics.median(over_bare[baseline]) / ratio
        notes.append(f"{over:.3f}x {baseline}'s")
    if name in augment_over_bare and erm:
        # The augmentation's seconds against the ERM loop's, both per bare-step second.
        share = statistics.median(augment_over_bare[name]) * erm
        results.setdefault("augment_share_of_erm", {})[name] = share
        notes.append(f"augmentation alone {100 * share:.1f}% of the ERM loop's time")
    return notes


if __name__ == "__main__":
    main()
