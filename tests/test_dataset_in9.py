"""The Backgrounds Challenge adapter on a tiny tree in the release layout, through the real pipeline.

Checks split names, counts, labels from the class folders, where masks and boxes land after the
resize (fg_mask .npy/.png, no_fg-derived, LOC boxes, in that order), and per-record problems.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cfrobust.datasets import in9
from cfrobust.datasets.in9 import CLASSES, BackgroundsDataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess

W, H, SIZE = 20, 14, 16  # source images are 20x14; shards store 16x16
BACKGROUND = (40, 90, 160)  # no channel is 0, so only the blacked-out object counts in no_fg
OBJECT = (200, 60, 30)
EVAL = ["mixed_same", "mixed_rand", "only_fg"]


def shape(x0, y0, x1, y1, notch=False) -> np.ndarray:
    """Boolean HxW object: a rectangle, optionally missing its top-left 2x2 corner (so mask != box)."""
    inside = np.zeros((H, W), bool)
    inside[y0:y1, x0:x1] = True
    if notch:
        inside[y0 : y0 + 2, x0 : x0 + 2] = False
    return inside


def picture(obj: np.ndarray, width: int = W, black_band: bool = False) -> np.ndarray:
    """The object on a plain background; `black_band`: the two left columns are black already."""
    image = np.empty((H, width, 3), np.uint8)
    image[:] = BACKGROUND
    if black_band:  # black in no_fg too, yet no object: no_fg must differ from the image to count
        image[:, :2] = 0
    image[: obj.shape[0], : obj.shape[1]][obj] = OBJECT
    return image


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


# Training images: (class index, file name, object, how its object is located)
DOG_A = shape(2, 3, 9, 11, notch=True)
BIRD = shape(10, 1, 18, 6)
VEHICLE = shape(0, 0, 20, 7)
REPTILE_A = shape(4, 4, 12, 13, notch=True)
REPTILE_B = shape(13, 2, 19, 9)
INSECT = shape(1, 8, 6, 14)
TRAIN = [
    (0, "n02085620_1.png", DOG_A, "fg_mask"),  # also in the LOC file: the mask wins
    (0, "n02085620_2.png", shape(5, 5, 15, 10), "fg_mask"),
    (1, "n01530575_3.png", BIRD, "fg_mask"),
    (2, "n04037443_4.png", VEHICLE, "fg_mask"),
    (3, "n01644373_5.png", REPTILE_A, "no_fg"),  # also in the LOC file: no_fg wins
    (3, "n01644373_6.png", REPTILE_B, "no_fg"),  # drawn with a black band left of the object
    (4, "n02119789_5.png", shape(3, 2, 15, 12), "loc_csv"),  # no_fg equal to the image: nothing there
    (5, "n02165456_7.png", INSECT, "no_fg"),
    (6, "n03467517_10026.png", shape(2, 3, 19, 13), "loc_csv"),
    (6, "n03467517_11.png", shape(4, 4, 16, 12), "loc_csv"),
    (7, "n02480495_8.JPEG", shape(6, 6, 10, 10), "none"),
    (8, "n01443537_9.png", shape(2, 2, 8, 8), "problem"),  # its no_fg is 21 pixels wide
    (8, "n01443537_10.jpg", shape(2, 2, 8, 8), "none"),
]
LOC_LINES = [
    "ImageId,PredictionString",
    "n02085620_1,n02085620 0 0 20 14 ",
    "n03467517_10026,n03467517 2 3 9 10 n03467517 11 1 19 13 ",
    "n03467517_11,n03467517 4 4 16 12 ",
    "n02119789_5,n02119789 3 2 15 12 ",
    "n01644373_5,n01644373 0 0 5 5 ",
    "n03467517_99,n03467517 1 2 3",  # line 7: 4 fields, not a box
    "n09999999_1,n09999999 0 0 10 10 ",  # an ImageNet image the dataset does not hold
]
LOC_BOXES = {
    "n02119789_5": [(3, 2, 15, 12)],
    "n03467517_10026": [(2, 3, 9, 10), (11, 1, 19, 13)],
    "n03467517_11": [(4, 4, 16, 12)],
}


def write_train(root: Path) -> None:
    for label, name, obj, how in TRAIN:
        folder = f"train/{CLASSES[label]}"
        band = name == "n01644373_6.png"
        image = write(root / "original" / folder / name, picture(obj, black_band=band))
        stem = Path(name).stem
        if how == "fg_mask" and label == 2:  # an image mask instead of the released .npy
            write(root / "fg_mask" / folder / f"{stem}.png", obj.astype(np.uint8) * 255)
        elif how == "fg_mask":
            (root / "fg_mask" / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / "fg_mask" / folder / f"{stem}.npy", obj if label == 1 else obj.astype(np.uint8))
        elif how == "no_fg":
            blacked = picture(obj, black_band=band)
            blacked[obj] = 0
            write(root / "no_fg" / folder / name, blacked)
        elif name == "n02119789_5.png":
            write(root / "no_fg" / folder / name, cv2.imread(str(image)))
        elif how == "problem":
            write(root / "no_fg" / folder / name, picture(obj, width=W + 1))
    dog = root / "original/train/00_dog"
    (dog / ".hidden.png").write_bytes(b"not an image")
    (dog / "notes.txt").write_text("not an image\n")
    (dog / "subfolder").mkdir()


def write_val_and_variants(root: Path) -> None:
    for label, folder in enumerate(CLASSES):
        obj = shape(label, 1, label + 8, 12)
        write(root / "original/val" / folder / f"v{label}.png", picture(obj))
        (root / "fg_mask/val" / folder).mkdir(parents=True)
        np.save(root / "fg_mask/val" / folder / f"v{label}.npy", obj.astype(np.uint8))
        for variant in EVAL:
            write(root / variant / "val" / folder / f"m{label}.JPEG", picture(obj))
    write(root / "original/val/zz_unknown/u.png", picture(shape(1, 1, 5, 5)))


def write_in9l(root: Path) -> None:
    write(root / "in9l/train/00_dog/c.png", picture(shape(1, 1, 5, 5)))
    write(root / "in9l/train/06_musical instrument/n03467517_10026.png", picture(shape(2, 3, 19, 13)))
    write(root / "in9l/train/06_musical instrument/n03467517_99.png", picture(shape(1, 2, 3, 4)))
    write(root / "in9l/val/01_bird/w.png", picture(BIRD))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bg_challenge")
    write_train(root)
    write_val_and_variants(root)
    write_in9l(root)
    (root / "LOC_train_solution.csv").write_text("\n".join(LOC_LINES) + "\n")
    return root


def read_split(split_dir: Path) -> dict[str, dict]:
    """key -> {"meta", "mask" (or None)}, straight from the tar files."""
    samples: dict[str, dict] = {}
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {"mask": None})
                if ext == "json":
                    sample["meta"] = json.loads(data)
                elif ext == "mask.png":
                    sample["mask"] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return samples


def nearest(mask: np.ndarray) -> np.ndarray:
    """The 20x14 mask at 16x16 by nearest neighbour, source pixel floor(i * src / dst), as 0/255."""
    rows = np.floor(np.arange(SIZE) * H / SIZE).astype(int)
    cols = np.floor(np.arange(SIZE) * W / SIZE).astype(int)
    return mask[rows][:, cols].astype(np.uint8) * 255


def stored(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0 * SIZE / W, y0 * SIZE / H, x1 * SIZE / W, y1 * SIZE / H]


def assert_boxes(actual, expected) -> None:
    """Same number of boxes, each coordinate within the shard's 3-decimal rounding."""
    assert np.shape(actual) == np.shape(expected)
    np.testing.assert_allclose(np.array(actual, float), np.array(expected, float), atol=1e-3, rtol=0)


def extent(obj: np.ndarray) -> tuple:
    rows, cols = np.nonzero(obj)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def train_key(label: int, name: str) -> str:
    return in9.safe_key(f"original/train/{CLASSES[label]}/{name}")


@pytest.fixture(scope="module")
def in9_out(root, tmp_path_factory):
    dataset = BackgroundsDataset(root, loc_csv=root / "LOC_train_solution.csv")
    out = tmp_path_factory.mktemp("in9_shards")
    summaries = preprocess(dataset, out, ["tile"], size=SIZE, progress=False)
    return dataset, out, {s.split: s for s in summaries}


def test_in9_splits_counts_and_classes(in9_out):
    dataset, out, summaries = in9_out
    assert dataset.name == "in9"
    assert dataset.splits == ["train", "val", "mixed_same", "mixed_rand", "only_fg"]  # no no_fg/val here
    assert [dataset.count(s) for s in dataset.splits] == [13, 10, 9, 9, 9]
    assert [summaries[s].written for s in dataset.splits] == [12, 9, 9, 9, 9]
    for split in dataset.splits:
        info = json.loads((out / split / "_info.json").read_text())
        assert info["classes"] == CLASSES
        assert info["num_samples"] == summaries[split].written
        assert info["source"]["dataset"] == "in9"
    groups = json.loads((out / "train" / "_info.json").read_text())["group_counts"]
    assert groups == {"00_dog": 2, "01_bird": 1, "02_wheeled vehicle": 1, "03_reptile": 2, "04_carnivore": 1,
                      "05_insect": 1, "06_musical instrument": 2, "07_primate": 1, "08_fish": 1}


def test_in9_labels_groups_and_keys_follow_the_class_folders(in9_out):
    _, out, _ = in9_out
    train = read_split(out / "train")
    assert train_key(2, "n04037443_4.png") == "original_train_02_wheeled_vehicle_n04037443_4"
    for label, name, _, how in TRAIN:
        if how == "problem":
            assert train_key(label, name) not in train
            continue
        meta = train[train_key(label, name)]["meta"]
        assert (meta["label"], meta["group"], meta["split"]) == (label, CLASSES[label], "train")
        assert meta["attrs"] == {"variant": "original", "file": f"original/train/{CLASSES[label]}/{name}",
                                 "location": how}
    for variant in EVAL:
        samples = read_split(out / variant)
        assert sorted(samples) == sorted(f"{variant}_val_{in9.safe_key(c)}_m{i}" for i, c in enumerate(CLASSES))
        for label, folder in enumerate(CLASSES):
            sample = samples[f"{variant}_val_{in9.safe_key(folder)}_m{label}"]
            assert (sample["meta"]["label"], sample["meta"]["group"]) == (label, folder)
            assert sample["meta"]["boxes"] == [] and sample["mask"] is None
            assert sample["meta"]["attrs"]["variant"] == variant


def test_in9_masks_land_on_the_object_pixel_for_pixel(in9_out):
    _, out, _ = in9_out
    train = read_split(out / "train")
    for label, name, obj, how in TRAIN:
        if how not in ("fg_mask", "no_fg"):
            continue
        sample = train[train_key(label, name)]
        assert np.array_equal(sample["mask"], nearest(obj)), name
        # the mask's extent, not the LOC box some of them also have
        assert_boxes(sample["meta"]["boxes"], [stored(extent(obj))])


def test_in9_loc_boxes_are_kept_all_and_rescaled(in9_out):
    _, out, _ = in9_out
    train = read_split(out / "train")
    for label, name, _, how in TRAIN:
        sample = train.get(train_key(label, name))
        if how == "loc_csv":
            expected = [stored(b) for b in LOC_BOXES[Path(name).stem]]
            assert_boxes(sample["meta"]["boxes"], expected)
            assert sample["mask"] is None
        elif how == "none":
            assert sample["meta"]["boxes"] == [] and sample["mask"] is None, name


def test_in9_val_uses_the_released_npy_masks(in9_out):
    _, out, _ = in9_out
    val = read_split(out / "val")
    for label, folder in enumerate(CLASSES):
        sample = val[in9.safe_key(f"original/val/{folder}/v{label}")]
        obj = shape(label, 1, label + 8, 12)
        assert np.array_equal(sample["mask"], nearest(obj))
        assert_boxes(sample["meta"]["boxes"], [stored(extent(obj))])


def test_in9_problems_are_reported_with_their_file(root, in9_out):
    _, _, summaries = in9_out
    (train_problem,) = summaries["train"].skipped
    image = root / "original/train/08_fish/n01443537_9.png"
    assert train_problem == {
        "key": train_key(8, "n01443537_9.png"),
        "source": str(image),
        "reason": f"no_fg file {root / 'no_fg/train/08_fish/n01443537_9.png'} is 21x14, image is 20x14",
    }
    (val_problem,) = summaries["val"].skipped
    assert val_problem["source"] == str(root / "original/val/zz_unknown/u.png")
    assert val_problem["reason"] == "class folder 'zz_unknown' is not one of the 9 IN-9 classes"
    for split in ("mixed_same", "mixed_rand", "only_fg"):
        assert summaries[split].skipped == []


def test_in9_strict_stops_at_the_first_problem(root, tmp_path):
    dataset = BackgroundsDataset(root)
    with pytest.raises(UserError, match=r"no_fg/train/08_fish/n01443537_9\.png is 21x14, image is 20x14"):
        preprocess(dataset, tmp_path / "out", ["tile"], size=SIZE, strict=True, progress=False)


def test_in9_without_loc_file_leaves_loc_images_unlocated(root):
    records = {r.attrs["file"]: r for r in BackgroundsDataset(root).records("train")}
    instrument = records["original/train/06_musical instrument/n03467517_10026.png"]
    assert (instrument.boxes, instrument.mask, instrument.attrs["location"]) == ([], None, "none")
    assert records["original/train/00_dog/n02085620_1.png"].attrs["location"] == "fg_mask"


def test_evaluation_variants_decode_nothing(root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an evaluation split decoded a file")

    monkeypatch.setattr(in9, "read_color", refuse)
    monkeypatch.setattr(in9.np, "load", refuse)
    dataset = BackgroundsDataset(root, loc_csv=root / "LOC_train_solution.csv")
    records = list(dataset.records("mixed_rand"))
    assert [r.label for r in records] == list(range(9))
    assert all(r.boxes == [] and r.mask is None and not r.problem for r in records)
    assert records[2].image == str(root / "mixed_rand/val/02_wheeled vehicle/m2.JPEG")


def test_in9l_splits_loc_boxes_and_bad_loc_line(root, tmp_path):
    csv_path = root / "LOC_train_solution.csv"
    dataset = BackgroundsDataset(root, large=True, loc_csv=csv_path)
    assert dataset.name == "in9l"
    assert dataset.splits == ["train", "val", "original", "mixed_same", "mixed_rand", "only_fg"]
    assert [dataset.count(s) for s in dataset.splits] == [3, 1, 10, 9, 9, 9]
    assert dataset.describe()["splits"]["original"] == "original/val"
    out = tmp_path / "out"
    summaries = {s.split: s for s in preprocess(dataset, out, ["tile"], size=SIZE, progress=False)}
    assert [summaries[s].written for s in dataset.splits] == [2, 1, 9, 9, 9, 9]
    train = read_split(out / "train")
    instrument = train["in9l_train_06_musical_instrument_n03467517_10026"]["meta"]
    assert_boxes(instrument["boxes"], [stored(b) for b in LOC_BOXES["n03467517_10026"]])
    assert (instrument["label"], instrument["attrs"]["variant"]) == (6, "in9l")
    assert train["in9l_train_00_dog_c"]["meta"]["boxes"] == []
    (problem,) = summaries["train"].skipped
    assert problem["key"] == "in9l_train_06_musical_instrument_n03467517_99"
    assert problem["source"] == f"{csv_path}:7"
    assert problem["reason"].startswith("image id n03467517_99: PredictionString 'n03467517 1 2 3' has 4 fields")
    original = read_split(out / "original")
    assert original["original_val_00_dog_v0"]["meta"]["attrs"]["location"] == "fg_mask"


def test_no_fg_split_is_listed_when_its_val_folder_exists(tmp_path):
    write(tmp_path / "original/train/00_dog/a.png", picture(DOG_A))
    write(tmp_path / "no_fg/val/03_reptile/b.png", picture(REPTILE_A))
    write(tmp_path / "mixed_next/val/03_reptile/b.png", picture(REPTILE_A))
    dataset = BackgroundsDataset(tmp_path)
    assert dataset.splits == ["train", "mixed_next", "no_fg"]
    (record,) = dataset.records("no_fg")
    assert (record.key, record.label, record.group) == ("no_fg_val_03_reptile_b", 3, "03_reptile")


@pytest.mark.parametrize(
    "layout, loc_text, message",
    [
        (None, None, r"in9 root .*missing_root does not exist"),
        ("in9l/train/00_dog", None, r"in9: training folder .*original/train is missing"),
        ("original/train/00_dog", "", r"LOC box file .*LOC\.csv does not exist"),
        ("original/train/00_dog", "id,boxes\nx,y\n",
         r"LOC\.csv: header must be 'ImageId,PredictionString', found 'id,boxes'"),
    ],
)
def test_unusable_sources_are_user_errors(tmp_path, layout, loc_text, message):
    root = tmp_path / "missing_root"
    if layout is not None:
        root = tmp_path
        (root / layout).mkdir(parents=True)
    csv_path = tmp_path / "LOC.csv"
    if loc_text:
        csv_path.write_text(loc_text)
    with pytest.raises(UserError, match=message):
        BackgroundsDataset(root, loc_csv=None if loc_text is None else csv_path)


def test_in9l_needs_its_own_training_folder(tmp_path):
    (tmp_path / "original/train/00_dog").mkdir(parents=True)
    with pytest.raises(UserError, match=r"in9l: training folder .*in9l/train is missing"):
        BackgroundsDataset(tmp_path, large=True)
