"""Waterbirds (Sagawa et al. 2020): `metadata.csv` rows -> Records grouped by bird type x place.

The bird is located by its CUB segmentation PNG (default) or by CUB's `bounding_boxes.txt`,
matched to the metadata by image path.

Where the segmentations are: CUB's `segmentations.tgz` unpacks to a top-level `segmentations/`
folder, which `cfrobust fetch waterbirds` (and the official `datasets/fetch_waterbird.sh`) leave
*beside* `waterbird_complete95_forest2water2/`. `segmentation_folder_candidates` gives the
search order; each image's PNG is taken from the first folder that has it.

Which pixels are the bird (`seg_rule`): `nonzero` (default) is the official code's rule: it
reads the PNG as RGB, divides by 255 and takes the box of `seg_np.all(axis=2)`, which on floats
is true wherever every channel is nonzero (arch/data/waterbirds_datasets.py:72,79-80,83), and
its training mask is `ceil(ToTensor(mask)) == 1` in any channel, again every nonzero pixel
(arch/data/bbox_utils.py:248-251). `all255` keeps only pixels that are 255 in all channels,
dropping the soft, grey edges of CUB's segmentations.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np

from cfrobust.datasets.record import Box, DatasetSource, Record, safe_key
from cfrobust.errors import UserError

CLASSES = ["landbird", "waterbird"]  # metadata `y`
PLACES = ["land", "water"]  # metadata `place`
SPLITS = ["train", "val", "test"]  # metadata `split`
COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
BOX_SOURCES = ("segmentation", "cub")
SEG_RULES = ("nonzero", "all255")  # which segmentation pixels are the bird; the first is the default
METADATA = "metadata.csv"
SEGMENTATIONS = "segmentations"


def group_of(y: int, place: int) -> str:
    """Evaluation group of a bird type and a place, e.g. group_of(1, 0) == "waterbird/land"."""
    return f"{CLASSES[y]}/{PLACES[place]}"


@dataclass
class MetadataRow:
    """One line of metadata.csv, parsed; `problem` says why it cannot become a sample."""

    line: int
    split: str
    filename: str = ""
    y: int = 0
    place: int = 0
    img_id: int | str = ""
    place_filename: str = ""
    problem: str = ""

    @property
    def key(self) -> str:
        return safe_key(self.filename) if self.filename else f"metadata_line_{self.line}"


class WaterbirdsDataset(DatasetSource):
    name = "waterbirds"
    classes = CLASSES
    splits = SPLITS
    aligned_groups = [group_of(0, 0), group_of(1, 1)]

    def __init__(self, root, boxes: str = "segmentation", cub_root=None, seg_rule: str | None = None):
        """`seg_rule` None means not chosen: `nonzero` with segmentations, and none with CUB boxes."""
        if boxes not in BOX_SOURCES:
            raise UserError(f"waterbirds boxes must be one of {', '.join(BOX_SOURCES)}, got {boxes!r}")
        if seg_rule is not None and seg_rule not in SEG_RULES:
            raise UserError(f"waterbirds seg_rule must be one of {', '.join(SEG_RULES)}, got {seg_rule!r}")
        if seg_rule is not None and boxes == "cub":
            raise UserError("--seg-rule chooses segmentation pixels; it does not apply to --boxes cub")
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"waterbirds root {self.root} is not a directory")
        self.boxes = boxes
        self.cub_root = None if cub_root is None else Path(cub_root)
        if self.cub_root is not None and not self.cub_root.is_dir():
            raise UserError(f"CUB root {self.cub_root} is not a directory")
        self.metadata_path = self.root / METADATA
        self._rows = _rows_by_split(read_metadata(self.metadata_path))
        self._cub_boxes = None
        self.seg_rule = None
        self.seg_folders: list[Path] = []
        if boxes == "cub":
            if self.cub_root is None:
                raise UserError("--boxes cub needs --cub-root, the CUB_200_2011 folder")
            self._cub_boxes = CubBoxes.read(self.cub_root)
        else:
            self.seg_rule = seg_rule or SEG_RULES[0]
            self.seg_folders = find_segmentation_folders(self.root, self.cub_root)

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "root": str(self.root),
            "boxes": self.boxes,
            "cub_root": None if self.cub_root is None else str(self.cub_root),
            "segmentations": [str(folder) for folder in self.seg_folders],
            "seg_rule": self.seg_rule,
        }

    def count(self, split: str) -> int:
        return len(self._split_rows(split))

    def records(self, split: str) -> Iterator[Record]:
        for row in self._split_rows(split):
            yield self._record(row)

    def _split_rows(self, split: str) -> list[MetadataRow]:
        if split not in self._rows:
            raise UserError(f"waterbirds has no split {split!r}; splits: {', '.join(SPLITS)}")
        return self._rows[split]

    def _record(self, row: MetadataRow) -> Record:
        record = Record(
            key=row.key,
            image=self.root.joinpath(*PurePosixPath(row.filename).parts),
            label=row.y,
            group=group_of(row.y, row.place),
            split=row.split,
            attrs={"place": PLACES[row.place], "place_filename": row.place_filename, "img_id": row.img_id},
            source=f"{self.metadata_path}:{row.line}",
            problem=row.problem,
        )
        if not record.problem:
            self._locate_bird(record, row.filename)
        return record

    def _locate_bird(self, record: Record, filename: str) -> None:
        """Give the record its mask path or its CUB box, or the reason it has neither."""
        if self._cub_boxes is not None:
            box, problem = self._cub_boxes.lookup(filename)
            record.boxes, record.problem = ([box] if box else []), problem
            return
        relative = PurePosixPath(filename).with_suffix(".png").parts
        candidates = [folder.joinpath(*relative) for folder in self.seg_folders]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            record.problem = "no segmentation " + " or ".join(str(p) for p in candidates)
        elif self.seg_rule == "all255":
            record.mask, record.problem = pixels_all_255(found)
        else:
            record.mask = found  # the pipeline reads it as grey levels: nonzero = bird


def segmentation_folder_candidates(root: Path, cub_root: Path | None) -> list[Path]:
    """Where a `segmentations/` folder may be, in search order: inside ROOT, inside CUB_ROOT,
    beside ROOT (in its parent folder: where `cfrobust fetch waterbirds` and the official
    fetch_waterbird.sh put it), beside CUB_ROOT. A place named twice is listed once."""
    inside = [root] + ([cub_root] if cub_root is not None else [])
    # abspath, not resolve: "beside" means beside the folder as the user names it, symlink or not,
    # and `--root .` must still have a parent.
    beside = [Path(os.path.abspath(folder)).parent for folder in inside]
    candidates: list[Path] = []
    seen: set[str] = set()
    for folder in inside + beside:
        place = folder / SEGMENTATIONS
        if os.path.abspath(place) not in seen:
            seen.add(os.path.abspath(place))
            candidates.append(place)
    return candidates


def find_segmentation_folders(root: Path, cub_root: Path | None) -> list[Path]:
    """The candidate folders that exist, in search order; none is a UserError naming every place looked."""
    candidates = segmentation_folder_candidates(root, cub_root)
    found = [folder for folder in candidates if folder.is_dir()]
    if not found:
        raise UserError(
            f"waterbirds: no {SEGMENTATIONS}/ folder in {', '.join(str(folder) for folder in candidates)}; "
            f"unpack CUB's segmentations.tgz beside {root} (`cfrobust fetch waterbirds` does), "
            f"or take CUB's boxes with --boxes cub --cub-root CUB_200_2011"
        )
    return found


def pixels_all_255(path: Path) -> tuple[np.ndarray | None, str]:
    """(HxW uint8 mask, 255 = bird, "") from the pixels of a segmentation PNG that are 255 in
    every channel, as RGB (grey and palette PNGs expanded, alpha dropped); else (None, why not)."""
    from cfrobust.shards.schema import decode_rgb  # OpenCV: imported only when this rule is used

    try:
        pixels = decode_rgb(path.read_bytes())
    except (OSError, ValueError):
        return None, f"unreadable mask {path}"
    bird = (pixels == 255).all(axis=2)
    if not bird.any():
        return None, f"segmentation {path} has no pixel of 255 in every channel (--seg-rule all255)"
    return bird.astype(np.uint8) * np.uint8(255), ""


def read_metadata(path: Path) -> list[MetadataRow]:
    """Every data line of metadata.csv in file order; a bad header or unreadable file is a UserError."""
    if not path.is_file():
        raise UserError(f"waterbirds metadata {path} not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            columns, width = _header_columns(next(reader, None), path)
            rows = [_parse_row(cells, columns, width, reader.line_num) for cells in reader if cells]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: unreadable CSV: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    _mark_duplicates(rows)
    return rows


def _header_columns(header: list[str] | None, path: Path) -> tuple[dict[str, int], int]:
    """Column index of each required column (extra columns such as a pandas index are ignored)."""
    if not header:
        raise UserError(f"{path} is empty; expected the header {','.join(COLUMNS)}")
    names = [name.strip() for name in header]
    missing = [name for name in COLUMNS if name not in names]
    if missing:
        raise UserError(f"{path}: header lacks column(s) {', '.join(missing)} (found: {','.join(names)})")
    repeated = [name for name in COLUMNS if names.count(name) > 1]
    if repeated:
        raise UserError(f"{path}: header repeats column {repeated[0]}")
    return {name: names.index(name) for name in COLUMNS}, len(names)


def _parse_row(cells: list[str], columns: dict[str, int], width: int, line: int) -> MetadataRow:
    # A row whose field count differs from the header's cannot be trusted column by column,
    # so not even its split is read: it is reported with the first split.
    if len(cells) != width:
        return MetadataRow(line, SPLITS[0], problem=f"malformed line: {len(cells)} fields, the header has {width}")
    value = {name: cells[index].strip() for name, index in columns.items()}
    problems = []
    split = _choice(value, "split", SPLITS, problems)
    y = _choice(value, "y", CLASSES, problems)
    place = _choice(value, "place", PLACES, problems)
    if not value["img_filename"]:
        problems.append("empty img_filename")
    img_id = value["img_id"]
    return MetadataRow(
        line,
        SPLITS[split] if split is not None else SPLITS[0],
        filename=value["img_filename"],
        y=y or 0,
        place=place or 0,
        img_id=int(img_id) if img_id.isdigit() else img_id,
        place_filename=value["place_filename"],
        problem="; ".join(problems),
    )


def _choice(value: dict[str, str], column: str, names: list[str], problems: list[str]) -> int | None:
    """The integer code in `column` if it is one of 0..len(names)-1 (pandas may write 1 as 1.0)."""
    text = value[column]
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number.is_integer() and 0 <= number < len(names):
        return int(number)
    allowed = ", ".join(str(i) for i in range(len(names) - 1)) + f" or {len(names) - 1}"
    problems.append(f"{column} {text!r} is not {allowed}")
    return None


def _mark_duplicates(rows: list[MetadataRow]) -> None:
    """The first row of an img_filename wins; later ones are reported, not silently merged."""
    first_line: dict[str, int] = {}
    for row in rows:
        if row.problem or not row.filename:
            continue
        if row.filename in first_line:
            row.problem = f"duplicate img_filename {row.filename} (first at {METADATA}:{first_line[row.filename]})"
        else:
            first_line[row.filename] = row.line


def _rows_by_split(rows: list[MetadataRow]) -> dict[str, list[MetadataRow]]:
    """Rows per split, sorted by image path (then line) so the output does not depend on CSV order."""
    by_split: dict[str, list[MetadataRow]] = {split: [] for split in SPLITS}
    for row in sorted(rows, key=lambda r: (r.filename, r.line)):
        by_split[row.split].append(row)
    return by_split


@dataclass
class CubBoxes:
    """CUB's `images.txt` + `bounding_boxes.txt`, keyed by image path (`<class folder>/<file>`)."""

    boxes: dict[str, Box]
    problems: dict[str, str]  # image path -> why it has no usable box
    unattributed: list[str]  # "<file>:<line>" of malformed lines that name no image

    @classmethod
    def read(cls, cub_root: Path) -> "CubBoxes":
        images_path, boxes_path = cub_root / "images.txt", cub_root / "bounding_boxes.txt"
        names, problems, unattributed = _read_images_txt(images_path)
        boxes_by_id, box_problems, unattributed_boxes = _read_bounding_boxes(boxes_path)
        boxes = {}
        for image_id, name in names.items():
            if name in problems:
                continue
            if image_id in box_problems:
                problems[name] = box_problems[image_id]
            elif image_id in boxes_by_id:
                boxes[name] = boxes_by_id[image_id]
            else:
                problems[name] = _with_hint(f"image id {image_id} has no line in {boxes_path}", unattributed_boxes)
        return cls(boxes, problems, unattributed)

    def lookup(self, image_name: str) -> tuple[Box | None, str]:
        """(box, "") for a known image, else (None, the reason)."""
        if image_name in self.problems:
            return None, self.problems[image_name]
        if image_name in self.boxes:
            return self.boxes[image_name], ""
        return None, _with_hint(f"{image_name} is not in CUB images.txt", self.unattributed)


def _with_hint(message: str, malformed: list[str]) -> str:
    """Point at malformed lines that might have held the missing entry."""
    if not malformed:
        return message
    return f"{message} (malformed line(s) there: {', '.join(malformed[:3])})"


def _read_images_txt(path: Path) -> tuple[dict[int, str], dict[str, str], list[str]]:
    """CUB image id -> path, path -> problem, and malformed lines that name no image."""
    names: dict[int, str] = {}
    first_line: dict[str, int] = {}
    problems: dict[str, str] = {}
    unattributed: list[str] = []
    for line, fields, text in _lines(path):
        if len(fields) != 2 or not fields[0].isdigit():
            if len(fields) >= 2:
                problems[fields[1]] = f"{path}:{line}: malformed line {text!r}"
            else:
                unattributed.append(f"{path.name}:{line}")
            continue
        image_id, name = int(fields[0]), fields[1]
        if name in first_line:
            problems[name] = f"{path}:{line}: {name} listed again (first at line {first_line[name]})"
        elif image_id in names:
            for clash in (names[image_id], name):
                problems[clash] = f"{path}:{line}: image id {image_id} given to two images"
        first_line.setdefault(name, line)
        names.setdefault(image_id, name)
    return names, problems, unattributed


def _read_bounding_boxes(path: Path) -> tuple[dict[int, Box], dict[int, str], list[str]]:
    """CUB image id -> (x0, y0, x1, y1), id -> problem, and malformed lines that name no id."""
    boxes: dict[int, Box] = {}
    problems: dict[int, str] = {}
    unattributed: list[str] = []
    for line, fields, text in _lines(path):
        if not fields[0].isdigit():
            unattributed.append(f"{path.name}:{line}")
            continue
        image_id = int(fields[0])
        numbers = _finite_floats(fields[1:])
        if len(fields) != 5 or numbers is None:
            problems[image_id] = f"{path}:{line}: malformed line {text!r}"
        elif image_id in boxes:
            problems[image_id] = f"{path}:{line}: second box for image id {image_id}"
        else:
            x, y, w, h = numbers
            boxes[image_id] = (x, y, x + w, y + h)
    return boxes, problems, unattributed


def _finite_floats(fields: list[str]) -> list[float] | None:
    try:
        numbers = [float(field) for field in fields]
    except ValueError:
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def _lines(path: Path) -> Iterator[tuple[int, list[str], str]]:
    """(1-based line number, whitespace-split fields, text) of each non-blank line of a CUB file."""
    if not path.is_file():
        raise UserError(f"CUB file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.split(), line.strip()
