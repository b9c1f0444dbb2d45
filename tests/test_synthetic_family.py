"""The built-in benchmark family: every member seeded, its twin with the same objects and places
drawn independently of the label, and its export to the Waterbirds and COCO layouts read back."""

from __future__ import annotations

import json
import math
from collections import Counter

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset, waterbirds
from cfrobust.datasets.export import export_dataset
from cfrobust.datasets.record import safe_key
from cfrobust.datasets.synthetic import SyntheticDataset
from cfrobust.datasets.synthetic_variants import VARIANT_NAMES, VARIANTS
from cfrobust.errors import UserError

SIDE = 32  # small images keep the file fast; every member draws at 32 px
FAMILY = [name for name in VARIANT_NAMES if name != "default"]


def _records(name: str, split: str, count: int, seed: int = 0, twin: bool = False, side: int = SIDE, **options):
    sizes = {"train": (count, 0, 0), "val": (0, count, 0), "test": (0, 0, count)}[split]
    dataset = SyntheticDataset(seed=seed, sizes=sizes, image_size=side, variant=name, twin=twin, **options)
    return list(dataset.records(split))


def _interior(mask: np.ndarray, radius: int) -> np.ndarray:
    """Mask pixels at least `radius` pixels (square neighbourhood) inside the object."""
    inside = mask > 0
    for _ in range(radius):
        padded = np.pad(inside, 1)
        inside = inside & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] \
            & padded[:-2, :-2] & padded[:-2, 2:] & padded[2:, :-2] & padded[2:, 2:]
    return inside


def test_the_family_has_the_promised_members():
    assert VARIANT_NAMES == ("default", "shapes", "small", "noisy", "large", "four-class")
    for name in VARIANT_NAMES:
        variant = VARIANTS[name]
        assert 0.9 <= variant.correlation <= 0.99
        assert 0.10 <= variant.size_range[0] < variant.size_range[1] <= 0.55
        assert len(variant.places) == len(variant.classes)
    assert [VARIANTS[n].correlation for n in ("small", "large")] == [0.90, 0.99]
    assert VARIANTS["noisy"].blur_sigma > 0 and VARIANTS["noisy"].noise_sigma > 0
    for name in FAMILY:  # several shapes per label, no shape in two classes
        shapes = [shape for _, members in VARIANTS[name].classes for shape in members]
        assert all(len(members) >= 2 for _, members in VARIANTS[name].classes)
        assert len(shapes) == len(set(shapes))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_every_member_is_a_pure_function_of_its_seed(name):
    for split in ("train", "test"):
        first, again = _records(name, split, 6, seed=4), _records(name, split, 6, seed=4)
        other = _records(name, split, 6, seed=5)
        for a, b, c in zip(first, again, other, strict=True):
            assert a.key == b.key == c.key
            assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
            assert (a.label, a.group, a.boxes, a.attrs) == (b.label, b.group, b.boxes, b.attrs)
            assert not np.array_equal(a.image, c.image)
    dataset = SyntheticDataset(seed=4, sizes=(0, 0, 50), image_size=SIDE, variant=name)
    assert np.array_equal(dataset.make_record("test", 5).image, first[5].image)  # independent of the split size


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_records_have_tight_boxes_of_the_members_size(name):
    side = 64
    variant = VARIANTS[name]
    records = _records(name, "train", 40, side=side)
    low, high = variant.size_range
    for r in records:
        assert r.image.shape == (side, side, 3) and r.image.dtype == np.uint8
        assert set(np.unique(r.mask)) == {0, 255}
        ys, xs = np.nonzero(r.mask)
        assert r.boxes == [(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))]
        x0, y0, x1, y1 = r.boxes[0]
        # The longer box side is the drawn size, give or take the pixel grid.
        assert math.floor(low * side) - 1 <= max(x1 - x0, y1 - y0) <= math.ceil(high * side) + 1
        assert r.group == f"{variant.class_names[r.label]}/{r.attrs['place']}"
        if name != "default":
            assert r.attrs["shape"] in variant.classes[r.label][1]


def test_the_small_member_keeps_every_box_within_a_fifth_of_the_side():
    side = 64
    boxes = [r.boxes[0] for r in _records("small", "train", 300, side=side)]
    longest = [max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
    assert max(longest) <= math.ceil(0.20 * side)
    assert min(longest) >= math.floor(0.12 * side) - 1


def test_the_box_size_does_not_tell_the_classes_apart():
    """Every shape is scaled to the same longest box side, so the classes' mean box sizes agree
    within the pixel grid's rounding."""
    records = _records("shapes", "train", 400, side=64)
    longest = {0: [], 1: []}
    for r in records:
        x0, y0, x1, y1 = r.boxes[0]
        longest[r.label].append(max(x1 - x0, y1 - y0))
    assert abs(np.mean(longest[0]) - np.mean(longest[1])) < 1.0


def test_a_label_holds_several_shapes():
    records = _records("shapes", "train", 200)
    seen = Counter((r.label, r.attrs["shape"]) for r in records)
    assert {shape for label, shape in seen if label == 0} == {"disk", "ellipse", "blob", "ring"}
    assert {shape for label, shape in seen if label == 1} == {"triangle", "diamond", "star", "cross"}
    textures = Counter((r.attrs["place"], r.attrs["texture"]) for r in records)
    assert {t for place, t in textures if place == "land"} == {"grass", "forest", "fields"}
    assert {t for place, t in textures if place == "water"} == {"waves", "choppy", "reflections"}


def test_the_four_class_member_has_four_classes_on_four_places():
    dataset = SyntheticDataset(sizes=(8, 32, 16), image_size=SIDE, variant="four-class")
    assert dataset.classes == ["round", "polygon", "spiky", "hollow"]
    assert dataset.aligned_groups == ["round/land", "polygon/water", "spiky/desert", "hollow/snow"]
    groups = Counter(r.group for r in dataset.records("val"))
    assert groups == {f"{c}/{p}": 2 for c in dataset.classes for p in ("land", "water", "desert", "snow")}
    assert [r.label for r in dataset.records("train")] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_the_twin_has_the_same_objects(name):
    correlated = _records(name, "train", 60)
    twin = _records(name, "train", 60, twin=True)
    # Blur mixes the background into the object's rim; deeper inside, pixels must match exactly.
    radius = VARIANTS[name].blur_radius
    compared = 0
    for a, b in zip(correlated, twin, strict=True):
        assert (a.key, a.label, a.boxes) == (b.key, b.label, b.boxes)
        assert np.array_equal(a.mask, b.mask)
        inside = _interior(a.mask, radius)
        assert np.array_equal(a.image[inside], b.image[inside])
        compared += int(inside.sum())
        if a.attrs["place"] == b.attrs["place"] and name != "default":
            assert np.array_equal(a.image, b.image)  # one background stream: same place, same picture
    assert compared > 60 * 10
    moved = sum(a.attrs["place"] != b.attrs["place"] for a, b in zip(correlated, twin))
    assert moved > 0


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_the_twin_keeps_val_and_test_unchanged(name):
    for split in ("val", "test"):
        for a, b in zip(_records(name, split, 8), _records(name, split, 8, twin=True), strict=True):
            assert (a.key, a.label, a.group, a.boxes, a.attrs) == (b.key, b.label, b.group, b.boxes, b.attrs)
            assert np.array_equal(a.image, b.image)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_training_places_agree_at_the_correlation_and_are_independent_in_the_twin(name):
    variant = VARIANTS[name]
    count = len(variant.classes)
    n = 100 * count * count
    correlated = _records(name, "train", n, side=VARIANTS[name].min_image_size)
    twin = _records(name, "train", n, twin=True, side=VARIANTS[name].min_image_size)
    places = list(variant.places)
    # Binomial draws: allow 4 standard deviations.
    c = variant.correlation
    agree = sum(places.index(r.attrs["place"]) == r.label for r in correlated)
    assert abs(agree / n - c) <= 4 * math.sqrt(c * (1 - c) / n)
    # Twin: each label holds n / K records (labels cycle); its place is uniform over K places.
    per_label = n // count
    groups = Counter(r.group for r in twin)
    assert len(groups) == count * count
    tolerance = 4 * math.sqrt(per_label * (1 / count) * (1 - 1 / count))
    for group, seen in groups.items():
        assert abs(seen - per_label / count) <= tolerance, (group, seen)
    twin_agree = sum(places.index(r.attrs["place"]) == r.label for r in twin)
    assert abs(twin_agree / n - 1 / count) <= 4 * math.sqrt((1 / count) * (1 - 1 / count) / n)


@pytest.mark.parametrize("correlation, agreeing", [(1.0, 40), (0.0, 0)])
def test_a_given_correlation_overrides_the_members(correlation, agreeing):
    records = _records("four-class", "train", 40, correlation=correlation)
    places = list(VARIANTS["four-class"].places)
    assert sum(places.index(r.attrs["place"]) == r.label for r in records) == agreeing


def test_describe_records_variant_and_twin_but_leaves_the_original_task_as_it_was():
    plain = SyntheticDataset(sizes=(1, 1, 1))
    assert "variant" not in plain.describe() and "twin" not in plain.describe()
    assert SyntheticDataset(sizes=(1, 1, 1), twin=True).describe()["variant"] == "default"
    described = SyntheticDataset(seed=2, sizes=(3, 4, 5), variant="small", twin=True).describe()
    assert described == {"dataset": "synthetic", "variant": "small", "twin": True, "seed": 2,
                         "sizes": {"train": 3, "val": 4, "test": 5}, "image_size": 64, "correlation": 0.9}


@pytest.mark.parametrize("options, message", [
    ({"variant": "nope"}, "unknown synthetic variant 'nope'; choose one of default, shapes, small, noisy, large, four-class"),
    ({"variant": "small", "image_size": 24}, r"image size must be at least 32 pixels, got 24 \(variant small\)"),
    ({"seed": -1}, "synthetic seed must be a non-negative integer, got -1"),
])
def test_bad_family_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        SyntheticDataset(**options)


# --- export ------------------------------------------------------------------------------------

def _exported(tmp_path, layout, name="shapes", twin=True, image_format="png"):
    dataset = SyntheticDataset(seed=1, sizes=(12, 4, 8), image_size=SIDE, variant=name, twin=twin)
    summary = export_dataset(dataset, tmp_path / layout, layout, image_format, progress=False)
    assert summary.counts == {"train": 12, "val": 4, "test": 8}
    return dataset, summary


def _read_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("name", ["default", "shapes"])
def test_waterbirds_export_reads_back_through_the_adapter(tmp_path, name):
    dataset, _ = _exported(tmp_path, "waterbirds", name)
    adapter = open_dataset("waterbirds", root=tmp_path / "waterbirds")
    for split in dataset.splits:
        made = {safe_key(f"{r.label + 1:03d}.{dataset.classes[r.label]}/{r.key}.png"): r for r in dataset.records(split)}
        read = list(adapter.records(split))
        assert sorted(r.key for r in read) == sorted(made)
        for back in read:
            original = made[back.key]
            assert not back.problem
            assert back.label == original.label and back.attrs["place"] == original.attrs["place"]
            assert back.group == f"{waterbirds.CLASSES[original.label]}/{original.attrs['place']}"
            assert np.array_equal(_read_rgb(back.image), original.image)
            segmentation = _read_rgb(back.mask)
            assert set(np.unique(segmentation)) == {0, 255}
            assert np.array_equal(segmentation, np.repeat(original.mask[..., None], 3, axis=2))


def test_coco_export_reads_back_through_the_adapter(tmp_path):
    dataset, _ = _exported(tmp_path, "coco", "four-class")
    files = {split: tmp_path / "coco" / "annotations" / f"{split}.json" for split in dataset.splits}
    adapter = open_dataset("coco", images=tmp_path / "coco" / "images", annotations=files)
    assert adapter.classes == dataset.classes
    for split in dataset.splits:
        made = list(dataset.records(split))
        read = list(adapter.records(split))
        assert [r.key for r in read] == [r.key for r in made]
        for back, original in zip(read, made):
            assert not back.problem
            assert back.label == original.label
            assert back.group == original.group  # the image's "group" field: class/place
            assert back.boxes == original.boxes and back.boxes_size == (SIDE, SIDE)
            assert np.array_equal(_read_rgb(back.image), original.image)
    # The place and group ride along in each image entry (the adapter ignores extra fields).
    first = json.loads(files["test"].read_text())["images"][0]
    assert (first["place"], first["group"]) == (made[0].attrs["place"], made[0].group)


def test_jpeg_export_stays_close_to_the_generated_pixels(tmp_path):
    dataset, _ = _exported(tmp_path, "coco", "shapes", image_format="jpg")
    for record in dataset.records("test"):
        stored = _read_rgb(tmp_path / "coco" / "images" / f"{record.key}.jpg")
        assert np.abs(stored.astype(int) - record.image).mean() < 4.0  # measured: 3.1-3.4 at quality 95


# --- command line ------------------------------------------------------------------------------

def _one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    return lines[-1]


def test_the_cli_exports_and_refuses_what_it_must(tmp_path):
    base = ["synthetic", "--synthetic-sizes", "4,4,4", "--synthetic-image-size", str(SIDE)]
    out = tmp_path / "wb"
    four = CliRunner().invoke(cli, [*base, "--variant", "four-class", "--export-layout", "waterbirds", "--out", str(out)])
    assert _one_line_error(four) == ("Error: variant four-class has 4 classes, but the waterbirds layout holds only "
                                     "y = 0 or 1; export it with --export-layout coco")
    assert not out.exists()
    args = [*base, "--variant", "noisy", "--twin", "--export-layout", "waterbirds", "--out", str(out)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert f"read it back with: cfrobust preprocess --dataset waterbirds --root {out}" in first.output
    provenance = json.loads((out / "synthetic.json").read_text())
    assert provenance["source"]["variant"] == "noisy" and provenance["source"]["twin"] is True
    again = CliRunner().invoke(cli, args)
    assert _one_line_error(again) == (f"Error: --out {out} already exists and is not empty; pass --overwrite "
                                      f"to replace it or choose another --out")
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0
    (out / "mine.txt").write_text("keep")
    foreign = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert "holds 'mine.txt', which this command did not write" in _one_line_error(foreign)
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "coco", "--variant", "small"], "Error: --variant does not apply to --dataset coco"),
    (["--dataset", "waterbirds", "--twin"], "Error: --twin does not apply to --dataset waterbirds"),
    (["--dataset", "synthetic", "--variant", "nope"], "Error: Invalid value for '--variant': 'nope' is not one of"),
])
def test_preprocess_takes_variant_and_twin_for_synthetic_only(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["preprocess", *args, "--out", str(tmp_path / "s")])
    assert _one_line_error(result).startswith(message)


def test_preprocess_records_variant_and_twin_in_the_manifest(tmp_path):
    out = tmp_path / "s"
    args = ["preprocess", "--dataset", "synthetic", "--variant", "small", "--twin", "--synthetic-sizes", "8,4,4",
            "--synthetic-image-size", str(SIDE), "--synthetic-correlation", "0.0", "--cf", "none", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "train" / "_info.json").read_text())
    assert info["source"] == {"dataset": "synthetic", "variant": "small", "twin": True, "seed": 0,
                              "sizes": {"train": 8, "val": 4, "test": 4}, "image_size": SIDE, "correlation": 0.0}
    assert info["classes"] == ["round", "angular"]
    assert info["aligned_groups"] == ["round/land", "angular/water"]
