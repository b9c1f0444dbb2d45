"""Users' own images in `root/<split>/<class>/<image>` folders, with boxes from an optional CSV.

The CSV (header `path,x0,y0,x1,y1`, path relative to root, pixels of that image) may give an
image several boxes, one per row; images it does not name train without a box (plain ERM).
"""

from __future__ import annotations

import csv
import math
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cfrobust.datasets.record import Box, DatasetSource, Record, safe_key
from cfrobust.errors import UserError

CSV_HEADER = ["path", "x0", "y0", "x1", "y1"]
FIRST_SPLITS = ["train", "val", "test"]  # listed first, in this order; other splits follow alphabetically
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass
class CsvBoxes:
    """What the CSV says about one image path."""

    boxes: list[Box] = field(default_factory=list)
    first_line: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def find_splits(root: Path) -> list[str]:
    """Sub-folders of root that hold class folders: train, val, test first, then alphabetical."""
    splits = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _class_dirs(p)]
    return sorted(splits, key=lambda s: (FIRST_SPLITS.index(s) if s in FIRST_SPLITS else len(FIRST_SPLITS), s))


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(class_dir: Path, root: Path) -> tuple[list[str], list[str]]:
    """Image paths under a class folder (sub-folders included, as ImageFolder), relative to root
    with '/' separators, sorted; and the other files, left out (see notes())."""
    images, others = [], []
    for path in class_dir.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(class_dir).parts):
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path.relative_to(root).as_posix())
    return sorted(images), sorted(others)


def read_boxes_csv(path: Path) -> dict[str, CsvBoxes]:
    """Normalised relative image path -> its boxes and the problems of its rows."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return _parse_rows(csv.reader(handle), path)
    except FileNotFoundError:
        raise UserError(f"{path}: boxes CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read boxes CSV ({exc})") from None


def _parse_rows(reader, path: Path) -> dict[str, CsvBoxes]:
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != CSV_HEADER:
        raise UserError(f"{path}: first line must be the header {','.join(CSV_HEADER)}, got {header!r}")
    by_image: dict[str, CsvBoxes] = defaultdict(CsvBoxes)
    for row in reader:
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        line = reader.line_num
        entry = by_image[normalise(row[0])]
        entry.first_line = entry.first_line or line
        box, problem = parse_box_row(row)
        if problem:
            entry.problems.append((line, problem))
        else:
            entry.boxes.append(box)
    return dict(by_image)


def normalise(relative: str) -> str:
    """CSV paths compare with listed ones whatever their spelling: './train/a.jpg', 'train\\a.jpg'."""
    return posixpath.normpath(relative.strip().replace("\\", "/"))


def parse_box_row(row: list[str]) -> tuple[Box | None, str]:
    if len(row) != len(CSV_HEADER):
        return None, f"expected {len(CSV_HEADER)} fields path,x0,y0,x1,y1, got {len(row)}"
    try:
        box = tuple(float(v) for v in row[1:])
    except ValueError:
        return None, f"box {row[1:]} is not 4 numbers"
    if not all(math.isfinite(v) for v in box):
        return None, f"box {row[1:]} is not 4 finite numbers"
    return box, ""


class FolderDataset(DatasetSource):
    """ImageFolder-style splits; label = class folder (sorted union over splits), group = class."""

    name = "folder"

    def __init__(self, root, boxes_csv=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: dataset folder not found")
        self.splits = find_splits(self.root)
        if not self.splits:
            raise UserError(f"{self.root}: no <split>/<class>/ folders (expected e.g. train/cat/001.jpg)")
        self.classes = sorted({d.name for split in self.splits for d in _class_dirs(self.root / split)})
        self._label_of = {name: label for label, name in enumerate(self.classes)}
        self._images: dict[str, list[tuple[str, str]]] = {}  # split -> [(relative path, class)]
        self.ignored: list[str] = []  # files that are no image of a class folder, relative to root
        for split in self.splits:
            self._images[split] = self._list_split(split)
        self.boxes_csv = Path(boxes_csv) if boxes_csv else None
        self._boxes = read_boxes_csv(self.boxes_csv) if self.boxes_csv else {}
        self._orphans = self._csv_rows_without_image()

    def _list_split(self, split: str) -> list[tuple[str, str]]:
        # Files lying in the split folder itself have no class: left out, but counted.
        loose = [p for p in (self.root / split).iterdir() if p.is_file() and not p.name.startswith(".")]
        self.ignored += sorted(p.relative_to(self.root).as_posix() for p in loose)
        found = []
        for class_dir in _class_dirs(self.root / split):
            images, others = list_images(class_dir, self.root)
            found += [(path, class_dir.name) for path in images]
            self.ignored += others
        return sorted(found)

    def notes(self) -> list[str]:
        if not self.ignored:
            return []
        shown = ", ".join(self.ignored[:3]) + (", ..." if len(self.ignored) > 3 else "")
        return [f"{len(self.ignored)} file(s) under {self.root} left out: not a {'/'.join(sorted(IMAGE_SUFFIXES))} "
                f"image inside a class folder ({shown})"]

    def _csv_rows_without_image(self) -> dict[str, list[str]]:
        """Split -> CSV paths that name no listed image. Each becomes a problem record of the
        split its path starts with (the first split when it names none), so it is reported."""
        listed = {path for images in self._images.values() for path, _ in images}
        orphans: dict[str, list[str]] = defaultdict(list)
        for path in sorted(set(self._boxes) - listed):
            split = path.split("/", 1)[0]
            orphans[split if split in self._images else self.splits[0]].append(path)
        return dict(orphans)

    def count(self, split: str) -> int:
        return len(self._images[split]) + len(self._orphans.get(split, []))

    def records(self, split: str) -> Iterator[Record]:
        for path, class_name in self._images[split]:
            yield self.make_record(split, path, class_name)
        for path in self._orphans.get(split, []):
            yield self.orphan_record(split, path)

    def make_record(self, split: str, path: str, class_name: str) -> Record:
        record = Record(
            key=safe_key(path),
            image=self.root / path,
            label=self._label_of[class_name],
            group=class_name,
            split=split,
            source=str(self.root / path),
        )
        listed = self._boxes.get(path)
        if listed is None:
            return record
        if listed.problems:
            line, reason = listed.problems[0]
            more = f" (and {len(listed.problems) - 1} more bad rows)" if len(listed.problems) > 1 else ""
            record.source = f"{self.boxes_csv}:{line}"
            record.problem = f"bad box row for {path}: {reason}{more}"
        record.boxes = listed.boxes
        return record

    def orphan_record(self, split: str, path: str) -> Record:
        """CSV rows naming no listed image: no image to store, but reported with their line."""
        where = f"{self.boxes_csv}:{self._boxes[path].first_line}"
        problem = f"CSV row names {path}, which is not an image in a <split>/<class>/ folder of {self.root}"
        return Record(key=safe_key(f"csv_{path}"), image=b"", label=-1, split=split, source=where, problem=problem)

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "root": str(self.root),
            "boxes_csv": str(self.boxes_csv) if self.boxes_csv else None,
            "ignored_files": len(self.ignored),
        }
