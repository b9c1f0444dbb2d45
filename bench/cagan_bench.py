"""Does a CAGAN trained here fill background better than the classical fills? And how fast is it?

    python bench/cagan_bench.py [--minutes 14] [--cnum 8] [--lr 3e-4] [--work /tmp/cfrobust-cagan-bench]

1. Writes the built-in dataset at 64 px as shards (`preprocess --cf none`, reused when present).
2. Trains a CAGAN on its train split with `cfrobust cagan train` (--cnum, --lr; L1 terms only
   for --pretrain-steps, by default all: on a CPU budget the WGAN-GP steps, 5 critic updates
   each, cost ~10x an L1 step) in chunks of --chunk steps, stopping before a chunk would end
   past --minutes: the issue asks for <= 15 CPU minutes.
3. On the held-out test split, cuts one background hole per image (seeded, away from the
   object's box, as training does) and fills it with `mean`, `tile`, `telea` and the trained
   CAGAN (through the same code as `preprocess --cf cagan`); prints the mean absolute error
   inside the holes against the true background, in [0, 1] pixel units.
4. Times generator inference at 256x256 (the released models' size, full width cnum=32) on
   this machine's CPU, in images/s.

Add --json FILE to also write the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cfrobust.datasets import open_dataset
from cfrobust.preprocess.cagan.holes import sample_holes
from cfrobust.preprocess.cagan.inpaint import CaganFill, CaganSettings
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.preprocess.cagan.train import CaganConfig, train_cagan
from cfrobust.preprocess.fills import FILLS
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import iter_samples

CLASSICAL = ("mean", "tile", "telea")
HOLE_SEED = 1234


def make_shards(work: Path) -> Path:
    shards = work / "shards"
    if not (shards / "test" / "_info.json").exists():
        preprocess(open_dataset("synthetic", seed=0), shards, [], overwrite=True, progress=False)
    return shards


def train(shards: Path, weights: Path, args) -> tuple[float, int]:
    """Train in chunks of --chunk steps (each a `--resume` of the last) while the next chunk
    still fits in --minutes; returns (seconds, steps)."""
    start, steps, chunk_seconds = time.perf_counter(), 0, 0.0
    while True:
        elapsed = time.perf_counter() - start
        if steps and elapsed + chunk_seconds > args.minutes * 60:
            return elapsed, steps
        steps += args.chunk
        config = CaganConfig(
            shards=str(shards), out=str(weights), steps=steps, batch=args.batch, cnum=args.cnum, lr=args.lr,
            pretrain_steps=args.pretrain_steps, sample_every=10**9, save_every=args.chunk, device="cpu", workers=1,
            resume=steps > args.chunk,
        )
        train_cagan(config)
        chunk_seconds = time.perf_counter() - start - elapsed


def held_out(shards: Path) -> tuple[list[np.ndarray], list[list]]:
    """Test images with one background hole each (as a box list), seeded."""
    samples = list(iter_samples(sorted((shards / "test").glob("*.tar")), []))
    images = [s["image"] for s in samples]
    height, width = images[0].shape[:2]
    boxes = np.zeros((len(samples), max(len(s["boxes"]) for s in samples), 4))
    valid = np.zeros(boxes.shape[:2], bool)
    for i, s in enumerate(samples):
        boxes[i, : len(s["boxes"])], valid[i, : len(s["boxes"])] = s["boxes"], True
    holes, kept = sample_holes(boxes, valid, height, width, np.random.default_rng(HOLE_SEED))
    chosen = np.flatnonzero(kept)
    return [images[i] for i in chosen], [[tuple(holes[i])] for i in chosen]


def hole_error(images, holes, filled) -> float:
    """Mean |filled - true| inside the holes, pixels in [0, 1]."""
    total, count = 0.0, 0
    for image, hole, out in zip(images, holes, filled):
        x0, y0, x1, y1 = (int(v) for v in hole[0])
        diff = np.abs(out[y0:y1, x0:x1].astype(np.float64) - image[y0:y1, x0:x1]) / 255
        total, count = total + diff.sum(), count + diff.size
    return total / count


def inference_speed(batch: int, repeats: int, device: str = "cpu") -> float:
    """Images/s of the full-width generator at 256x256 (random weights: the same cost)."""
    generator = Generator(cnum=32).eval().to(device)
    x = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
    mask = torch.zeros(batch, 1, 256, 256, device=device)
    mask[:, :, 64:192, 64:192] = 1
    with torch.inference_mode():
        generator(x, mask)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            generator(x, mask)
        synchronize(device)
    return batch * repeats / (time.perf_counter() - start)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/cfrobust-cagan-bench"))
    parser.add_argument("--minutes", type=float, default=14.0, help="training budget (whole chunks only)")
    parser.add_argument("--chunk", type=int, default=250, help="steps between budget checks")
    parser.add_argument("--pretrain-steps", type=int, default=10**9, help="L1-only steps before the GAN terms")
    parser.add_argument("--cnum", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--infer-batch", type=int, default=4)
    parser.add_argument("--infer-repeats", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="evaluate the weights of an earlier run")
    parser.add_argument("--infer-only", action="store_true", help="only time inference (bench/gpu_check.sh)")
    parser.add_argument("--device", default="cpu", help="device of the inference timing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.infer_only:
        speed = inference_speed(args.infer_batch, args.infer_repeats, args.device)
        print(f"inference at 256x256, cnum=32, batch {args.infer_batch}, {args.device}: {speed:.2f} images/s")
        if args.json:
            args.json.write_text(json.dumps({"device": args.device, "batch": args.infer_batch, "images_per_s_256": speed}))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.work)
    weights = args.work / f"cagan-{args.cnum}-{args.minutes:g}min-{args.lr:g}.pt"
    train_seconds = steps = None
    if not (args.reuse and weights.exists()):
        weights.unlink(missing_ok=True)
        weights.with_name(weights.name + ".state").unlink(missing_ok=True)
        train_seconds, steps = train(shards, weights, args)
    images, holes = held_out(shards)
    errors = {name: hole_error(images, holes, [FILLS[name](im, h) for im, h in zip(images, holes)]) for name in CLASSICAL}
    errors["cagan"] = hole_error(images, holes, CaganFill(CaganSettings(weights, "cpu", 64))(images, holes))
    speed = inference_speed(args.infer_batch, args.infer_repeats)

    print(f"CAGAN cnum={args.cnum}, lr {args.lr:g}, batch {args.batch}, 64 px, L1-only steps: {args.pretrain_steps}; "
          + (f"{steps} steps in {train_seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads" if train_seconds else "reused"))
    print(f"held-out background holes: {len(images)} test images")
    print(f"{'fill':8s} {'L1 in hole':>10s}")
    for name, error in errors.items():
        print(f"{name:8s} {error:10.4f}")
    print(f"inference at 256x256, cnum=32, batch {args.infer_batch}, CPU: {speed:.2f} images/s")
    if args.json:
        args.json.write_text(json.dumps({"train_seconds": train_seconds, "steps": steps, "cnum": args.cnum,
                                         "hole_l1": errors, "cpu_images_per_s_256": speed}, indent=2))


if __name__ == "__main__":
    main()
