"""Write a dataset's records as raw files in a real release's layout (Waterbirds, COCO).

So the built-in benchmark family can go through the same adapters as downloaded data, and leave this package.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from cfrobust.datasets.record import Record
from cfrobust.errors import UserError
from cfrobust.outputs import claim_output_folder

if TYPE_CHECKING:
    from cfrobust.datasets.synthetic import SyntheticDataset

LAYOUTS = ("waterbirds", "coco")
IMAGE_FORMATS = ("png", "jpg")  # png keeps every pixel; jpg is what the real releases hold
JPEG_QUALITY = 95
PROVENANCE = "synthetic.json"  # what was exported and how; the adapters ignore it


@dataclass
class ExportSummary:
    layout: str
    out: Path
    counts: dict[str, int] = field(default_factory=dict)  # split -> images written

    def read_back_command(self, shards: str = "SHARDS") -> str:
        """The `cfrobust preprocess` line that turns the exported files into shards."""
        if self.layout == "waterbirds":
            return f"cfrobust preprocess --dataset waterbirds --root {self.out} --out {shards}"
        files = " ".join(f"--annotations {split}={self.out / 'annotations' / f'{split}.json'}" for split in self.counts)
        return f"cfrobust preprocess --dataset coco --images {self.out / 'images'} {files} --out {shards}"


def export_dataset(dataset: SyntheticDataset, out: Path, layout: str, image_format: str = "png",
                   overwrite: bool = False, progress: bool = True) -> ExportSummary:
    """Every record of every split of a built-in `dataset`, written under `out` in `layout`."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown export layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    if layout == "waterbirds" and len(dataset.classes) != 2:
        raise UserError(f"variant {dataset.variant.name} has {len(dataset.classes)} classes, but the waterbirds layout holds only y = 0 or 1; "
                        f"export it with --export-layout coco")
    _claim_folder(Path(out), _own_names(layout, dataset), overwrite)
    writer = WaterbirdsWriter(Path(out), dataset, image_format) if layout == "waterbirds" else CocoWriter(Path(out), dataset, image_format)
    summary = ExportSummary(layout, Path(out))
    total = sum(dataset.count(split) or 0 for split in dataset.splits)
    with tqdm(total=total, unit="img", desc=f"export {layout}", disable=None if progress else True) as bar:
        for split in dataset.splits:
            summary.counts[split] = writer.write_split(split, bar)
    writer.finish()
    provenance = {"source": dataset.describe(), "layout": layout, "image_format": image_format, "counts": summary.counts}
    (Path(out) / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return summary


def _claim_folder(out: Path, own_names: set[str], overwrite: bool) -> None:
    """`out` is missing or empty, or (--overwrite) holds only an earlier export's files."""
    claim_output_folder(out, own_names, overwrite, f"--out {out} already exists and is not empty; pass --overwrite to "
                                                   f"replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _own_names(layout: str, dataset: SyntheticDataset) -> set[str]:
    if layout == "coco":
        return {"images", "annotations", PROVENANCE}
    return {"metadata.csv", "segmentations", PROVENANCE, *(class_folder(dataset, k) for k in range(len(dataset.classes)))}


def class_folder(dataset: SyntheticDataset, label: int) -> str:
    """CUB-style class folder: '001.round' for label 0."""
    return f"{label + 1:03d}.{dataset.classes[label]}"


def place_of(dataset: SyntheticDataset, record: Record) -> int:
    return dataset.places.index(record.attrs["place"])


class WaterbirdsWriter:
    """metadata.csv + <class folder>/<key>.<ext> + segmentations/<class folder>/<key>.png (object = 255)."""

    def __init__(self, out: Path, dataset: SyntheticDataset, image_format: str):
        self.out, self.dataset, self.image_format = out, dataset, image_format
        self.rows: list[list] = []

    def write_split(self, split: str, bar) -> int:
        split_code = self.dataset.splits.index(split)  # train, val, test = 0, 1, 2 as in the release
        written = 0
        for record in self.dataset.records(split):
            filename = f"{class_folder(self.dataset, record.label)}/{record.key}.{self.image_format}"
            write_image(self.out / filename, record.image, self.image_format)
            mask = np.repeat(np.asarray(record.mask)[..., None], 3, axis=2)  # 255 in all channels, as CUB's
            write_image(self.out / "segmentations" / Path(filename).with_suffix(".png"), mask, "png")
            place = place_of(self.dataset, record)
            self.rows.append([len(self.rows) + 1, filename, record.label, split_code, place,
                              f"/{self.dataset.places[place]}/{record.key}.{self.image_format}"])
            written += 1
            bar.update()
        return written

    def finish(self) -> None:
        with (self.out / "metadata.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
            writer.writerows(self.rows)


class CocoWriter:
    """images/<key>.<ext> + annotations/<split>.json: one box per image, category id = label + 1."""

    def __init__(self, out: Path, dataset: SyntheticDataset, image_format: str):
        self.out, self.dataset, self.image_format = out, dataset, image_format
        (out / "annotations").mkdir(parents=True, exist_ok=True)

    def write_split(self, split: str, bar) -> int:
        images, annotations = [], []
        for record in self.dataset.records(split):
            image_id = len(images) + 1
            file_name = f"{record.key}.{self.image_format}"
            write_image(self.out / "images" / file_name, record.image, self.image_format)
            height, width = record.image.shape[:2]
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                           "place": record.attrs["place"], "group": record.group})
            annotations += [_coco_annotation(len(annotations) + 1 + n, image_id, record, box)
                            for n, box in enumerate(record.boxes)]
            bar.update()
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.dataset.classes)]
        document = {"info": {"description": json.dumps(self.dataset.describe())},
                    "images": images, "annotations": annotations, "categories": categories}
        (self.out / "annotations" / f"{split}.json").write_text(json.dumps(document) + "\n")
        return len(images)

    def finish(self) -> None:
        pass


def _coco_annotation(annotation_id: int, image_id: int, record: Record, box) -> dict:
    x0, y0, x1, y1 = box
    return {"id": annotation_id, "image_id": image_id, "category_id": record.label + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(np.count_nonzero(record.mask)), "iscrowd": 0}


def write_image(path: Path, pixels: np.ndarray, image_format: str) -> None:
    """RGB (or grey) uint8 pixels -> a PNG or JPEG file, creating its folder."""
    import cv2  # only exporting needs OpenCV; keep it out of `--help`

    bgr = pixels[..., ::-1] if pixels.ndim == 3 else pixels
    # Full-resolution colour (4:4:4): chroma subsampling would smear the edges of small objects.
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444] if image_format == "jpg" else []
    ok, encoded = cv2.imencode(f".{image_format}", np.ascontiguousarray(bgr), params)
    if not ok:
        raise UserError(f"{path}: OpenCV could not encode the image as {image_format}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
