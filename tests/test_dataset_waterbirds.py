"""The Waterbirds adapter on tiny trees in the release's exact format, run through the real pipeline.

Images are 24x16 (non-square) and stored at 16x16, so x scales by 2/3 and y by 1.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.cli.preprocess import preprocess as preprocess_command
from cfrobust.datasets.waterbirds import SEG_RULES, WaterbirdsDataset, group_of, segmentation_folder_candidates
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import iter_samples
from cfrobust.shards.schema import decode_gray

WIDTH, HEIGHT, SIZE = 24, 16, 16
HEADER = "img_id,img_filename,y,split,place,place_filename"
# A bright bird on dark backgrounds: JPEG keeps luma at full resolution (chroma is subsampled).
LAND_BGR, WATER_BGR, BIRD_BGR = (30, 80, 40), (90, 40, 20), (200, 235, 245)
ALBATROSS = "001.Black_footed_Albatross"
GOLDFINCH = "047.American_Goldfinch"
NUTHATCH = "094.White_breasted_Nuthatch"


@dataclass
class Bird:
    img_id: int
    filename: str
    y: int
    split: int
    place: int
    blob: tuple[int, int, int, int]  # painted pixels: columns c0..c1-1, rows r0..r1-1
    stored_box: tuple[float, float, float, float]  # the blob's box at 16x16, worked out by hand
    seg_value: int = 255


# stored x = column * 16/24: e.g. columns 6..14 -> x0 = 6, x1 = 15 -> 4.0, 10.0; rows unchanged.
BIRDS = [
    Bird(1, f"{ALBATROSS}/Black_Footed_Albatross_0046_18.jpg", 1, 0, 1, (6, 2, 15, 9), (4.0, 2.0, 10.0, 9.0)),
    Bird(2, f"{GOLDFINCH}/American_Goldfinch_0001_32910.jpg", 0, 0, 0, (3, 5, 12, 14), (2.0, 5.0, 8.0, 14.0)),
    Bird(3, f"{NUTHATCH}/White_Breasted_Nuthatch_0002_86880.jpg", 0, 0, 1, (0, 0, 9, 6), (0.0, 0.0, 6.0, 6.0)),
    Bird(4, f"{ALBATROSS}/Black_Footed_Albatross_0009_34.jpg", 1, 1, 0, (12, 8, 24, 16), (8.0, 8.0, 16.0, 16.0)),
    Bird(5, f"{GOLDFINCH}/American_Goldfinch_0004_32177.jpg", 0, 2, 0, (9, 3, 18, 12), (6.0, 3.0, 12.0, 12.0), 128),
    Bird(6, f"{ALBATROSS}/Black_Footed_Albatross_0014_89.jpg", 1, 2, 1, (15, 1, 21, 4), (10.0, 1.0, 14.0, 4.0)),
]
GREY_SEGMENTATION = BIRDS[4]  # its mask holds 128, not 255


def place_filename(place: int) -> str:
    return "/o/ocean/00002178.jpg" if place else "/b/bamboo_forest/00000042.jpg"


def metadata_line(bird: Bird) -> str:
    return f"{bird.img_id},{bird.filename},{bird.y},{bird.split},{bird.place},{place_filename(bird.place)}"


def bird_key(bird: Bird) -> str:
    return bird.filename.removesuffix(".jpg").replace(".", "_").replace("/", "_")


def write_images(root: Path, birds: list[Bird]) -> None:
    for bird in birds:
        image = np.full((HEIGHT, WIDTH, 3), WATER_BGR if bird.place else LAND_BGR, np.uint8)
        c0, r0, c1, r1 = bird.blob
        image[r0:r1, c0:c1] = BIRD_BGR
        path = root / bird.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), image)


def write_segmentations(folder: Path, birds: list[Bird]) -> None:
    """CUB layout: <folder>/segmentations/<class folder>/<name>.png, object = non-zero grey."""
    (folder / "segmentations").mkdir(parents=True, exist_ok=True)
    for bird in birds:
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        c0, r0, c1, r1 = bird.blob
        mask[r0:r1, c0:c1] = bird.seg_value
        path = folder / "segmentations" / bird.filename.replace(".jpg", ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), mask)


def write_waterbirds(root: Path, birds=BIRDS, extra_lines=(), segmentations=True) -> Path:
    """A Waterbirds release: metadata.csv (header on line 1, bird i on line i + 2) + CUB-tree images."""
    root.mkdir(parents=True, exist_ok=True)
    write_images(root, birds)
    if segmentations:
        write_segmentations(root, birds)
    lines = [HEADER] + [metadata_line(b) for b in birds] + list(extra_lines)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def read_split(out: Path, split: str) -> dict[str, dict]:
    """Every sample of a split: iter_samples' fields plus the stored mask and the raw json."""
    paths = sorted((out / split).glob("*.tar"))
    samples = {s["key"]: s for s in iter_samples(paths, ["tile"])}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext == "mask.png":
                    samples[key]["mask"] = decode_gray(data)
                elif ext == "json":
                    samples[key]["meta"] = json.loads(data)
    return samples


def info(out: Path, split: str) -> dict:
    return json.loads((out / split / "_info.json").read_text())


def expected_stored_mask(box) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_group_names():
    assert [group_of(y, p) for y in (0, 1) for p in (0, 1)] == [
        "landbird/land",
        "landbird/water",
        "waterbird/land",
        "waterbird/water",
    ]


def test_segmentations_give_splits_groups_labels_and_mask_boxes(tmp_path):
    root = write_waterbirds(tmp_path / "wb")
    dataset = WaterbirdsDataset(root)
    assert dataset.name == "waterbirds"
    assert dataset.classes == ["landbird", "waterbird"]
    assert dataset.splits == ["train", "val", "test"]
    assert [dataset.count(s) for s in dataset.splits] == [3, 1, 2]
    assert dataset.describe() == {"dataset": "waterbirds", "root": str(root), "boxes": "segmentation", "cub_root": None,
                                  "segmentations": [str(root / "segmentations")], "seg_rule": "nonzero"}

    out = tmp_path / "out"
    summaries = preprocess(dataset, out, ["tile"], size=SIZE, progress=False)
    assert [(s.split, s.written, s.skipped) for s in summaries] == [("train", 3, []), ("val", 1, []), ("test", 2, [])]
    assert info(out, "train")["classes"] == ["landbird", "waterbird"]
    assert info(out, "train")["group_counts"] == {"landbird/land": 1, "landbird/water": 1, "waterbird/water": 1}
    assert info(out, "val")["group_counts"] == {"waterbird/land": 1}
    assert info(out, "test")["group_counts"] == {"landbird/land": 1, "waterbird/water": 1}
    assert info(out, "test")["aligned_groups"] == ["landbird/land", "waterbird/water"]

    for split_id, split in enumerate(dataset.splits):
        samples = read_split(out, split)
        birds = [b for b in BIRDS if b.split == split_id]
        assert sorted(samples) == sorted(bird_key(b) for b in birds)
        for bird in birds:
            sample = samples[bird_key(bird)]
            assert sample["label"] == bird.y
            assert sample["group"] == group_of(bird.y, bird.place)
            assert len(sample["boxes"]) == 1
            assert sample["boxes"][0] == pytest.approx(bird.stored_box, abs=1e-3)
            assert sample["meta"]["attrs"] == {
                "place": ["land", "water"][bird.place],
                "place_filename": place_filename(bird.place),
                "img_id": bird.img_id,
            }
            assert sample["meta"]["source"] == f"{root / 'metadata.csv'}:{bird.img_id + 1}"
            # The stored mask covers exactly the resized blob, and the blob's colour is under it.
            assert set(np.unique(sample["mask"])) == {0, 255}
            stored = expected_stored_mask(bird.stored_box)
            assert np.array_equal(sample["mask"] > 0, stored)
            bird_rgb = np.array(BIRD_BGR[::-1], float)
            place_rgb = np.array((WATER_BGR if bird.place else LAND_BGR)[::-1], float)
            inside = sample["image"][stored].mean(axis=0)
            outside = sample["image"][~stored].mean(axis=0)
            assert np.linalg.norm(inside - bird_rgb) < np.linalg.norm(inside - place_rgb) / 2
            assert np.linalg.norm(outside - place_rgb) < np.linalg.norm(outside - bird_rgb) / 2


def test_grey_level_segmentation_counts_as_object(tmp_path):
    """By default, as the official code (any nonzero pixel; see datasets/waterbirds.py)."""
    bird = GREY_SEGMENTATION
    root = write_waterbirds(tmp_path / "wb", birds=[bird])
    seg = cv2.imread(str(root / "segmentations" / bird.filename.replace(".jpg", ".png")), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(seg)) == {0, 128}
    out = tmp_path / "out"
    preprocess(WaterbirdsDataset(root), out, ["tile"], size=SIZE, progress=False)
    (sample,) = read_split(out, "test").values()
    assert sample["boxes"] == [pytest.approx([6.0, 3.0, 12.0, 12.0], abs=1e-3)]
    assert np.array_equal(sample["mask"] > 0, expected_stored_mask((6, 3, 12, 12)))


def test_records_are_sorted_by_image_path_whatever_the_csv_order(tmp_path):
    root = write_waterbirds(tmp_path / "wb", birds=BIRDS[::-1])
    keys = [r.key for r in WaterbirdsDataset(root).records("train")]
    assert keys == sorted(bird_key(b) for b in BIRDS if b.split == 0)
    assert keys[0] == "001_Black_footed_Albatross_Black_Footed_Albatross_0046_18"


def test_columns_by_name_with_a_pandas_index_column(tmp_path):
    root = write_waterbirds(tmp_path / "wb", birds=BIRDS[:2])
    lines = [",place_filename,split,y,img_filename,place,img_id"]
    for index, b in enumerate(BIRDS[:2]):
        lines.append(f"{index},{place_filename(b.place)},{b.split},{b.y},{b.filename},{b.place},{b.img_id}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    records = list(WaterbirdsDataset(root).records("train"))
    assert [(r.key, r.label, r.group, r.attrs["img_id"]) for r in records] == [
        (bird_key(BIRDS[0]), 1, "waterbird/water", 1),
        (bird_key(BIRDS[1]), 0, "landbird/land", 2),
    ]
    assert records[0].mask == root / "segmentations" / BIRDS[0].filename.replace(".jpg", ".png")
    assert records[0].boxes == [] and not records[0].problem


def test_segmentations_under_cub_root_and_root_first(tmp_path):
    birds = BIRDS[:2]
    root = write_waterbirds(tmp_path / "wb", birds=birds, segmentations=False)
    cub = tmp_path / "CUB_200_2011"
    write_segmentations(cub, birds)
    # Bird 0 also has a smaller mask under root: the one under root must win.
    write_segmentations(root, [replace(birds[0], blob=(0, 0, 3, 3))])
    out = tmp_path / "out"
    summaries = preprocess(WaterbirdsDataset(root, cub_root=cub), out, ["tile"], size=SIZE, progress=False)
    assert summaries[0].written == 2 and summaries[0].skipped == []
    samples = read_split(out, "train")
    assert samples[bird_key(birds[0])]["boxes"] == [pytest.approx([0.0, 0.0, 2.0, 3.0], abs=1e-3)]
    assert samples[bird_key(birds[1])]["boxes"] == [pytest.approx(birds[1].stored_box, abs=1e-3)]


def test_missing_segmentation_is_reported_with_its_line(tmp_path):
    root = write_waterbirds(tmp_path / "wb", birds=BIRDS[:2], segmentations=False)
    cub = tmp_path / "cub"
    write_segmentations(cub, [])  # an empty cub/segmentations/: searched, and named in the reason
    write_segmentations(root, [BIRDS[1]])
    summaries = preprocess(WaterbirdsDataset(root, cub_root=cub), tmp_path / "out", ["tile"], size=SIZE, progress=False)
    seg = Path("segmentations", BIRDS[0].filename.replace(".jpg", ".png"))
    assert summaries[0].written == 1
    assert summaries[0].skipped == [
        {
            "key": bird_key(BIRDS[0]),
            "source": f"{root / 'metadata.csv'}:2",
            "reason": f"no segmentation {root / seg} or {cub / seg}",
        }
    ]


def write_cub(cub: Path, images_lines, box_lines) -> Path:
    cub.mkdir(parents=True, exist_ok=True)
    (cub / "images.txt").write_text("".join(f"{line}\n" for line in images_lines))
    (cub / "bounding_boxes.txt").write_text("".join(f"{line}\n" for line in box_lines))
    return cub


def test_cub_boxes_are_matched_by_path_not_by_id(tmp_path):
    root = write_waterbirds(tmp_path / "wb", segmentations=False)
    # CUB ids deliberately unlike img_id (and listed in another order): only the path links them.
    cub_ids = {b.filename: 700 - 100 * b.img_id for b in BIRDS}  # 600, 500, ..., 100
    images = [f"{cub_ids[b.filename]} {b.filename}" for b in BIRDS[::-1]] + ["999 200.Common_Yellowthroat/x.jpg"]
    boxes = [f"{cub_ids[b.filename]} {b.blob[0]}.0 {b.blob[1]}.0 {b.blob[2] - b.blob[0]}.0 {b.blob[3] - b.blob[1]}.0"
             for b in BIRDS[:5]]
    boxes.append(f"{cub_ids[BIRDS[5].filename]} 15.75 1.5 4.5 2.25")  # -> (15.75, 1.5, 20.25, 3.75)
    boxes.append("999 1.0 1.0 2.0 2.0")
    cub = write_cub(tmp_path / "CUB_200_2011", images, boxes)
    dataset = WaterbirdsDataset(root, boxes="cub", cub_root=cub)
    record = next(dataset.records("val"))
    assert record.boxes == [(12.0, 8.0, 24.0, 16.0)] and record.mask is None

    out = tmp_path / "out"
    summaries = preprocess(dataset, out, ["tile"], size=SIZE, progress=False)
    assert [(s.written, s.skipped) for s in summaries] == [(3, []), (1, []), (2, [])]
    stored = {bird_key(b): b.stored_box for b in BIRDS[:5]}
    stored[bird_key(BIRDS[5])] = (10.5, 1.5, 13.5, 3.75)  # 15.75*2/3, 1.5, 20.25*2/3, 3.75
    for split in dataset.splits:
        for key, sample in read_split(out, split).items():
            assert sample["boxes"] == [pytest.approx(stored[key], abs=1e-3)]
            assert "mask" not in sample
    assert info(out, "train")["source"]["boxes"] == "cub"


def test_cub_box_problems_are_reported_per_record(tmp_path):
    root = write_waterbirds(tmp_path / "wb", birds=BIRDS[:4], segmentations=False)
    images = [f"10 {BIRDS[0].filename}", f"11 {BIRDS[1].filename}", "not-a-line", f"12 {BIRDS[3].filename}"]
    boxes = ["10 6.0 2.0 9.0 7.0", "11 3.0 oops 9.0 9.0"]  # id 12 has no box line
    cub = write_cub(tmp_path / "cub", images, boxes)
    summaries = preprocess(WaterbirdsDataset(root, boxes="cub", cub_root=cub), tmp_path / "out", ["tile"],
                           size=SIZE, progress=False)
    metadata = root / "metadata.csv"
    skipped = {s["key"]: (s["source"], s["reason"]) for s in summaries[0].skipped + summaries[1].skipped}
    assert [s.written for s in summaries] == [1, 0, 0]
    assert skipped == {
        bird_key(BIRDS[1]): (f"{metadata}:3", f"{cub / 'bounding_boxes.txt'}:2: malformed line '11 3.0 oops 9.0 9.0'"),
        bird_key(BIRDS[2]): (
            f"{metadata}:4",
            f"{BIRDS[2].filename} is not in CUB images.txt (malformed line(s) there: images.txt:3)",
        ),
        bird_key(BIRDS[3]): (f"{metadata}:5", f"image id 12 has no line in {cub / 'bounding_boxes.txt'}"),
    }


@pytest.mark.parametrize(
    "options, message",
    [
        ({"boxes": "cub"}, "--boxes cub needs --cub-root"),
        ({"boxes": "segmentations"}, "boxes must be one of segmentation, cub, got 'segmentations'"),
        ({"boxes": "cub", "cub_root": "nope"}, "CUB root .*nope is not a directory"),
        ({"seg_rule": "half"}, "seg_rule must be one of nonzero, all255, got 'half'"),
        ({"boxes": "cub", "cub_root": "wb", "seg_rule": "all255"},
         "--seg-rule chooses segmentation pixels; it does not apply to --boxes cub"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, options, message):
    root = write_waterbirds(tmp_path / "wb", birds=BIRDS[:1])
    if "cub_root" in options:
        options = {**options, "cub_root": tmp_path / options["cub_root"]}
    with pytest.raises(UserError, match=message):
        WaterbirdsDataset(root, **options)


@pytest.mark.parametrize("missing", ["images.txt", "bounding_boxes.txt"])
def test_missing_cub_file_is_a_user_error_naming_it(tmp_path, missing):
    root = write_waterbirds(tmp_path / "wb", birds=BIRDS[:1])
    cub = write_cub(tmp_path / "cub", [f"1 {BIRDS[0].filename}"], ["1 1 1 2 2"])
    (cub / missing).unlink()
    with pytest.raises(UserError, match=f"CUB file .*{missing} not found"):
        WaterbirdsDataset(root, boxes="cub", cub_root=cub)


def test_missing_root_metadata_and_columns_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="waterbirds root .*absent is not a directory"):
        WaterbirdsDataset(tmp_path / "absent")
    root = tmp_path / "wb"
    root.mkdir()
    with pytest.raises(UserError, match=r"metadata .*metadata\.csv not found"):
        WaterbirdsDataset(root)
    (root / "metadata.csv").write_text("")
    with pytest.raises(UserError, match=r"metadata\.csv is empty"):
        WaterbirdsDataset(root)
    (root / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a/b.jpg,0,0\n")
    with pytest.raises(UserError, match=r"metadata\.csv: header lacks column\(s\) place, place_filename"):
        WaterbirdsDataset(root)


BAD_LINES = [  # lines 8..12 of metadata.csv, after the six good birds
    f"7,{NUTHATCH}/White_Breasted_Nuthatch_0005_1.jpg,2,0,0,/b/bamboo_forest/1.jpg",
    f"8,{NUTHATCH}/White_Breasted_Nuthatch_0006_2.jpg,0,1,x,/b/bamboo_forest/2.jpg",
    f"9,{NUTHATCH}/White_Breasted_Nuthatch_0007_3.jpg,0,3,0,/b/bamboo_forest/3.jpg",
    f"10,{NUTHATCH}/White_Breasted_Nuthatch_0008_4.jpg,0,2",
    f"11,{BIRDS[0].filename},1,2,1,/o/ocean/4.jpg",
]


def test_each_bad_metadata_line_is_reported_with_its_line(tmp_path):
    root = write_waterbirds(tmp_path / "wb", extra_lines=BAD_LINES)
    dataset = WaterbirdsDataset(root)
    # Lines whose split is unknown (bad split value, wrong field count) are reported with train.
    assert [dataset.count(s) for s in dataset.splits] == [3 + 3, 1 + 1, 2 + 1]
    summaries = preprocess(dataset, tmp_path / "out", ["tile"], size=SIZE, progress=False)
    assert [s.written for s in summaries] == [3, 1, 2]
    metadata = root / "metadata.csv"
    reported = {item["source"]: (summary.split, item["reason"]) for summary in summaries for item in summary.skipped}
    assert reported == {
        f"{metadata}:8": ("train", "y '2' is not 0 or 1"),
        f"{metadata}:9": ("val", "place 'x' is not 0 or 1"),
        f"{metadata}:10": ("train", "split '3' is not 0, 1 or 2"),
        f"{metadata}:11": ("train", "malformed line: 4 fields, the header has 6"),
        f"{metadata}:12": ("test", f"duplicate img_filename {BIRDS[0].filename} (first at metadata.csv:2)"),
    }


def test_strict_raises_on_the_first_bad_line(tmp_path):
    root = write_waterbirds(tmp_path / "wb", extra_lines=BAD_LINES[3:4])
    with pytest.raises(UserError, match=r"metadata\.csv:8\): malformed line: 4 fields, the header has 6"):
        preprocess(WaterbirdsDataset(root), tmp_path / "out", ["tile"], size=SIZE, strict=True, progress=False)


# --- The three downloads side by side (CUB's segmentations.tgz unpacks to its own folder) -------

# README.md's Waterbirds command, word for word, run in the folder that holds the three downloads.
README_COMMAND = ("preprocess --dataset waterbirds --root waterbird_complete95_forest2water2 "
                  "--cub-root CUB_200_2011 --out shards/wb --cf tile,mean")
README_SIZE = SIZE  # the command's stored size: by default these 24 x 16 images' shorter side (real
# Waterbirds images, 300 px and more, are stored at 256), so nothing is upscaled


def write_release(data: Path, birds=BIRDS, segmentations=True) -> Path:
    """`cfrobust fetch waterbirds` unpacked into `data`: waterbird_complete95_forest2water2/,
    CUB_200_2011/ (its text files and original images, the bird on white) and segmentations/."""
    write_waterbirds(data / "waterbird_complete95_forest2water2", birds, segmentations=False)
    cub = write_cub(data / "CUB_200_2011", [f"{b.img_id} {b.filename}" for b in birds],
                    [f"{b.img_id} {b.blob[0]}.0 {b.blob[1]}.0 {b.blob[2] - b.blob[0]}.0 {b.blob[3] - b.blob[1]}.0"
                     for b in birds])
    folders = sorted({b.filename.split("/")[0] for b in birds})
    (cub / "classes.txt").write_text("".join(f"{int(f[:3])} {f}\n" for f in folders))
    (cub / "image_class_labels.txt").write_text("".join(f"{b.img_id} {int(b.filename[:3])}\n" for b in birds))
    (cub / "train_test_split.txt").write_text("".join(f"{b.img_id} 1\n" for b in birds))
    for bird in birds:
        original = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
        c0, r0, c1, r1 = bird.blob
        original[r0:r1, c0:c1] = BIRD_BGR
        path = cub / "images" / bird.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), original)
    if segmentations:
        write_segmentations(data, birds)
    return data


def stored_mask(box, size: int) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_readme_command_on_the_three_downloads_side_by_side(tmp_path, monkeypatch):
    data = write_release(tmp_path / "data")
    assert sorted(p.name for p in data.iterdir()) == ["CUB_200_2011", "segmentations",
                                                      "waterbird_complete95_forest2water2"]
    monkeypatch.chdir(data)
    result = CliRunner().invoke(cli, README_COMMAND.split())
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [  # progress bars go to stderr
        "   train: 3 samples written, 0 skipped",
        "     val: 1 samples written, 0 skipped",
        "    test: 2 samples written, 0 skipped",
        "shards in shards/wb, images stored at 16 x 16 px",
    ]
    out = data / "shards" / "wb"
    source = info(out, "train")["source"]
    assert source["segmentations"] == [str(Path(os.getcwd()) / "segmentations")]  # found beside --root
    assert source["seg_rule"] == "nonzero"
    assert info(out, "train")["cf_methods"] == ["tile", "mean"]
    for split_id, split in enumerate(["train", "val", "test"]):
        samples = read_split(out, split)
        birds = [b for b in BIRDS if b.split == split_id]
        assert sorted(samples) == sorted(bird_key(b) for b in birds)
        for bird in birds:
            sample = samples[bird_key(bird)]
            box = bird.stored_box  # the blob at 16 x 16, worked out by hand
            assert (sample["label"], sample["group"]) == (bird.y, group_of(bird.y, bird.place))
            assert sample["boxes"] == [pytest.approx(box, abs=1e-3)]
            inside = stored_mask(box, README_SIZE)
            assert np.array_equal(sample["mask"] > 0, inside)
            # The Waterbirds image (the bird on its place), not CUB's original (the bird on white).
            place_rgb = np.array((WATER_BGR if bird.place else LAND_BGR)[::-1], float)
            assert np.abs(sample["image"][~inside].mean(axis=0) - place_rgb).max() < 12


def test_segmentations_folder_search_order(tmp_path, monkeypatch):
    """Inside --root, inside --cub-root, beside --root, beside --cub-root; per image, the first that has it."""
    root = write_waterbirds(tmp_path / "data" / "wb", birds=BIRDS[:1], segmentations=False)
    cub = tmp_path / "elsewhere" / "CUB_200_2011"
    cub.mkdir(parents=True)
    places = segmentation_folder_candidates(root, cub)
    assert places == [root / "segmentations", cub / "segmentations",
                      tmp_path / "data" / "segmentations", tmp_path / "elsewhere" / "segmentations"]
    # A CUB folder beside the Waterbirds folder: its parent is looked in once.
    beside_cub = tmp_path / "data" / "CUB_200_2011"
    assert segmentation_folder_candidates(root, beside_cub) == [
        root / "segmentations", beside_cub / "segmentations", tmp_path / "data" / "segmentations"]
    for place in places:
        write_segmentations(place.parent, BIRDS[:1])
    png = Path(BIRDS[0].filename).with_suffix(".png")
    for place in places:
        (record,) = WaterbirdsDataset(root, cub_root=cub).records("train")
        assert (record.mask, record.problem) == (place / png, "")
        (place / png).unlink()  # the folder stays: the next folder must still be tried for this image
    (record,) = WaterbirdsDataset(root, cub_root=cub).records("train")
    assert record.mask is None
    assert record.problem == "no segmentation " + " or ".join(str(place / png) for place in places)
    # --root . from inside the Waterbirds folder still looks beside it.
    monkeypatch.chdir(root)
    assert segmentation_folder_candidates(Path("."), None) == [
        Path("segmentations"), Path(os.getcwd()).parent / "segmentations"]


def test_no_segmentations_folder_is_one_line_naming_every_place_looked(tmp_path, monkeypatch):
    data = write_release(tmp_path / "data", segmentations=False)
    root, cub = data / "waterbird_complete95_forest2water2", data / "CUB_200_2011"
    expected = (f"waterbirds: no segmentations/ folder in {root}/segmentations, {cub}/segmentations, "
                f"{data}/segmentations; unpack CUB's segmentations.tgz beside {root} "
                f"(`cfrobust fetch waterbirds` does), or take CUB's boxes with --boxes cub --cub-root CUB_200_2011")
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        WaterbirdsDataset(root, cub_root=cub)
    # The README's command: relative places as given, the parent folder made absolute.
    monkeypatch.chdir(data)
    result = CliRunner().invoke(cli, README_COMMAND.split())
    assert result.exit_code == 1
    assert result.output == (
        "Error: waterbirds: no segmentations/ folder in waterbird_complete95_forest2water2/segmentations, "
        f"CUB_200_2011/segmentations, {Path(os.getcwd())}/segmentations; unpack CUB's segmentations.tgz beside "
        "waterbird_complete95_forest2water2 (`cfrobust fetch waterbirds` does), or take CUB's boxes with "
        "--boxes cub --cub-root CUB_200_2011\n"
    )
    assert not (data / "shards").exists()
    # CUB boxes need no segmentations.
    result = CliRunner().invoke(cli, README_COMMAND.split() + ["--boxes", "cub", "--overwrite"])
    assert result.exit_code == 0, result.output


# A 16x16 soft-edged segmentation (as CUB's: grey at the border): 255 at rows 5..10, columns
# 4..11; a ring of 128 around it (rows 4..11, columns 3..12); one pixel (255, 255, 254) at row 14,
# column 14, which is 255 in two channels only.
SOFT_BIRD = replace(BIRDS[1], blob=(4, 5, 12, 11))
SOFT_SIZE = 16


def soft_segmentation() -> np.ndarray:
    rgb = np.zeros((SOFT_SIZE, SOFT_SIZE, 3), np.uint8)
    rgb[4:12, 3:13] = 128
    rgb[5:11, 4:12] = 255
    rgb[14, 14] = (255, 255, 254)
    return rgb


@pytest.mark.parametrize("rule", [None, "nonzero", "all255"])
def test_soft_edged_segmentation_under_each_rule(tmp_path, monkeypatch, rule):
    seg = soft_segmentation()
    if rule == "all255":
        bird, box = seg.min(axis=2) == 255, (4.0, 5.0, 12.0, 11.0)  # the 255 core alone
    else:  # the default: every nonzero pixel, ring and the two-channel pixel included
        bird, box = seg.max(axis=2) > 0, (3.0, 4.0, 15.0, 15.0)
    assert bird.sum() == (48 if rule == "all255" else 8 * 10 + 1)
    root = tmp_path / "wb"
    write_waterbirds(root, birds=[SOFT_BIRD], segmentations=False)
    image = np.full((SOFT_SIZE, SOFT_SIZE, 3), LAND_BGR, np.uint8)
    assert cv2.imwrite(str(root / SOFT_BIRD.filename), image)  # square, so it is stored unresized
    png = tmp_path / "segmentations" / Path(SOFT_BIRD.filename).with_suffix(".png")
    png.parent.mkdir(parents=True)
    assert cv2.imwrite(str(png), seg[..., ::-1])  # RGB -> OpenCV's BGR
    monkeypatch.chdir(tmp_path)
    args = ["preprocess", "--dataset", "waterbirds", "--root", "wb", "--out", "out", "--cf", "tile",
            "--size", str(SOFT_SIZE)] + (["--seg-rule", rule] if rule else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (sample,) = read_split(tmp_path / "out", "train").values()
    assert sample["boxes"] == [pytest.approx(box, abs=1e-3)]
    assert set(np.unique(sample["mask"])) == {0, 255}
    assert np.array_equal(sample["mask"] == 255, bird)
    assert info(tmp_path / "out", "train")["source"]["seg_rule"] == (rule or "nonzero")


def test_all255_problems_are_reported_per_record(tmp_path):
    birds = [GREY_SEGMENTATION, BIRDS[5]]  # a mask of 128 only, and one whose PNG is broken
    root = write_waterbirds(tmp_path / "wb", birds=birds)
    broken = root / "segmentations" / BIRDS[5].filename.replace(".jpg", ".png")
    broken.write_bytes(b"not a png")
    summaries = preprocess(WaterbirdsDataset(root, seg_rule="all255"), tmp_path / "out", ["tile"], size=SIZE,
                           progress=False)
    grey = root / "segmentations" / GREY_SEGMENTATION.filename.replace(".jpg", ".png")
    assert [(item["key"], item["reason"]) for item in summaries[2].skipped] == [
        (bird_key(BIRDS[5]), f"unreadable mask {broken}"),
        (bird_key(GREY_SEGMENTATION), f"segmentation {grey} has no pixel of 255 in every channel (--seg-rule all255)"),
    ]


def test_seg_rule_option_matches_the_adapter_and_applies_to_waterbirds_only(tmp_path):
    (option,) = [p for p in preprocess_command.params if p.name == "seg_rule"]
    assert tuple(option.type.choices) == SEG_RULES
    result = CliRunner().invoke(cli, ["preprocess", "--dataset", "synthetic", "--out", str(tmp_path / "o"),
                                      "--seg-rule", "all255"])
    assert result.exit_code == 2 and "--seg-rule does not apply to --dataset synthetic" in result.output
