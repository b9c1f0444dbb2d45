"""The Backgrounds Challenge (ImageNet-9, Xiao et al. 2020) as records: IN-9 or IN-9L training
images with their object located, and the evaluation variants (original, mixed_same, ...).

Two trees, never mixed, as the official CVPR'21 code keeps them (arch/lightning/in9.py:120-125):
- the evaluation release (`backgrounds_challenge_data.tar.gz`, unpacked: `bg_challenge/<variant>/
  val/<class folder>/<image>`, masks in `fg_mask/val`) gives the test splits, `original` included;
- the training archives (`original.tar.gz` for IN-9, `in9l.tar.gz` for IN-9L, `no_fg.tar.gz`, ...,
  each unpacked: `<variant>/{train,val}/<class folder>/<image>`) give `train` and `val`; `val`, the
  split that selects the checkpoint, is the training archive's own uncleaned `val/`.
`root` is the release's `bg_challenge` folder or the folder holding it (where `cfrobust fetch in9`
unpacks every archive); `train_root` (default: `root`) holds the training archives' folders.
A located image's object comes from, in this order, and from its own tree only: its
`fg_mask/<train|val>/<class>/<stem>` file (`.npy` as released, or an image mask), the pixels that
are black in `no_fg` and not in the image (the official code's rule), its boxes in ImageNet's
`LOC_train_solution.csv`; else it has none and trains as plain ERM.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from cfrobust.datasets.record import Box, DatasetSource, Record, safe_key
from cfrobust.errors import UserError

CLASSES = [
    "00_dog",
    "01_bird",
    "02_wheeled vehicle",
    "03_reptile",
    "04_carnivore",
    "05_insect",
    "06_musical instrument",
    "07_primate",
    "08_fish",
]
RELEASE_FOLDER = "bg_challenge"  # what backgrounds_challenge_data.tar.gz unpacks to
ORIGINAL = "original"
EVAL_VARIANTS = ["mixed_same", "mixed_rand", "mixed_next", "only_fg", "no_fg"]
TEST_VARIANTS = [ORIGINAL, *EVAL_VARIANTS]  # read from the release, split name = variant name
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # compared lower-cased, so .JPEG counts
MASK_VARIANT = "fg_mask"
NO_FG_VARIANT = "no_fg"
LOC_HEADER = ["ImageId", "PredictionString"]
LOC_GROUP = 5  # wnid x_min y_min x_max y_max
# The training archive of IN-9L (MadryLab/backgrounds_challenge README, "Training Data"); the
# IN-9 ones are what `cfrobust fetch in9` downloads.
IN9L_ARCHIVE = "https://www.dropbox.com/s/8w29bg9niya19rn/in9l.tar.gz?dl=1"
SHOWN_OVERLAPS = 3  # file names quoted in the note on val images named like test images


@dataclass(frozen=True)
class SplitFolder:
    """Where a split's images live, and whether to look for their object."""

    tree: Path  # the release or the training tree: the split's masks come from the same one
    variant: str
    folder: str  # "train" or "val" inside the variant
    located: bool  # training/validation/original images: find masks or boxes; the other variants: no
    # False where the tree's fg_mask/val and no_fg/val are the release's (IN-9L's archive unpacked
    # into the release folder): then only LOC boxes locate the split's images.
    own_masks: bool = True

    @property
    def path(self) -> Path:
        return self.tree / self.variant / self.folder


@dataclass
class Location:
    """The object of one image, as Record fields, and which source gave it."""

    source: str = "none"  # fg_mask | no_fg | loc_csv | none
    boxes: list | None = None
    mask: object = None
    problem: str = ""
    problem_source: str = ""  # where the problem lies, when not the image itself


class BackgroundsDataset(DatasetSource):
    classes = CLASSES

    def __init__(self, root, large: bool = False, loc_csv=None, train_root=None):
        self.root = Path(root)
        self.large = large
        self.name = "in9l" if large else "in9"
        self.training = "in9l" if large else ORIGINAL
        if not self.root.is_dir():
            raise UserError(f"{self.name} root {self.root} does not exist or is not a folder")
        self.train_root = self.root if train_root is None else Path(train_root)
        if not self.train_root.is_dir():
            raise UserError(f"{self.name} --train-root {self.train_root} does not exist or is not a folder")
        # The folder the release archive unpacks to, when `root` is the folder it was unpacked in.
        self.release = self.root / RELEASE_FOLDER if (self.root / RELEASE_FOLDER).is_dir() else self.root
        self.loc_csv = None if loc_csv is None else Path(loc_csv)
        if self.loc_csv is not None:
            check_loc_header(self.loc_csv)
        self.split_folders = self._find_splits()
        self.splits = list(self.split_folders)
        self._file_cache: dict[str, list] = {}
        self._listing_cache: dict[Path, dict[str, Path]] = {}
        self._mask_index: dict[Path, dict[str, Path]] = {}  # fg_mask folder -> stem -> mask file
        self._loc_lines: dict[str, list] | None = None  # image id -> [(line number, prediction)]

    def _find_splits(self) -> dict[str, SplitFolder]:
        train = SplitFolder(self.train_root, self.training, "train", True)
        if not train.path.is_dir():
            raise UserError(self._missing_training(train.path))
        in_release = os.path.samefile(self.train_root, self.release)
        wanted = {"train": train, "val": SplitFolder(self.train_root, self.training, "val", True, not in_release)}
        for variant in TEST_VARIANTS:
            wanted[variant] = SplitFolder(self.release, variant, "val", variant == ORIGINAL)
        # Only splits whose folder exists: the release may come without some variants.
        present = {name: where for name, where in wanted.items() if where.path.is_dir()}
        tests = [name for name in present if name in TEST_VARIANTS]
        if not tests:
            raise UserError(
                f"{self.name}: no test set in {self.release} (none of {', '.join(f'{v}/val' for v in TEST_VARIANTS)}); "
                f"--root takes the release's {RELEASE_FOLDER} folder or the folder holding it"
            )
        for name in tests:
            self._check_release_only(present[name])
        if "val" in present:
            self._check_training_only(present["val"], [present[name].path for name in tests])
        return present

    def _missing_training(self, train_dir: Path) -> str:
        if self.large:
            how = f"download {IN9L_ARCHIVE} and unpack it into {self.train_root} (or a folder given as --train-root)"
        else:
            how = (f"`cfrobust fetch in9 --to DIR` downloads original.tar.gz and no_fg.tar.gz beside the release "
                   f"(then --root DIR), or unpack them into a folder given as --train-root")
        return f"{self.name}: training folder {train_dir} is missing (the release holds only the test sets): {how}"

    def _check_release_only(self, where: SplitFolder) -> None:
        """A test split's folder must hold the release's images alone: a training archive of the same
        variant unpacked into the same folder merges its uncleaned val/ into it, file by file."""
        beside = where.tree / where.variant / "train"
        if beside.is_dir():
            raise UserError(
                f"{self.name}: {where.path} cannot be a test set: {beside} beside it comes from the training archive "
                f"{where.variant}.tar.gz, whose own val/ is unpacked into the same folder; give the release's "
                f"{RELEASE_FOLDER} folder as --root and the training archives' folder as --train-root"
            )

    def _check_training_only(self, val: SplitFolder, test_folders: list[Path]) -> None:
        """The selection split must not be (or hold) the release's test images."""
        same = any(os.path.samefile(folder, val.path) for folder in test_folders)
        release_masks = self.train_root / MASK_VARIANT / "val"
        if same or (val.variant == ORIGINAL and release_masks.is_dir()):
            evidence = f"{release_masks}, the release's test masks, is there too"
            if same:
                evidence = "it is the release's test folder"
            raise UserError(
                f"{self.name}: {val.path} cannot be the validation split: {evidence}; unpack the training "
                f"archives into a folder of their own and give it as --train-root"
            )

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "root": str(self.root),
            "release": str(self.release),
            "train_root": str(self.train_root),
            "large": self.large,
            "loc_csv": None if self.loc_csv is None else str(self.loc_csv),
            "splits": {name: str(where.path) for name, where in self.split_folders.items()},
        }

    def notes(self) -> list[str]:
        """Validation images named like the release's original test images of the same class."""
        if "val" not in self.split_folders or ORIGINAL not in self.split_folders:
            return []
        tests = {(c, p.name) for c, p in self._files(ORIGINAL)}
        shared = [f"{c}/{p.name}" for c, p in self._files("val") if (c, p.name) in tests]
        if not shared:
            return []
        shown = ", ".join(shared[:SHOWN_OVERLAPS]) + (", ..." if len(shared) > SHOWN_OVERLAPS else "")
        return [
            f"val ({self.split_folders['val'].path}): {len(shared)} of {self.count('val')} images are named like "
            f"a test image of the same class in {self.split_folders[ORIGINAL].path} ({shown}); val keeps them, "
            f"as the official code does"
        ]

    def count(self, split: str) -> int:
        return len(self._files(split))

    def records(self, split: str) -> Iterator[Record]:
        where = self._split_folder(split)
        for class_folder, path in self._files(split):
            yield self._record(split, where, class_folder, path)

    def _split_folder(self, split: str) -> SplitFolder:
        if split not in self.split_folders:
            raise UserError(f"{self.name} has no split {split!r}; present: {', '.join(self.splits)}")
        return self.split_folders[split]

    def _files(self, split: str) -> list[tuple[str, Path]]:
        """(class folder, image path) of every image in the split, classes in label order, names sorted."""
        if split not in self._file_cache:
            split_dir = self._split_folder(split).path
            folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
            ordered = [c for c in CLASSES if c in folders] + [f for f in folders if f not in CLASSES]
            self._file_cache[split] = [
                (folder, path) for folder in ordered for path in list_files(split_dir / folder, IMAGE_SUFFIXES)
            ]
        return self._file_cache[split]

    def _images_in(self, folder: Path) -> dict[str, Path]:
        """Image files of a folder (none if it is missing), name -> path, sorted by name; cached."""
        if folder not in self._listing_cache:
            self._listing_cache[folder] = {p.name: p for p in list_files(folder, IMAGE_SUFFIXES)}
        return self._listing_cache[folder]

    def _mask_file(self, where: SplitFolder, class_folder: str, stem: str) -> Path | None:
        mask_dir = where.tree / MASK_VARIANT / where.folder / class_folder
        if mask_dir not in self._mask_index:
            index: dict[str, Path] = {}
            # The release's masks are .npy; if an image mask shares a stem with one, the .npy wins.
            for path in sorted(list_files(mask_dir, IMAGE_SUFFIXES | {".npy"}), key=mask_preference):
                index.setdefault(path.stem, path)
            self._mask_index[mask_dir] = index
        return self._mask_index[mask_dir].get(stem)

    def _record(self, split: str, where: SplitFolder, class_folder: str, path: Path) -> Record:
        relative = f"{where.variant}/{where.folder}/{class_folder}/{path.name}"
        record = Record(
            key=safe_key(relative),
            image=str(path),
            label=CLASSES.index(class_folder) if class_folder in CLASSES else -1,
            group=class_folder,
            split=split,
            attrs={"variant": where.variant, "file": relative},
            source=str(path),
        )
        if class_folder not in CLASSES:
            record.problem = f"class folder {class_folder!r} is not one of the 9 IN-9 classes"
            return record
        location = self._locate(where, class_folder, path) if where.located else Location()
        record.attrs["location"] = location.source
        record.boxes = location.boxes or []
        record.mask = location.mask
        record.problem = location.problem
        if location.problem_source:
            record.source = location.problem_source
        return record

    def _locate(self, where: SplitFolder, class_folder: str, path: Path) -> Location:
        if not where.own_masks:
            return self._loc_boxes(path)
        mask_file = self._mask_file(where, class_folder, path.stem)
        if mask_file is not None:
            return mask_from_file(mask_file)
        no_fg_dir = where.tree / NO_FG_VARIANT / where.folder / class_folder
        no_fg_file = self._images_in(no_fg_dir).get(path.name)
        if no_fg_file is not None:
            location = mask_from_no_fg(path, no_fg_file)
            if location is not None:
                return location
        return self._loc_boxes(path)

    def _loc_boxes(self, path: Path) -> Location:
        if self.loc_csv is None:
            return Location()
        lines = self._loc_table().get(path.stem)
        if not lines:
            return Location()
        where = f"{self.loc_csv}:{lines[0][0]}"
        if len(lines) > 1:
            numbers = ", ".join(str(n) for n, _ in lines)
            return Location(problem=f"image id {path.stem} appears on several lines ({numbers})", problem_source=where)
        boxes, problem = parse_prediction(lines[0][1])
        if problem:
            return Location(problem=f"image id {path.stem}: {problem}", problem_source=where)
        return Location(source="loc_csv", boxes=boxes)

    def _loc_table(self) -> dict[str, list]:
        """LOC lines of the images this dataset locates; the file covers all of ImageNet, so keep only those."""
        if self._loc_lines is None:
            stems = {
                path.stem
                for split, where in self.split_folders.items()
                if where.located
                for _, path in self._files(split)
            }
            self._loc_lines = read_loc_lines(self.loc_csv, stems)
        return self._loc_lines


def list_files(folder: Path, suffixes: set[str]) -> list[Path]:
    """Visible files of `folder` whose lower-cased suffix is in `suffixes`, sorted by name."""
    try:
        entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / name for name in sorted(e.name for e in entries if Path(e.name).suffix.lower() in suffixes)]


def mask_preference(path: Path) -> tuple[bool, str]:
    return path.suffix.lower() != ".npy", path.name


def check_loc_header(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"LOC box file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read LOC box file {path}: {exc}") from None
    if header is None or [h.strip() for h in header] != LOC_HEADER:
        raise UserError(f"{path}: header must be 'ImageId,PredictionString', found {','.join(header or [])!r}")


def read_loc_lines(path: Path, stems: set[str]) -> dict[str, list]:
    """image id -> [(line number, PredictionString)] for the ids in `stems`."""
    table: dict[str, list] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            next(reader)
            for row in reader:
                if row and row[0].strip() in stems:
                    prediction = row[1] if len(row) == 2 else None  # None: not two fields, reported on use
                    table.setdefault(row[0].strip(), []).append((reader.line_num, prediction))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read LOC box file {path}: {exc}") from None
    return table


def parse_prediction(text: str | None) -> tuple[list[Box], str]:
    """`wnid x_min y_min x_max y_max ...` -> every box of the image (ImageNet pixels), or a problem."""
    expected = "expected 'ImageId,PredictionString' with groups of 'wnid x_min y_min x_max y_max'"
    if text is None:
        return [], f"line does not have 2 fields; {expected}"
    tokens = text.split()
    if not tokens or len(tokens) % LOC_GROUP:
        return [], f"PredictionString {text.strip()!r} has {len(tokens)} fields; {expected}"
    boxes = []
    for start in range(0, len(tokens), LOC_GROUP):
        try:
            x0, y0, x1, y1 = (float(v) for v in tokens[start + 1 : start + LOC_GROUP])
        except ValueError:
            return [], f"PredictionString {text.strip()!r} has a non-numeric coordinate; {expected}"
        boxes.append((x0, y0, x1, y1))
    return boxes, ""


def mask_from_file(mask_file: Path) -> Location:
    """A released `.npy` mask is loaded here (the pipeline reads image masks itself)."""
    if mask_file.suffix.lower() != ".npy":
        return Location(source=MASK_VARIANT, mask=str(mask_file))
    try:
        array = np.load(mask_file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        return Location(problem=f"unreadable mask file {mask_file}: {exc}")
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        return Location(problem=f"mask file {mask_file} holds no single array")
    if array.ndim == 3:  # a mask saved per channel: object wherever any channel marks it
        array = array.any(axis=2)
    if array.ndim != 2:
        return Location(problem=f"mask file {mask_file} has shape {array.shape}, expected HxW")
    return Location(source=MASK_VARIANT, mask=((array != 0) * 255).astype(np.uint8))


def mask_from_no_fg(image_path: Path, no_fg_path: Path) -> Location | None:
    """The object is where no_fg is black and the image is not (all channels, as the official code).

    None when no pixel qualifies (the official code then has no mask either) or when the image
    itself cannot be read (the pipeline reports that image).
    """
    image = read_color(image_path)
    if image is None:
        return None
    no_fg = read_color(no_fg_path)
    if no_fg is None:
        return Location(problem=f"unreadable no_fg file {no_fg_path}")
    if no_fg.shape != image.shape:
        return Location(
            problem=f"no_fg file {no_fg_path} is {no_fg.shape[1]}x{no_fg.shape[0]}, "
            f"image is {image.shape[1]}x{image.shape[0]}"
        )
    removed = ((no_fg == 0) & (image != 0)).all(axis=2)
    if not removed.any():
        return None
    return Location(source=NO_FG_VARIANT, mask=removed.astype(np.uint8) * 255)


def read_color(path: Path) -> np.ndarray | None:
    """HxWx3 uint8 (channel order irrelevant here: both images are compared the same way)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)
