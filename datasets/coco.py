"""COCO-style JSON (images, annotations, categories) + an image folder -> one Record per image.

The small parsing functions here (load, index, merge annotations per image) are shared with the
Caltech Camera Traps adapter, which reads the same format with its own label and group rules.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cfrobust.datasets.record import Box, DatasetSource, Record, safe_key
from cfrobust.errors import UserError


@dataclass
class ImageEntry:
    """One entry of `images` with its annotations merged: what becomes one Record."""

    image_id: object  # int in COCO, str in COCO Camera Traps; as the JSON has it
    info: dict  # the JSON image object (file_name, width, height, location, ...)
    source: str  # "<json>: image id <id>"
    annotations: list[tuple[int, Box | None]] = field(default_factory=list)  # (category id, box or None)
    problems: list[str] = field(default_factory=list)  # what makes this image unusable


@dataclass
class CocoSplit:
    """A parsed COCO file: its images in a deterministic order, and annotations with no image."""

    path: Path
    categories: dict[int, str]
    entries: list[ImageEntry]
    orphans: dict[object, list]  # unknown image id -> ids of the annotations that name it


def load_coco(path: Path) -> dict:
    """The parsed JSON, checked to hold `images`, `annotations` and `categories` lists."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read annotation file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: missing the {key!r} list of a COCO file")
    return data


def category_names(data: dict, path: Path) -> dict[int, str]:
    """Category id -> name; a malformed category list makes the whole file unusable."""
    names: dict[int, str] = {}
    for category in data["categories"]:
        cid = category.get("id") if isinstance(category, dict) else None
        name = category.get("name") if isinstance(category, dict) else None
        if not _is_int(cid) or not isinstance(name, str):
            raise UserError(f"{path}: category {category!r} needs an integer 'id' and a string 'name'")
        if names.get(cid, name) != name:
            raise UserError(f"{path}: category id {cid} is named both {names[cid]!r} and {name!r}")
        names[cid] = name
    return names


def merge_categories(files: list[tuple[Path, dict[int, str]]]) -> dict[int, str]:
    """The union of the files' categories, sorted by id; one id must keep one name everywhere."""
    merged: dict[int, tuple[str, Path]] = {}
    for path, names in files:
        for cid, name in names.items():
            first = merged.setdefault(cid, (name, path))
            if first[0] != name:
                raise UserError(f"category id {cid} is {first[0]!r} in {first[1]} but {name!r} in {path}")
    by_name: dict[str, int] = {}
    for cid, (name, _) in sorted(merged.items()):
        if by_name.setdefault(name, cid) != cid:
            raise UserError(f"categories {by_name[name]} and {cid} share the name {name!r}; class names must be unique")
    return {cid: merged[cid][0] for cid in sorted(merged)}


def index_images(data: dict, path: Path) -> dict[object, ImageEntry]:
    """Image id -> entry. Malformed or duplicated image entries keep a problem instead of vanishing."""
    entries: dict[object, ImageEntry] = {}
    ids = [image.get("id") if isinstance(image, dict) else None for image in data["images"]]
    counts = Counter(image_id for image_id in ids if _is_id(image_id))  # ids may be unhashable junk
    for position, (image, image_id) in enumerate(zip(data["images"], ids)):
        if not _is_id(image_id):
            # No usable id to index it under: it is keyed by its position so it is still reported.
            entries[("position", position)] = ImageEntry(None, image if isinstance(image, dict) else {},
                                                         f"{path}: images[{position}]",
                                                         problems=["image entry needs a string or integer 'id'"])
            continue
        entry = ImageEntry(image_id, image, f"{path}: image id {image_id}")
        entry.problems += _image_problems(image)
        if counts[image_id] > 1:
            # Every copy is reported; the annotations, which cannot tell the copies apart, go to the
            # first one so they are not mistaken for annotations of an unlisted image.
            entry.problems.append(f"image id {image_id} appears {counts[image_id]} times in 'images'")
        entries[image_id if image_id not in entries else ("position", position)] = entry
    return entries


def _image_problems(image: dict) -> list[str]:
    problems = []
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        problems.append("image entry has no 'file_name'")
    width, height = image.get("width"), image.get("height")
    stated = (width, height) != (None, None)  # the size is optional in COCO Camera Traps
    if stated and not (_is_positive(width) and _is_positive(height)):
        problems.append(f"width/height {width!r}x{height!r} are not two positive numbers")
    return problems


def merge_annotations(data: dict, entries: dict[object, ImageEntry], categories: dict[int, str],
                      bbox_required: bool) -> dict[object, list]:
    """Attach each annotation's (category, box) to its image; return unknown image id -> annotation ids.

    Problems of one annotation (unknown category, malformed bbox) become problems of its image.
    """
    orphans: dict[object, list] = defaultdict(list)
    for position, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            orphans[("position", position)].append(f"annotations[{position}]")
            continue
        name = f"annotation {annotation.get('id', f'#{position}')}"
        image_id = annotation.get("image_id")
        entry = entries.get(image_id) if _is_id(image_id) else None
        if entry is None:
            orphans[image_id if _is_id(image_id) else ("position", position)].append(name)
            continue
        category = annotation.get("category_id")
        if not _is_int(category) or category not in categories:
            entry.problems.append(f"{name}: unknown category id {category!r}")
            continue
        box, problem = parse_bbox(annotation, bbox_required)
        if problem:
            entry.problems.append(f"{name}: {problem}")
            continue
        entry.annotations.append((category, box))
    return dict(orphans)


def parse_bbox(annotation: dict, required: bool) -> tuple[Box | None, str]:
    """COCO [x, y, w, h] -> (x0, y0, x1, y1), or a reason it is unusable."""
    if "bbox" not in annotation and not required:
        return None, ""
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_finite(v) for v in bbox):
        return None, f"bbox {bbox!r} is not 4 numbers [x, y, width, height]"
    x, y, w, h = (float(v) for v in bbox)
    return (x, y, x + w, y + h), ""


def parse_split(path: Path, bbox_required: bool) -> CocoSplit:
    """Everything one COCO file says, image by image, in file-name order."""
    data = load_coco(path)
    categories = category_names(data, path)
    entries = index_images(data, path)
    orphans = merge_annotations(data, entries, categories, bbox_required)
    ordered = sorted(entries.values(), key=lambda e: (str(e.info.get("file_name", "")), str(e.image_id), e.source))
    return CocoSplit(Path(path), categories, ordered, orphans)


class CocoDataset(DatasetSource):
    """Any COCO-style detection JSON: an image's label is the one category of its annotations.

    Subclasses change four rules: which categories decide the label (`label_categories`),
    which images to leave out without a problem (`drop_image`), the group (`group_of`), and
    whether an annotation may lack a bbox (`bbox_required`).
    """

    name = "coco"
    bbox_required = True  # COCO detection annotations always carry a bbox

    def __init__(self, images, annotations: dict):
        if not annotations:
            raise UserError("coco needs at least one SPLIT=annotation file")
        self.images = Path(images)
        if not self.images.is_dir():
            raise UserError(f"{self.images}: image folder not found")
        self.annotation_files = {split: Path(p) for split, p in annotations.items()}
        self.splits = list(self.annotation_files)
        self._parse_all()

    def _parse_all(self) -> None:
        """Parse every file up front (one at a time, keeping only the merged per-image index):
        the classes are the union of all files' categories, and count() is then exact."""
        self._splits = {split: parse_split(path, self.bbox_required)
                        for split, path in self.annotation_files.items()}
        self.categories = merge_categories([(p.path, p.categories) for p in self._splits.values()])
        self._label_of = self.label_index()
        self.classes = [self.categories[cid] for cid in self._label_of]
        self.dropped = {split: sum(self._is_dropped(e) for e in parsed.entries)
                        for split, parsed in self._splits.items()}

    def _is_dropped(self, entry: ImageEntry) -> bool:
        return not entry.problems and self.drop_image(entry)

    # --- rules a subclass may change -------------------------------------------------------

    def label_index(self) -> dict[int, int]:
        """Category id -> label, in category-id order."""
        return {cid: i for i, cid in enumerate(self.categories)}

    def label_categories(self, entry: ImageEntry) -> list[int]:
        """The distinct categories that decide the image's label, in id order."""
        return sorted({cid for cid, _ in entry.annotations})

    def drop_image(self, entry: ImageEntry) -> bool:
        """True for an image the dataset's own protocol leaves out (counted in describe())."""
        return False

    def group_of(self, entry: ImageEntry, class_name: str) -> tuple[str, str]:
        """(group, problem): the evaluation subgroup of an image: the image object's own "group"
        field where it has one (a spurious attribute the user knows, e.g. "cat/indoor"), else
        its class."""
        group = entry.info.get("group")
        if group is None:
            return class_name, ""
        if not isinstance(group, str) or not group:
            return "", f"group {group!r} is not a non-empty string"
        return group, ""

    def attrs_of(self, entry: ImageEntry) -> dict:
        return {"image_id": entry.image_id}

    # --- the DatasetSource interface --------------------------------------------------------

    def count(self, split: str) -> int:
        parsed = self._splits[split]
        return len(parsed.entries) - self.dropped[split] + len(parsed.orphans)

    def records(self, split: str) -> Iterator[Record]:
        parsed = self._splits[split]
        for entry in parsed.entries:
            if self._is_dropped(entry):
                continue
            yield self.make_record(split, entry)
        for image_id, names in parsed.orphans.items():
            yield self.orphan_record(split, parsed.path, image_id, names)

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "images": str(self.images),
            "annotations": {split: str(path) for split, path in self.annotation_files.items()},
        }

    # --- building records -------------------------------------------------------------------

    def make_record(self, split: str, entry: ImageEntry) -> Record:
        file_name = str(entry.info.get("file_name") or "")
        record = Record(
            key=safe_key(file_name or f"image_{entry.image_id}"),
            image=self.images / file_name,
            label=-1,
            split=split,
            source=entry.source,
            attrs=self.attrs_of(entry),
        )
        category, record.problem = self.label_category(entry)
        if record.problem:
            return record
        record.label = self._label_of[category]
        record.group, record.problem = self.group_of(entry, self.categories[category])
        record.boxes = [box for cid, box in entry.annotations if cid == category and box is not None]
        if entry.info.get("width") is not None:
            # Annotations are in the pixels of the size `images` states; the file may be smaller.
            record.boxes_size = (entry.info["width"], entry.info["height"])
        return record

    def label_category(self, entry: ImageEntry) -> tuple[int | None, str]:
        """(the one category that labels the image, problem)."""
        if entry.problems:
            return None, "; ".join(entry.problems)
        categories = self.label_categories(entry)
        if not categories:
            return None, "no annotation"
        if len(categories) > 1:
            return None, "several categories: " + ", ".join(self.categories[c] for c in categories)
        return categories[0], ""

    def orphan_record(self, split: str, path: Path, image_id, names: list) -> Record:
        """Annotations that name no listed image: reported as a record so they are never lost."""
        if _is_id(image_id):
            key = f"unknown_image_{image_id}_{names[0]}"
            source = f"{path}: image id {image_id}"
            problem = f"image id {image_id!r} is not in 'images' (named by {', '.join(names)})"
        else:
            key, source = f"no_image_id_{names[0]}", f"{path}: {names[0]}"
            problem = f"{names[0]} has no string or integer 'image_id'"
        return Record(key=safe_key(key), image=b"", label=-1, split=split, source=source, problem=problem)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value) -> bool:
    return _is_int(value) or (isinstance(value, str) and value != "")


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive(value) -> bool:
    return _is_finite(value) and value > 0
