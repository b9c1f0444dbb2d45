"""`cfrobust preprocess`: records -> validated, resized samples with counterfactuals -> shards.

Bad records are never silently dropped or fixed: each is reported with its key and source,
counted in the summary and in `_info.json`, and `strict=True` turns the first into an error.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.errors import UserError
from cfrobust.preprocess.fills import FILLS
from cfrobust.preprocess.images import RecordError, binarize, load_mask, load_rgb, mask_box, resize
from cfrobust.shards.manifest import write_info
from cfrobust.shards.schema import (
    IMAGE_EXT,
    MASK_EXT,
    META_EXT,
    cf_ext,
    encode_jpeg,
    encode_meta,
    encode_png,
)
from cfrobust.shards.writer import ShardWriter

BOX_TOLERANCE = 1.0  # pixels a box may overhang the image (annotation rounding) before it is an error


@dataclass
class SplitSummary:
    split: str
    written: int = 0
    skipped: list[dict] = field(default_factory=list)


def check_output(out: Path, splits: list[str], overwrite: bool) -> None:
    """Refuse to write over existing shards unless asked; with `overwrite`, clear only our splits."""
    existing = [out / s for s in splits if (out / s).exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out")
    for path in existing:
        shutil.rmtree(path)


def preprocess(
    dataset: DatasetSource,
    out: Path,
    cf_methods: list[str],
    size: int | None = None,
    shard_size: int = 1000,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[SplitSummary]:
    """Write `out/<split>/` shards for every split of `dataset`; return what was written and skipped."""
    unknown = [m for m in cf_methods if m not in FILLS]
    if unknown:
        raise UserError(f"unknown counterfactual fill {unknown[0]!r}; available: {', '.join(FILLS)}")
    size = size or dataset.default_size
    out = Path(out)
    check_output(out, dataset.splits, overwrite)
    summaries = []
    for split in dataset.splits:
        summaries.append(_write_split(dataset, split, out / split, cf_methods, size, shard_size, strict, progress))
    return summaries


def _write_split(dataset, split, split_dir, cf_methods, size, shard_size, strict, progress) -> SplitSummary:
    split_dir.mkdir(parents=True)
    summary = SplitSummary(split)
    writer = ShardWriter(split_dir, split, shard_size)
    seen: set[str] = set()
    groups: Counter = Counter()
    records = tqdm(dataset.records(split), total=dataset.count(split), desc=split, unit="img", disable=not progress)
    try:
        for record in records:
            try:
                if record.problem:
                    raise RecordError(record.problem)
                if record.key in seen:
                    raise RecordError("duplicate key")
                sample = make_sample(record, len(dataset.classes), size, cf_methods)
            except RecordError as exc:
                if strict:
                    raise UserError(f"record {record.key} ({record.source}): {exc}") from None
                summary.skipped.append({"key": record.key, "source": record.source, "reason": str(exc)})
                continue
            seen.add(record.key)
            groups[record.group] += 1
            writer.write(sample)
            summary.written += 1
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    write_info(
        split_dir,
        {
            "split": split,
            "num_samples": summary.written,
            "shards": shards,
            "size": size,
            "cf_methods": list(cf_methods),
            "classes": list(dataset.classes),
            "groups": sorted(groups),
            "group_counts": dict(sorted(groups.items())),
            "aligned_groups": list(dataset.aligned_groups),
            "source": dataset.describe(),
            "skipped": summary.skipped,
        },
    )
    return summary


def make_sample(record: Record, num_classes: int, size: int, cf_methods: list[str]) -> dict:
    """Validate one record and build its shard sample (raises RecordError when it is bad)."""
    if "." in record.key or "/" in record.key:
        raise RecordError("key contains '.' or '/', which shard file names cannot carry")
    if not 0 <= record.label < num_classes:
        raise RecordError(f"label {record.label} outside 0..{num_classes - 1}")
    image, (width, height) = load_rgb(record.image, min_side=size)
    mask = None if record.mask is None else load_mask(record.mask, width, height)
    boxes = [check_box(box, width, height) for box in source_boxes(record, width, height, mask)]
    scale = np.array([size / width, size / height, size / width, size / height])
    boxes = [tuple(float(v) for v in np.array(box) * scale) for box in boxes]
    image = resize(image, size)
    encoded = encode_jpeg(image)
    sample = {"__key__": record.key, IMAGE_EXT: encoded}
    for method in cf_methods:
        # A record without boxes trains as plain ERM; its counterfactual slot holds the image.
        sample[cf_ext(method)] = encode_jpeg(FILLS[method](image, boxes)) if boxes else encoded
    if mask is not None:
        sample[MASK_EXT] = encode_png(binarize(resize(mask, size, nearest=True)))
    sample[META_EXT] = encode_meta(record.label, boxes, record.group, record.split, record.source, record.attrs)
    return sample


def source_boxes(record: Record, width: int, height: int, mask: np.ndarray | None) -> list:
    """The record's boxes in the pixels of its decoded image.

    Boxes given for another image size (`boxes_size`, e.g. annotations of the full-resolution
    original of a downscaled file) are rescaled; a record with a mask and no boxes gets the
    mask's bounding box.
    """
    boxes = list(record.boxes)
    if record.boxes_size is not None and boxes:
        sx, sy = width / record.boxes_size[0], height / record.boxes_size[1]
        boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]
    if not boxes and mask is not None:
        box = mask_box(mask)
        if box is None:
            raise RecordError("mask is empty (no foreground pixel)")
        boxes = [box]
    return boxes


def check_box(box, width: int, height: int) -> tuple:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise RecordError(f"box {list(box)} has zero area")
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise RecordError(f"box {list(box)} lies outside the {width}x{height} image")
    clipped = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise RecordError(f"box {list(box)} lies outside the {width}x{height} image")
    return clipped
