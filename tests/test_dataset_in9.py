"""The Backgrounds Challenge adapter on tiny trees in the real layouts, through the real pipeline.

Two downloads, as distributed: the test-set release (`bg_challenge/<variant>/val/<class>/`, masks
in `fg_mask/val`) and the training archives (`original/`, `in9l/`, `no_fg/`, each `train/` + `val/`).
Checks that train and val come from the training tree and the test splits from the release only
(no test image can reach the split that selects the checkpoint), split names, counts, labels from
the class folders, where masks and boxes land after the resize (fg_mask .npy/.png, no_fg-derived,
LOC boxes, in that order), per-record problems, and one-line errors for the layouts that mix them.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from cfrobust.datasets import in9
from cfrobust.datasets.in9 import CLASSES, IN9L_ARCHIVE, BackgroundsDataset
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
    """IN-9's training images, as original.tar.gz and no_fg.tar.gz unpack (plus fg_mask/train masks)."""
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


def val_object(label: int) -> np.ndarray:
    return shape(label, 1, label + 8, 12)


def release_object(label: int) -> np.ndarray:
    return shape(label + 1, 2, label + 10, 13)


TRAP = "00_dog/t0.png"  # a test image's name and bytes, placed in the training archive's val/ too


def write_training_val(root: Path) -> None:
    """original.tar.gz's val/ (uncleaned, no released masks: objects from no_fg.tar.gz's val/)."""
    for label, folder in enumerate(CLASSES):
        obj = val_object(label)
        write(root / "original/val" / folder / f"v{label}.png", picture(obj))
        blacked = picture(obj)
        blacked[obj] = 0
        write(root / "no_fg/val" / folder / f"v{label}.png", blacked)
    write(root / "original/val/zz_unknown/u.png", picture(shape(1, 1, 5, 5)))
    write(root / "original/val" / TRAP, picture(release_object(0)))


def write_release(release: Path) -> None:
    """bg_challenge/: the test sets only, each variant's val/, with the released .npy masks."""
    for label, folder in enumerate(CLASSES):
        obj = release_object(label)
        write(release / "original/val" / folder / f"t{label}.png", picture(obj))
        (release / "fg_mask/val" / folder).mkdir(parents=True)
        np.save(release / "fg_mask/val" / folder / f"t{label}.npy", obj.astype(np.uint8))
        for variant in EVAL:
            write(release / variant / "val" / folder / f"m{label}.JPEG", picture(obj))
        write(release / "only_bg_b/val" / folder / f"b{label}.JPEG", picture(obj))  # no split: no object


def write_in9l(root: Path) -> None:
    write(root / "in9l/train/00_dog/c.png", picture(shape(1, 1, 5, 5)))
    write(root / "in9l/train/06_musical instrument/n03467517_10026.png", picture(shape(2, 3, 19, 13)))
    write(root / "in9l/train/06_musical instrument/n03467517_99.png", picture(shape(1, 2, 3, 4)))
    write(root / "in9l/val/01_bird/w.png", picture(BIRD))


@dataclass(frozen=True)
class Trees:
    download: Path  # where the release archive was unpacked: it holds bg_challenge/
    release: Path  # download/bg_challenge
    training: Path  # where the training archives were unpacked
    loc: Path


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Trees:
    base = tmp_path_factory.mktemp("in9")
    download, training = base / "release", base / "training"
    write_release(download / "bg_challenge")
    write_train(training)
    write_training_val(training)
    write_in9l(training)
    (base / "LOC_train_solution.csv").write_text("\n".join(LOC_LINES) + "\n")
    return Trees(download, download / "bg_challenge", training, base / "LOC_train_solution.csv")


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
def in9_out(trees, tmp_path_factory):
    dataset = BackgroundsDataset(trees.release, loc_csv=trees.loc, train_root=trees.training)
    out = tmp_path_factory.mktemp("in9_shards")
    summaries = preprocess(dataset, out, ["tile"], size=SIZE, progress=False)
    return dataset, out, {s.split: s for s in summaries}


TEST_SPLITS = ["original", *EVAL]


def test_in9_splits_counts_and_classes(trees, in9_out):
    dataset, out, summaries = in9_out
    assert dataset.name == "in9"
    assert dataset.splits == ["train", "val", *TEST_SPLITS]  # no mixed_next or no_fg in this release
    assert [dataset.count(s) for s in dataset.splits] == [13, 11, 9, 9, 9, 9]
    assert [summaries[s].written for s in dataset.splits] == [12, 10, 9, 9, 9, 9]
    assert dataset.describe()["splits"] == {
        "train": str(trees.training / "original/train"),
        "val": str(trees.training / "original/val"),
        **{split: str(trees.release / split / "val") for split in TEST_SPLITS},
    }
    for split in dataset.splits:
        info = json.loads((out / split / "_info.json").read_text())
        assert info["classes"] == CLASSES
        assert info["num_samples"] == summaries[split].written
        assert info["source"]["dataset"] == "in9"
        assert (info["source"]["release"], info["source"]["train_root"]) == (str(trees.release), str(trees.training))
    groups = json.loads((out / "train" / "_info.json").read_text())["group_counts"]
    assert groups == {"00_dog": 2, "01_bird": 1, "02_wheeled vehicle": 1, "03_reptile": 2, "04_carnivore": 1,
                      "05_insect": 1, "06_musical instrument": 2, "07_primate": 1, "08_fish": 1}


def test_no_test_image_reaches_the_selection_split(trees, in9_out):
    """The split that picks best.pt is val, and every val sample is a file of the training tree,
    even the one whose name and bytes are those of a test image; no test split reads that tree."""
    from cfrobust.trainer.train import selection_split_of

    _, out, _ = in9_out
    assert selection_split_of(out) == "val"
    val = read_split(out / "val")
    val_sources = {s["meta"]["source"] for s in val.values()}
    assert val_sources == {str(trees.training / "original/val" / CLASSES[i] / f"v{i}.png") for i in range(9)} | {
        str(trees.training / "original/val" / TRAP)}
    test_sources = {s["meta"]["source"] for split in TEST_SPLITS for s in read_split(out / split).values()}
    assert len(test_sources) == 36
    assert all(Path(source).is_relative_to(trees.release) for source in test_sources)
    assert (trees.release / "original/val" / TRAP).read_bytes() == (trees.training / "original/val" / TRAP).read_bytes()
    assert str(trees.release / "original/val" / TRAP) in test_sources
    assert not val_sources & test_sources
    # Nor does the test image's released mask reach its namesake in val: that one has no object.
    trap = val[in9.safe_key(f"original/val/{TRAP}")]
    assert (trap["meta"]["attrs"]["location"], trap["meta"]["boxes"], trap["mask"]) == ("none", [], None)


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


def test_in9_val_objects_come_from_the_training_trees_no_fg(in9_out):
    _, out, _ = in9_out
    val = read_split(out / "val")
    for label, folder in enumerate(CLASSES):
        sample = val[in9.safe_key(f"original/val/{folder}/v{label}")]
        assert (sample["meta"]["split"], sample["meta"]["attrs"]["location"]) == ("val", "no_fg")
        assert np.array_equal(sample["mask"], nearest(val_object(label)))
        assert_boxes(sample["meta"]["boxes"], [stored(extent(val_object(label)))])


def test_in9_original_test_split_uses_the_released_npy_masks(in9_out):
    _, out, _ = in9_out
    original = read_split(out / "original")
    assert sorted(original) == sorted(in9.safe_key(f"original/val/{c}/t{i}") for i, c in enumerate(CLASSES))
    for label, folder in enumerate(CLASSES):
        sample = original[in9.safe_key(f"original/val/{folder}/t{label}")]
        assert (sample["meta"]["split"], sample["meta"]["attrs"]["location"]) == ("original", "fg_mask")
        assert np.array_equal(sample["mask"], nearest(release_object(label)))
        assert_boxes(sample["meta"]["boxes"], [stored(extent(release_object(label)))])


def test_in9_problems_are_reported_with_their_file(trees, in9_out):
    _, _, summaries = in9_out
    (train_problem,) = summaries["train"].skipped
    image = trees.training / "original/train/08_fish/n01443537_9.png"
    assert train_problem == {
        "key": train_key(8, "n01443537_9.png"),
        "source": str(image),
        "reason": f"no_fg file {trees.training / 'no_fg/train/08_fish/n01443537_9.png'} is 21x14, image is 20x14",
    }
    (val_problem,) = summaries["val"].skipped
    assert val_problem["source"] == str(trees.training / "original/val/zz_unknown/u.png")
    assert val_problem["reason"] == "class folder 'zz_unknown' is not one of the 9 IN-9 classes"
    for split in TEST_SPLITS:
        assert summaries[split].skipped == []


def test_in9_notes_val_images_named_like_test_images(trees, in9_out):
    dataset, _, _ = in9_out
    assert dataset.notes() == [
        f"val ({trees.training / 'original/val'}): 1 of 11 images are named like a test image of the same class in "
        f"{trees.release / 'original/val'} (00_dog/t0.png); val keeps them, as the official code does"
    ]


def test_in9_strict_stops_at_the_first_problem(trees, tmp_path):
    dataset = BackgroundsDataset(trees.release, train_root=trees.training)
    with pytest.raises(UserError, match=r"no_fg/train/08_fish/n01443537_9\.png is 21x14, image is 20x14"):
        preprocess(dataset, tmp_path / "out", ["tile"], size=SIZE, strict=True, progress=False)


def test_in9_without_loc_file_leaves_loc_images_unlocated(trees):
    dataset = BackgroundsDataset(trees.release, train_root=trees.training)
    records = {r.attrs["file"]: r for r in dataset.records("train")}
    instrument = records["original/train/06_musical instrument/n03467517_10026.png"]
    assert (instrument.boxes, instrument.mask, instrument.attrs["location"]) == ([], None, "none")
    assert records["original/train/00_dog/n02085620_1.png"].attrs["location"] == "fg_mask"


def test_evaluation_variants_decode_nothing(trees, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an evaluation split decoded a file")

    monkeypatch.setattr(in9, "read_color", refuse)
    monkeypatch.setattr(in9.np, "load", refuse)
    dataset = BackgroundsDataset(trees.release, loc_csv=trees.loc, train_root=trees.training)
    records = list(dataset.records("mixed_rand"))
    assert [r.label for r in records] == list(range(9))
    assert all(r.boxes == [] and r.mask is None and not r.problem for r in records)
    assert records[2].image == str(trees.release / "mixed_rand/val/02_wheeled vehicle/m2.JPEG")


def test_root_may_be_the_folder_the_release_was_unpacked_in(trees):
    """`--root DIR` where DIR holds bg_challenge/ reads the release from DIR/bg_challenge."""
    by_folder = BackgroundsDataset(trees.download, train_root=trees.training)
    by_release = BackgroundsDataset(trees.release, train_root=trees.training)
    assert by_folder.release == trees.release
    assert by_folder.splits == by_release.splits == ["train", "val", *TEST_SPLITS]
    assert by_folder.describe()["splits"] == by_release.describe()["splits"]


def test_the_layout_cfrobust_fetch_leaves_needs_only_root(tmp_path):
    """Every archive unpacked into one folder, as is: bg_challenge/ beside original/ and no_fg/."""
    write(tmp_path / "bg_challenge/original/val/03_reptile/t.png", picture(REPTILE_A))
    write(tmp_path / "bg_challenge/mixed_rand/val/03_reptile/t.png", picture(REPTILE_A))
    write(tmp_path / "original/train/03_reptile/a.png", picture(REPTILE_A))
    write(tmp_path / "original/val/03_reptile/t.png", picture(REPTILE_B))  # the uncleaned val, same name
    write(tmp_path / "no_fg/val/03_reptile/t.png", picture(REPTILE_B))
    dataset = BackgroundsDataset(tmp_path)
    assert dataset.describe()["splits"] == {
        "train": str(tmp_path / "original/train"),
        "val": str(tmp_path / "original/val"),
        "original": str(tmp_path / "bg_challenge/original/val"),
        "mixed_rand": str(tmp_path / "bg_challenge/mixed_rand/val"),
    }
    (val,) = dataset.records("val")
    (test,) = dataset.records("original")
    assert (val.image, test.image) == (str(tmp_path / "original/val/03_reptile/t.png"),
                                       str(tmp_path / "bg_challenge/original/val/03_reptile/t.png"))


def test_in9l_splits_loc_boxes_and_bad_loc_line(trees, tmp_path):
    dataset = BackgroundsDataset(trees.release, large=True, loc_csv=trees.loc, train_root=trees.training)
    assert dataset.name == "in9l"
    assert dataset.splits == ["train", "val", *TEST_SPLITS]
    assert [dataset.count(s) for s in dataset.splits] == [3, 1, 9, 9, 9, 9]
    assert dataset.describe()["splits"]["val"] == str(trees.training / "in9l/val")
    assert dataset.describe()["splits"]["original"] == str(trees.release / "original/val")
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
    assert problem["source"] == f"{trees.loc}:7"
    assert problem["reason"].startswith("image id n03467517_99: PredictionString 'n03467517 1 2 3' has 4 fields")
    (val,) = read_split(out / "val").values()
    assert val["meta"]["source"] == str(trees.training / "in9l/val/01_bird/w.png")
    original = read_split(out / "original")
    assert original["original_val_00_dog_t0"]["meta"]["attrs"]["location"] == "fg_mask"
    assert dataset.notes() == []


def test_in9l_single_root_of_release_and_in9l_archive_still_works(tmp_path):
    """The old one-folder layout was right for IN-9L when only in9l.tar.gz was unpacked into the
    release: in9l/ exists in the training archive alone, so val and the test sets stay apart."""
    write(tmp_path / "original/val/01_bird/t.png", picture(BIRD))
    write(tmp_path / "mixed_same/val/01_bird/t.png", picture(BIRD))
    write(tmp_path / "in9l/train/01_bird/a.png", picture(BIRD))
    write(tmp_path / "in9l/val/01_bird/b.png", picture(BIRD))
    # The release's test masks and no_fg test images, named like the val image: not its object.
    (tmp_path / "fg_mask/val/01_bird").mkdir(parents=True)
    np.save(tmp_path / "fg_mask/val/01_bird/b.npy", BIRD.astype(np.uint8))
    blacked = picture(BIRD)
    blacked[BIRD] = 0
    write(tmp_path / "no_fg/val/01_bird/b.png", blacked)
    dataset = BackgroundsDataset(tmp_path, large=True)
    assert dataset.describe()["splits"] == {
        "train": str(tmp_path / "in9l/train"),
        "val": str(tmp_path / "in9l/val"),
        "original": str(tmp_path / "original/val"),
        "mixed_same": str(tmp_path / "mixed_same/val"),
        "no_fg": str(tmp_path / "no_fg/val"),
    }
    (val,) = dataset.records("val")
    assert (val.image, val.attrs["location"], val.boxes, val.mask) == (str(tmp_path / "in9l/val/01_bird/b.png"),
                                                                       "none", [], None)


def test_no_fg_split_is_listed_when_its_val_folder_exists(tmp_path):
    write(tmp_path / "training/original/train/00_dog/a.png", picture(DOG_A))
    write(tmp_path / "bg_challenge/no_fg/val/03_reptile/b.png", picture(REPTILE_A))
    write(tmp_path / "bg_challenge/mixed_next/val/03_reptile/b.png", picture(REPTILE_A))
    dataset = BackgroundsDataset(tmp_path / "bg_challenge", train_root=tmp_path / "training")
    assert dataset.splits == ["train", "mixed_next", "no_fg"]
    (record,) = dataset.records("no_fg")
    assert (record.key, record.label, record.group) == ("no_fg_val_03_reptile_b", 3, "03_reptile")


# --- layouts that mix the two trees, and missing pieces: one line each --------------------------

MIXED_HOW = ("whose own val/ is unpacked into the same folder; give the release's bg_challenge folder as --root "
             "and the training archives' folder as --train-root")
OWN_FOLDER = "unpack the training archives into a folder of their own and give it as --train-root"


def old_single_root(root: Path) -> Path:
    """The old layout: original.tar.gz unpacked into the release's bg_challenge folder."""
    write(root / "original/val/00_dog/t.png", picture(DOG_A))  # a test image ...
    write(root / "original/val/00_dog/v.png", picture(DOG_A))  # ... and the archive's val image, one folder
    (root / "fg_mask/val/00_dog").mkdir(parents=True)
    np.save(root / "fg_mask/val/00_dog/t.npy", DOG_A.astype(np.uint8))
    write(root / "mixed_rand/val/00_dog/t.png", picture(DOG_A))
    write(root / "original/train/00_dog/a.png", picture(DOG_A))
    return root


def test_old_single_root_layout_is_refused(tmp_path):
    root = old_single_root(tmp_path / "bg_challenge")
    expected = (f"in9: {root}/original/val cannot be a test set: {root}/original/train beside it comes from the "
                f"training archive original.tar.gz, {MIXED_HOW}")
    for train_root in (None, root):  # the old command, and the same folder named twice
        with pytest.raises(UserError) as caught:
            BackgroundsDataset(root, train_root=train_root)
        assert str(caught.value) == expected


def test_old_single_root_as_train_root_is_refused(tmp_path):
    """Its original/val still holds the test images; the release's masks beside it give it away."""
    old = old_single_root(tmp_path / "old")
    write(tmp_path / "bg_challenge/original/val/00_dog/t.png", picture(DOG_A))  # a clean copy of the release
    with pytest.raises(UserError) as caught:
        BackgroundsDataset(tmp_path / "bg_challenge", train_root=old)
    assert str(caught.value) == (f"in9: {old}/original/val cannot be the validation split: {old}/fg_mask/val, the "
                                 f"release's test masks, is there too; {OWN_FOLDER}")


def test_val_that_is_the_release_folder_is_refused(tmp_path):
    release, training = tmp_path / "bg_challenge", tmp_path / "training"
    write(release / "original/val/00_dog/t.png", picture(DOG_A))
    write(training / "original/train/00_dog/a.png", picture(DOG_A))
    (training / "original/val").symlink_to(release / "original/val", target_is_directory=True)
    with pytest.raises(UserError) as caught:
        BackgroundsDataset(release, train_root=training)
    assert str(caught.value) == (f"in9: {training}/original/val cannot be the validation split: it is the release's "
                                 f"test folder; {OWN_FOLDER}")


def test_a_training_archive_of_a_test_variant_inside_the_release_is_refused(tmp_path):
    """no_fg.tar.gz unpacked into the release merges its val/ into the release's no_fg/val."""
    write(tmp_path / "original/val/00_dog/t.png", picture(DOG_A))
    write(tmp_path / "no_fg/val/00_dog/t.png", picture(DOG_A))
    write(tmp_path / "no_fg/train/00_dog/a.png", picture(DOG_A))
    write(tmp_path / "in9l/train/00_dog/a.png", picture(DOG_A))
    with pytest.raises(UserError) as caught:
        BackgroundsDataset(tmp_path, large=True)
    assert str(caught.value) == (f"in9l: {tmp_path}/no_fg/val cannot be a test set: {tmp_path}/no_fg/train beside it "
                                 f"comes from the training archive no_fg.tar.gz, {MIXED_HOW}")


def test_release_alone_says_which_archives_to_get(tmp_path):
    """What `cfrobust fetch in9` used to leave: the test sets and nothing to train on."""
    write(tmp_path / "bg_challenge/original/val/00_dog/t.png", picture(DOG_A))
    with pytest.raises(UserError) as caught:
        BackgroundsDataset(tmp_path)
    assert str(caught.value) == (
        f"in9: training folder {tmp_path}/original/train is missing (the release holds only the test sets): "
        f"`cfrobust fetch in9 --to DIR` downloads original.tar.gz and no_fg.tar.gz beside the release "
        f"(then --root DIR), or unpack them into a folder given as --train-root")
    with pytest.raises(UserError) as caught:
        BackgroundsDataset(tmp_path, large=True)
    assert str(caught.value) == (
        f"in9l: training folder {tmp_path}/in9l/train is missing (the release holds only the test sets): "
        f"download {IN9L_ARCHIVE} and unpack it into {tmp_path} (or a folder given as --train-root)")
    assert IN9L_ARCHIVE == "https://www.dropbox.com/s/8w29bg9niya19rn/in9l.tar.gz?dl=1"


def test_training_archives_alone_have_no_test_set(tmp_path):
    write(tmp_path / "in9l/train/00_dog/a.png", picture(DOG_A))
    write(tmp_path / "in9l/val/00_dog/b.png", picture(DOG_A))
    with pytest.raises(UserError) as caught:
        BackgroundsDataset(tmp_path, large=True)
    assert str(caught.value) == (
        f"in9l: no test set in {tmp_path} (none of original/val, mixed_same/val, mixed_rand/val, mixed_next/val, "
        f"only_fg/val, no_fg/val); --root takes the release's bg_challenge folder or the folder holding it")


@pytest.mark.parametrize(
    "layout, train_root, loc_text, message",
    [
        (None, None, None, r"in9 root .*missing_root does not exist"),
        ("bg_challenge/original/val/00_dog", "nowhere", None, r"in9 --train-root .*nowhere does not exist"),
        ("original/train/00_dog", None, "", r"LOC box file .*LOC\.csv does not exist"),
        ("original/train/00_dog", None, "id,boxes\nx,y\n",
         r"LOC\.csv: header must be 'ImageId,PredictionString', found 'id,boxes'"),
    ],
)
def test_unusable_sources_are_user_errors(tmp_path, layout, train_root, loc_text, message):
    root = tmp_path / "missing_root"
    if layout is not None:
        root = tmp_path
        (root / layout).mkdir(parents=True)
    csv_path = tmp_path / "LOC.csv"
    if loc_text:
        csv_path.write_text(loc_text)
    with pytest.raises(UserError, match=message):
        BackgroundsDataset(root, loc_csv=None if loc_text is None else csv_path,
                           train_root=None if train_root is None else tmp_path / train_root)


def test_cli_takes_train_root_and_refuses_it_elsewhere(trees, tmp_path):
    from click.testing import CliRunner

    from cfrobust.cli.main import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", "--dataset", "in9", "--root", str(trees.download),
                                      "--train-root", str(trees.training), "--out", str(out), "--size", str(SIZE)])
    assert result.exit_code == 0, result.output
    assert "     val: 10 samples written, 1 skipped" in result.output
    assert "original: 9 samples written, 0 skipped" in result.output
    assert f"note: val ({trees.training / 'original/val'}): 1 of 11 images" in result.output
    val = json.loads((out / "val" / "_info.json").read_text())
    assert val["source"]["splits"]["val"] == str(trees.training / "original/val")
    # The old command, on the release alone, stops at once with the one line that says what to get.
    old = CliRunner().invoke(cli, ["preprocess", "--dataset", "in9", "--root", str(trees.release),
                                   "--out", str(tmp_path / "old")])
    assert old.exit_code == 1
    assert old.output == (f"Error: in9: training folder {trees.release}/original/train is missing (the release holds "
                          f"only the test sets): `cfrobust fetch in9 --to DIR` downloads original.tar.gz and "
                          f"no_fg.tar.gz beside the release (then --root DIR), or unpack them into a folder given as "
                          f"--train-root\n")
    stray = CliRunner().invoke(cli, ["preprocess", "--dataset", "cct", "--root", str(tmp_path),
                                     "--train-root", str(tmp_path), "--out", str(tmp_path / "cct")])
    assert stray.exit_code == 2 and "--train-root does not apply to --dataset cct" in stray.output
