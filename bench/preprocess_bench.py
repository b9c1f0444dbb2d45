"""Preprocessing speed against its floor: plain decode -> resize -> JPEG encode of the same images.

    python bench/preprocess_bench.py [--images 4000] [--size 64] [--fills none,mean,tile,...]
                                     [--annotations boxes,masks] [--repeats 2]

Writes a Waterbirds-format folder (metadata.csv, 500x375 JPEGs, CUB-style segmentation PNGs,
and CUB's images.txt + bounding_boxes.txt for the same birds) once, then times on one core, in
the same run, (a) the floor: read, cv2.imdecode, cv2.resize to --size, cv2.imencode JPEG, and
(b) `preprocess --dataset waterbirds --cf F --size S` for each fill F and each --annotations
kind: `boxes` (CUB boxes) or `masks` (segmentations: each image also decodes a full-size PNG
mask and stores it resized, work the floor does not do). Validation, metadata, tar writing and
hashing are included; `none` stores no counterfactual. Prints images/s of each, the speed ratio
floor/preprocess for `none` and the time-per-image ratio preprocess/floor for each fill; best
of --repeats runs, interleaved, because this machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 500, 375  # a typical Waterbirds image


def make_waterbirds(root: Path, count: int) -> list[Path]:
    """Smooth random backgrounds with an elliptical 'bird', its segmentation, and metadata.csv."""
    marker = root / f".complete-boxes-{count}"
    paths = [root / "001.Bird" / f"Bird_{i:05d}.jpg" for i in range(count)]
    if marker.exists():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    (root / "001.Bird").mkdir(parents=True)
    (root / "segmentations" / "001.Bird").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    images, boxes = [], []
    for i, path in enumerate(paths):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        image = cv2.add(image, rng.integers(0, 20, image.shape, dtype=np.uint8))
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        centre = (int(rng.integers(100, 400)), int(rng.integers(90, 285)))
        cv2.ellipse(mask, centre, (int(rng.integers(30, 90)), int(rng.integers(25, 80))), 0, 0, 360, 255, -1)
        image[mask > 0] = rng.integers(0, 256, 3)
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(mask_path(path)), mask)
        x, y, w, h = cv2.boundingRect(mask)
        images.append(f"{i + 1} 001.Bird/Bird_{i:05d}.jpg")
        boxes.append(f"{i + 1} {x}.0 {y}.0 {w}.0 {h}.0")
        split = 0 if i % 10 < 7 else (1 if i % 10 == 7 else 2)
        rows.append(f"{i + 1},001.Bird/Bird_{i:05d}.jpg,{i % 2},{split},{(i // 2) % 2},/o/ocean/{i:08d}.jpg")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "images.txt").write_text("\n".join(images) + "\n")  # CUB's box files live beside it here
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    marker.touch()
    return paths


def floor_run(paths: list[Path], size: int, masks: bool = False) -> float:
    """Seconds to decode, resize and encode every image (and, with `masks`, its segmentation)."""
    start = time.perf_counter()
    for path in paths:
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if masks:
            mask = cv2.imdecode(np.frombuffer(mask_path(path).read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
            cv2.imencode(".png", cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST))
    return time.perf_counter() - start


def mask_path(image_path: Path) -> Path:
    return image_path.parents[1] / "segmentations" / image_path.parent.name / (image_path.stem + ".png")


def pipeline_run(root: Path, out: Path, size: int, fill: str, annotations: str) -> float:
    from cfrobust.datasets import open_dataset
    from cfrobust.preprocess.pipeline import preprocess

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    options = {"boxes": "cub", "cub_root": root} if annotations == "boxes" else {}
    source = open_dataset("waterbirds", root=root, **options)
    preprocess(source, out, [] if fill == "none" else [fill], size=size, progress=False)
    return time.perf_counter() - start


def against(seconds: float, floor_seconds: float, fill: str, floor_name: str) -> str:
    """`none` is stated as a speed ratio (how near the floor), a fill as a time ratio (its cost)."""
    if fill == "none":
        return f"speed {floor_seconds / seconds:.2f}x {floor_name}"
    return f"time per image {seconds / floor_seconds:.2f}x {floor_name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fills", default="none,mean,random,shuffle,tile,telea,ns")
    parser.add_argument("--annotations", default="boxes,masks", help="boxes (CUB), masks (segmentations) or both")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cfrobust-bench"))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    cv2.setNumThreads(1)
    paths = make_waterbirds(args.work / "waterbirds", args.images)
    fills = args.fills.split(",")
    kinds = args.annotations.split(",")
    if not set(kinds) <= {"boxes", "masks"}:
        parser.error(f"--annotations takes boxes, masks or boxes,masks, not {args.annotations!r}")
    floor, mask_floor, runs = [], [], {(kind, fill): [] for kind in kinds for fill in fills}
    for _ in range(args.repeats):
        floor.append(floor_run(paths, args.size))
        if "masks" in kinds:
            mask_floor.append(floor_run(paths, args.size, masks=True))
        for kind, fill in runs:
            runs[kind, fill].append(pipeline_run(args.work / "waterbirds", args.work / "shards", args.size, fill, kind))
    best_floor = min(floor)
    print(f"{args.images} images {WIDTH}x{HEIGHT} -> {args.size} px, one core, best of {args.repeats}")
    print(f"{'floor (decode, resize, encode)':48s} {args.images / best_floor:6.0f} images/s")
    if mask_floor:
        print(f"{'floor with masks (+ PNG decode, resize, encode)':48s} {args.images / min(mask_floor):6.0f} images/s")
    for (kind, fill), times in runs.items():
        best = min(times)
        ratio = against(best, best_floor, fill, "the floor")
        if kind == "masks":
            ratio += f" ({against(best, min(mask_floor), fill, 'the floor with masks')})"
        print(f"{f'preprocess --cf {fill}, {kind}':48s} {args.images / best:6.0f} images/s   {ratio}")
    sys.exit(0)


if __name__ == "__main__":
    main()
