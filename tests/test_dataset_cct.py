"""Caltech Camera Traps (ECCV'18 release layout): empty frames dropped and counted, location groups,
one sample per (image, species), boxes given at the full-resolution size land on the object of the
smaller stored image."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cfrobust.datasets.cct import CCTDataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import iter_samples
from cfrobust.shards.schema import boxes_to_mask

SIZE = 16  # stored 24x20 images scale by (2/3, 4/5): object edges on multiples of (3, 5) stay sharp
FULL = (48, 40)  # the width/height the JSON states: the "original" the boxes were drawn on


def draw(path, boxes):
    """A 24x20 dark JPEG with white rectangles (x0, y0, x1, y1) at the objects."""
    image = np.full((20, 24, 3), 30, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def image(image_id, location):
    return {"id": image_id, "file_name": f"{image_id}.jpg", "width": FULL[0], "height": FULL[1], "location": location,
            "seq_id": "s-" + image_id, "seq_num_frames": 1, "frame_num": 0, "date_captured": "2012-05-09 07:34:57"}


def ann(aid, image_id, category, small_box=None):
    """An annotation; `small_box` is in stored-image pixels and written at the JSON's full size."""
    out = {"id": aid, "image_id": image_id, "category_id": category}
    if small_box is not None:
        x0, y0, x1, y1 = small_box
        out["bbox"] = [2 * x0, 2 * y0, 2 * (x1 - x0), 2 * (y1 - y0)]
    return out


CATEGORIES = [{"id": 1, "name": "opossum"}, {"id": 30, "name": "empty"}, {"id": 6, "name": "bobcat"},
              {"id": 3, "name": "raccoon"}]
BOX_A = (3, 5, 12, 15)
BOXES_B = [(0, 0, 6, 5), (15, 10, 24, 20)]
BOX_F = (12, 5, 21, 20)


def write_release(root):
    images = root / "eccv_18_all_images_sm"
    for name, boxes in {"a-1": [BOX_A], "b-2": BOXES_B, "c-3": [], "d-4": [(6, 5, 15, 15)], "e-5": [BOX_A],
                        "f-6": [BOX_F], "g-7": [], "v-1": [BOX_A], "v-2": [], "t-1": [BOX_A], "t-2": [BOX_A]}.items():
        draw(images / f"{name}.jpg", boxes)
    files = {
        "train": {
            "images": [image("a-1", 38), image("b-2", 38), image("c-3", 46), image("d-4", 46), image("e-5", 46),
                       image("f-6", 38), image("g-7", 38)],
            "annotations": [
                ann("x1", "a-1", 1, BOX_A),
                ann("x2", "b-2", 6, BOXES_B[0]), ann("x3", "b-2", 6, BOXES_B[1]),
                ann("x4", "c-3", 30),
                ann("x5", "d-4", 3),  # an animal without a bbox
                ann("x6", "e-5", 1, BOX_A), ann("x7", "e-5", 6, BOX_A),
                ann("x8", "f-6", 30), ann("x9", "f-6", 3, BOX_F),
                # g-7 has no annotation
                ann("x10", "lost-9", 1, BOX_A),
            ],
        },
        "cis_val": {"images": [image("v-1", 38), image("v-2", 38)],
                    "annotations": [ann("y1", "v-1", 1, BOX_A), ann("y2", "v-2", 30)]},
        "trans_test": {"images": [image("t-1", 99), image("t-2", 99)],
                       "annotations": [ann("z1", "t-1", 6, BOX_A), {"id": "z2", "image_id": "t-2", "category_id": 6,
                                                                     "bbox": [1, 2, "3", 4]}]},
    }
    folder = root / "eccv_18_annotation_files"
    folder.mkdir()
    for split, content in files.items():
        content = {"info": {"version": "ECCV18"}, "categories": CATEGORIES, **content}
        (folder / f"{split}_annotations.json").write_text(json.dumps(content))
    return root


@pytest.fixture
def cct(tmp_path):
    return write_release(tmp_path / "cct")


def read_split(out, split):
    samples = list(iter_samples(sorted((out / split).glob("*.tar")), ["tile"]))
    return {s["key"]: s for s in samples}, json.loads((out / split / "_info.json").read_text())


def stored(box):
    x0, y0, x1, y1 = box
    return (x0 * 2 / 3, y0 * 0.8, x1 * 2 / 3, y1 * 0.8)


def test_splits_classes_and_empty_frames(cct):
    ds = CCTDataset(cct)
    assert ds.name == "cct"
    assert ds.splits == ["train", "cis_val", "trans_test"]  # trans_val and cis_test files are absent
    assert ds.classes == ["opossum", "raccoon", "bobcat"]  # ids 1, 3, 6; 30 (empty) is no class
    # 8 = 7 images - 1 empty + 1 more for e-5's second species + 1 unknown image id
    assert [ds.count(s) for s in ds.splits] == [8, 1, 2]
    assert ds.describe() == {
        "dataset": "cct",
        "images": str(cct / "eccv_18_all_images_sm"),
        "annotations": {s: str(cct / "eccv_18_annotation_files" / f"{s}_annotations.json") for s in ds.splits},
        "root": str(cct),
        "empty_images_dropped": {"train": 1, "cis_val": 1, "trans_test": 0},
        "images_with_several_species": {"train": 1, "cis_val": 0, "trans_test": 0},
    }
    assert ds.notes() == ["images showing several animal categories (train 1) became one sample per category, "
                          "each with that category's boxes only (as the official code); keys end in _category<id>"]


def test_records(cct):
    records = {r.key: r for r in CCTDataset(cct).records("train")}
    assert "c-3" not in records  # empty frame: left out, counted in describe()
    a, b, d, f = records["a-1"], records["b-2"], records["d-4"], records["f-6"]
    assert (a.label, a.group, a.boxes, a.boxes_size) == (0, "38", [(6.0, 10.0, 24.0, 30.0)], FULL)
    assert a.image == cct / "eccv_18_all_images_sm" / "a-1.jpg"
    assert a.attrs == {"image_id": "a-1", "location": 38}
    assert a.source == f"{cct / 'eccv_18_annotation_files' / 'train_annotations.json'}: image id a-1"
    assert (b.label, len(b.boxes)) == (2, 2)
    assert (d.label, d.group, d.boxes, d.problem) == (1, "46", [], "")
    assert (f.label, f.problem) == (1, "")  # empty + raccoon on one frame: a raccoon


def test_preprocess_rescales_full_size_boxes_onto_the_stored_image(cct, tmp_path):
    out = tmp_path / "out"
    summaries = preprocess(CCTDataset(cct), out, ["tile"], size=SIZE, progress=False)
    assert [(s.split, s.written, len(s.skipped)) for s in summaries] == [("train", 6, 2), ("cis_val", 1, 0),
                                                                          ("trans_test", 1, 1)]
    samples, info = read_split(out, "train")
    assert sorted(samples) == ["a-1", "b-2", "d-4", "e-5_category1", "e-5_category6", "f-6"]
    assert info["classes"] == ["opossum", "raccoon", "bobcat"]
    assert info["group_counts"] == {"38": 3, "46": 3}
    assert info["source"]["empty_images_dropped"] == {"train": 1, "cis_val": 1, "trans_test": 0}
    assert {k: (s["label"], s["group"]) for k, s in samples.items()} == {
        "a-1": (0, "38"), "b-2": (2, "38"), "d-4": (1, "46"), "e-5_category1": (0, "46"), "e-5_category6": (2, "46"),
        "f-6": (1, "38")}
    for key, boxes in {"a-1": [BOX_A], "b-2": BOXES_B, "e-5_category1": [BOX_A], "e-5_category6": [BOX_A],
                       "f-6": [BOX_F]}.items():
        expected = [stored(b) for b in boxes]
        assert np.allclose(samples[key]["boxes"], expected, atol=1e-3), key
        bright = samples[key]["image"].mean(axis=2) > 128
        assert np.array_equal(bright, boxes_to_mask(expected, SIZE, SIZE)), key
    assert samples["d-4"]["boxes"] == []  # no bbox: kept, trains without boxes
    val, _ = read_split(out, "cis_val")
    assert [(k, s["group"]) for k, s in val.items()] == [("v-1", "38")]
    test, test_info = read_split(out, "trans_test")
    assert [(k, s["label"], s["group"]) for k, s in test.items()] == [("t-1", 2, "99")]


def test_problems_are_reported_with_file_and_image_id(cct, tmp_path):
    summaries = preprocess(CCTDataset(cct), tmp_path / "out", ["tile"], size=SIZE, progress=False)
    train = str(cct / "eccv_18_annotation_files" / "train_annotations.json")
    test = str(cct / "eccv_18_annotation_files" / "trans_test_annotations.json")
    assert summaries[0].skipped == [
        {"key": "g-7", "source": f"{train}: image id g-7", "reason": "no annotation"},
        {"key": "unknown_image_lost-9_annotation_x10", "source": f"{train}: image id lost-9",
         "reason": "image id 'lost-9' is not in 'images' (named by annotation x10)"},
    ]
    assert summaries[2].skipped == [
        {"key": "t-2", "source": f"{test}: image id t-2",
         "reason": "annotation z2: bbox [1, 2, '3', 4] is not 4 numbers [x, y, width, height]"},
    ]


def test_strict_raises_on_the_first_problem(cct, tmp_path):
    with pytest.raises(UserError, match=r"record g-7 \(.*train_annotations.json: image id g-7\): no annotation"):
        preprocess(CCTDataset(cct), tmp_path / "out", ["tile"], size=SIZE, strict=True, progress=False)


def test_files_directly_in_root_and_an_image_folder_elsewhere(cct, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (cct / "eccv_18_annotation_files" / "train_annotations.json").rename(flat / "train_annotations.json")
    ds = CCTDataset(flat, images=cct / "eccv_18_all_images_sm")
    assert ds.splits == ["train"]
    assert next(iter(ds.records("train"))).image == cct / "eccv_18_all_images_sm" / "a-1.jpg"


def test_missing_train_file_or_images_are_user_errors(cct, tmp_path):
    with pytest.raises(UserError, match=r"eccv_18_annotation_files/train_annotations.json not found"):
        CCTDataset(tmp_path)
    with pytest.raises(UserError, match="nowhere: image folder not found"):
        CCTDataset(cct, images=tmp_path / "nowhere")
    with pytest.raises(UserError, match="CCT root folder not found"):
        CCTDataset(tmp_path / "absent")


def test_a_location_less_image_is_a_problem(cct):
    path = cct / "eccv_18_annotation_files" / "cis_val_annotations.json"
    data = json.loads(path.read_text())
    del data["images"][0]["location"]
    path.write_text(json.dumps(data))
    (record,) = CCTDataset(cct).records("cis_val")
    assert (record.key, record.problem) == ("v-1", "image has no 'location' (the evaluation group)")


# A train file in the shape of the ECCV'18 release (string uuid ids, seq_* fields, empty frames
# annotated with category 30 and no bbox): one frame shows two species, a coyote and two opossums.
TWO_SPECIES, ONE_SPECIES, EMPTY = ("5968c0f9-23d2-11e8-a6a3-ec086b02610b", "59f5fe2b-23d2-11e8-a6a3-ec086b02610b",
                                   "5a2af4ab-23d2-11e8-a6a3-ec086b02610b")
COYOTE, OPOSSUMS, RACCOON = (0, 0, 6, 5), [(6, 10, 12, 15), (15, 10, 24, 20)], (3, 5, 12, 15)


def write_two_species_release(root):
    for name, boxes in {TWO_SPECIES: [COYOTE, *OPOSSUMS], ONE_SPECIES: [RACCOON], EMPTY: []}.items():
        draw(root / "eccv_18_all_images_sm" / f"{name}.jpg", boxes)
    content = {
        "info": {"contributor": "Sara Beery", "version": "ECCV18", "year": 2018},
        "categories": [{"id": 6, "name": "bobcat"}, {"id": 1, "name": "opossum"}, {"id": 30, "name": "empty"},
                       {"id": 9, "name": "coyote"}, {"id": 3, "name": "raccoon"}],
        "images": [image(TWO_SPECIES, 38), image(ONE_SPECIES, 46), image(EMPTY, 38)],
        "annotations": [  # the coyote's annotation sits between the opossums' on purpose
            ann("1fd1d9e6-5567-11e8-9f93-dca9047ef277", TWO_SPECIES, 1, OPOSSUMS[0]),
            ann("1fd1d9e7-5567-11e8-9f93-dca9047ef277", TWO_SPECIES, 9, COYOTE),
            ann("1fd1d9e8-5567-11e8-9f93-dca9047ef277", TWO_SPECIES, 1, OPOSSUMS[1]),
            ann("1fd1d9e9-5567-11e8-9f93-dca9047ef277", ONE_SPECIES, 3, RACCOON),
            ann("1fd1d9ea-5567-11e8-9f93-dca9047ef277", EMPTY, 30),
        ],
    }
    (root / "eccv_18_annotation_files").mkdir(parents=True)
    (root / "eccv_18_annotation_files" / "train_annotations.json").write_text(json.dumps(content))
    return root


def test_an_image_with_two_species_is_one_sample_per_species(tmp_path):
    root = write_two_species_release(tmp_path / "cct")
    ds = CCTDataset(root)
    assert ds.classes == ["opossum", "raccoon", "bobcat", "coyote"]  # ids 1, 3, 6, 9
    records = list(ds.records("train"))
    assert ds.count("train") == len(records) == 3
    full = lambda box: tuple(2.0 * v for v in box)  # noqa: E731 - boxes as the JSON states them
    assert [(r.key, r.label, r.group, r.boxes, r.problem) for r in records] == [
        (f"{TWO_SPECIES}_category1", 0, "38", [full(b) for b in OPOSSUMS], ""),
        (f"{TWO_SPECIES}_category9", 3, "38", [full(COYOTE)], ""),
        (ONE_SPECIES, 1, "46", [full(RACCOON)], ""),
    ]
    assert records[0].image == records[1].image == root / "eccv_18_all_images_sm" / f"{TWO_SPECIES}.jpg"

    from click.testing import CliRunner

    from cfrobust.cli.main import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", "--dataset", "cct", "--root", str(root), "--out", str(out),
                                      "--cf", "tile", "--size", str(SIZE)])
    assert result.exit_code == 0, result.output
    assert "   train: 3 samples written, 0 skipped" in result.output
    assert ("note: images showing several animal categories (train 1) became one sample per category, each with "
            "that category's boxes only (as the official code); keys end in _category<id>") in result.output
    # The training split is stored shuffled; by key, the samples are in the order listed below.
    samples = sorted(iter_samples(sorted((out / "train").glob("*.tar")), ["tile"]), key=lambda s: s["key"])
    info = json.loads((out / "train" / "_info.json").read_text())
    assert [(s["key"], s["label"], s["group"]) for s in samples] == [
        (f"{TWO_SPECIES}_category1", 0, "38"), (f"{TWO_SPECIES}_category9", 3, "38"), (ONE_SPECIES, 1, "46")]
    assert (info["num_samples"], info["group_counts"], info["skipped"]) == (3, {"38": 2, "46": 1}, [])
    assert info["source"]["empty_images_dropped"] == {"train": 1}
    assert info["source"]["images_with_several_species"] == {"train": 1}
    both = [COYOTE, *OPOSSUMS]
    for sample, boxes, shown in [(samples[0], OPOSSUMS, both), (samples[1], [COYOTE], both),
                                 (samples[2], [RACCOON], [RACCOON])]:
        # Each sample's boxes are its own species' only; the other species stays in the picture.
        assert np.allclose(sample["boxes"], [stored(b) for b in boxes], atol=1e-3), sample["key"]
        bright = sample["image"].mean(axis=2) > 128
        assert np.array_equal(bright, boxes_to_mask([stored(b) for b in shown], SIZE, SIZE)), sample["key"]
