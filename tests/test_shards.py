"""The shard cache: schema, writer, manifest, train/eval readers, and the preprocess pipeline.

All data is made here: the synthetic dataset at 32x32, or hand-made records through a tiny
DatasetSource. Shards are small (a few samples each) so that readers can be checked exactly.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import shutil
import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cfrobust.datasets import open_dataset
from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.datasets.synthetic import CLASSES
from cfrobust.errors import UserError
from cfrobust.preprocess.fills import fill_mean, fill_tile
from cfrobust.preprocess.pipeline import RecordError, check_box, make_sample, preprocess, source_boxes
from cfrobust.shards import reader
from cfrobust.shards.manifest import list_splits, read_info, write_info
from cfrobust.shards.reader import (
    Batch,
    EvalShards,
    TrainShards,
    batches_per_worker,
    by_sample,
    collate,
    decode_many,
    decode_sample,
    iter_raw_samples,
    iter_samples,
    make_loader,
    shard_order,
    shards_for_worker,
    split_info,
)
from cfrobust.shards.schema import SCHEMA, decode_gray, decode_rgb, encode_jpeg, shard_name
from cfrobust.shards.writer import ShardWriter

CF = ["tile", "mean"]
SIZES = (38, 10, 7)  # train: 9 shards of 4 + one of 2; val: 4, 4, 2; test: 4, 3
SHARD_SIZE = 4
SEED = 7


# ---------------------------------------------------------------- helpers and fixtures


class HandMade(DatasetSource):
    """A dataset of records given in the test; one split unless told otherwise."""

    name = "handmade"
    classes = ["cat", "dog"]
    default_size = 16
    mixed_order = True  # stored as listed, so a test can say which shard holds which record

    def __init__(self, records: list[Record], splits=("train",)):
        self._records = records
        self.splits = list(splits)

    def records(self, split):
        return iter([r for r in self._records if r.split == split])


def shard_keys(path: Path) -> list[str]:
    """Sample keys in a tar, in order, read with tarfile (independently of the reader)."""
    with tarfile.open(path) as tar:
        names = tar.getnames()
    keys: list[str] = []
    for name in names:
        key = name.split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def image(height=16, width=16, value=None, seed=0) -> np.ndarray:
    if value is not None:
        return np.full((height, width, 3), value, np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def synthetic():
    return open_dataset("synthetic", seed=3, sizes=SIZES, image_size=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, synthetic):
    out = tmp_path_factory.mktemp("shards")
    summaries = preprocess(synthetic, out, CF, shard_size=SHARD_SIZE, progress=False)
    return out, summaries


@pytest.fixture(scope="module")
def expected_keys(synthetic):
    return {split: [r.key for r in synthetic.records(split)] for split in synthetic.splits}


# ---------------------------------------------------------------- writer, manifest, layout


def test_preprocess_layout_counts_and_hashes(shards, expected_keys):
    out, summaries = shards
    assert [(s.split, s.written, s.skipped) for s in summaries] == [
        ("train", 38, []),
        ("val", 10, []),
        ("test", 7, []),
    ]
    assert list_splits(out) == ["train", "val", "test"]
    assert list(out.rglob("*.tmp")) == []
    for split, n in zip(["train", "val", "test"], SIZES):
        info = read_info(out / split)
        assert info["schema"] == SCHEMA
        assert info["split"] == split
        assert info["num_samples"] == n
        assert info["size"] == 32
        assert info["cf_methods"] == CF
        assert info["classes"] == CLASSES
        assert info["skipped"] == []
        assert info["source"]["dataset"] == "synthetic" and info["source"]["seed"] == 3
        counts = [s["num_samples"] for s in info["shards"]]
        full, last = divmod(n, SHARD_SIZE)
        assert counts == [SHARD_SIZE] * full + ([last] if last else [])
        assert [s["name"] for s in info["shards"]] == [shard_name(split, i) for i in range(len(counts))]
        on_disk = sorted(p.name for p in (out / split).iterdir())
        assert on_disk == sorted([s["name"] for s in info["shards"]] + ["_info.json"])
        keys = []
        for shard in info["shards"]:
            path = out / split / shard["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            in_shard = shard_keys(path)
            assert len(in_shard) == shard["num_samples"]
            keys += in_shard
        assert keys == expected_keys[split]  # every record, once, in source order
    groups = read_info(out / "val")["groups"]
    assert groups == sorted(f"{c}/{p}" for c in CLASSES for p in ("land", "water"))


def test_sample_parts_in_a_shard(shards):
    out, _ = shards
    with tarfile.open(out / "val" / "val-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("val_0000000.json").read())
        mask = decode_gray(tar.extractfile("val_0000000.mask.png").read())
    assert sorted(n for n in names if n.startswith("val_0000000.")) == [
        "val_0000000.cf_mean.jpg",
        "val_0000000.cf_tile.jpg",
        "val_0000000.jpg",
        "val_0000000.json",
        "val_0000000.mask.png",
    ]
    assert sorted(meta) == ["attrs", "boxes", "group", "label", "source", "split"]
    assert meta["split"] == "val" and meta["group"] == "disk/land" and meta["label"] == 0
    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
    ys, xs = np.nonzero(mask)
    assert meta["boxes"] == [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]


def test_preprocess_twice_gives_byte_identical_shards(tmp_path, synthetic):
    a, b = tmp_path / "a", tmp_path / "b"
    small = open_dataset("synthetic", seed=1, sizes=(6, 5, 0), image_size=32)
    preprocess(small, a, CF, shard_size=2, progress=False)
    preprocess(small, b, CF, shard_size=2, progress=False)
    for split in ["train", "val", "test"]:
        files_a = sorted(p.name for p in (a / split).iterdir())
        assert files_a == sorted(p.name for p in (b / split).iterdir())
        for name in files_a:
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), f"{split}/{name}"
    assert read_info(a / "test")["shards"] == [] and read_info(a / "test")["num_samples"] == 0


def test_shard_writer_fixed_size_shards(tmp_path):
    writer = ShardWriter(tmp_path, "x", 3)
    for i in range(7):
        writer.write({"__key__": f"k{i}", "json": json.dumps({"i": i}).encode()})
        if i == 1:  # the open shard is a .tmp file until complete
            assert [p.name for p in tmp_path.iterdir()] == ["x-000000.tar.tmp"]
    shards = writer.close()
    assert [(s["name"], s["num_samples"]) for s in shards] == [
        ("x-000000.tar", 3),
        ("x-000001.tar", 3),
        ("x-000002.tar", 1),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    for s in shards:
        assert hashlib.sha256((tmp_path / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert shard_keys(tmp_path / "x-000002.tar") == ["k6"]
    with tarfile.open(tmp_path / "x-000001.tar") as tar:
        assert json.loads(tar.extractfile("k4.json").read()) == {"i": 4}
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_shard_writer_exact_multiple_and_empty(tmp_path):
    writer = ShardWriter(tmp_path, "y", 2)
    for i in range(4):
        writer.write({"__key__": f"k{i}", "json": b"{}"})
    assert [s["num_samples"] for s in writer.close()] == [2, 2]
    assert ShardWriter(tmp_path / "none", "z", 2).close() == []
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "w", 0)


def test_manifest_round_trip_and_errors(tmp_path):
    split = tmp_path / "s"
    split.mkdir()
    info = {"split": "s", "num_samples": 0, "shards": [], "classes": ["a"], "cf_methods": [], "size": 8}
    write_info(split, info)
    assert read_info(split) == {"schema": SCHEMA, **info}
    assert [p.name for p in split.iterdir()] == ["_info.json"]

    with pytest.raises(UserError, match="no _info.json"):
        read_info(tmp_path / "missing")
    (split / "_info.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        read_info(split)
    (split / "_info.json").write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(UserError, match="schema 'other/9'"):
        read_info(split)
    (split / "_info.json").write_text("[]")
    with pytest.raises(UserError, match="schema 'list', expected"):
        read_info(split)
    for key, value, shown in [("shards", None, "None"), ("classes", "ab", "'ab'"), ("num_samples", "0", "'0'")]:
        (split / "_info.json").write_text(json.dumps({"schema": SCHEMA, **info, key: value}))
        with pytest.raises(UserError, match=rf"'{key}' is {shown}, not a (list|int) \(a damaged manifest\)"):
            read_info(split)
    (split / "_info.json").write_text(json.dumps({"schema": SCHEMA, **info, "shards": [{"name": "a.tar"}]}))
    with pytest.raises(UserError, match=r"shard entry \{'name': 'a.tar'\} lacks a name or a sample count"):
        read_info(split)


def test_list_splits_order_and_errors(tmp_path):
    with pytest.raises(UserError, match="no such shard folder"):
        list_splits(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no shards here"):
        list_splits(tmp_path)
    for name in ["zeta", "test", "alpha", "train"]:
        (tmp_path / name).mkdir()
        write_info(tmp_path / name, {"split": name})
    (tmp_path / "val").mkdir()  # no manifest: not a split
    assert list_splits(tmp_path) == ["train", "test", "alpha", "zeta"]


def test_split_info_reports_a_missing_shard(tmp_path, shards):
    out, _ = shards
    copy = tmp_path / "val"
    copy.mkdir()
    (copy / "_info.json").write_bytes((out / "val" / "_info.json").read_bytes())
    with pytest.raises(UserError, match="val-000000.tar listed in the manifest is missing"):
        split_info(copy)
    with pytest.raises(UserError, match="missing"):
        EvalShards(copy, batch_size=2)


# ---------------------------------------------------------------- round trip of hand-made records


def test_round_trip_keeps_labels_boxes_keys_groups(tmp_path):
    records = [
        Record("a0", image(seed=1), 0, [(1.25, 2.5, 10.75, 12.0)], group="cat/in", source="a0.png"),
        Record("a1", image(seed=2), 1, [(0.0, 0.0, 4.0, 4.0), (8.5, 9.125, 16.0, 16.0)], group="dog/out"),
        Record("a2", image(seed=3), 1, [], group="dog/in", attrs={"k": 1}),  # no box: kept
        Record("a3", image(seed=4), 0, [(3.0, 3.0, 5.0, 6.0)], group="cat/out"),
    ]
    summary = preprocess(HandMade(records), tmp_path, CF, shard_size=3, progress=False)
    assert summary[0].written == 4 and summary[0].skipped == []
    info = read_info(tmp_path / "train")
    assert [s["num_samples"] for s in info["shards"]] == [3, 1]
    assert info["groups"] == ["cat/in", "cat/out", "dog/in", "dog/out"]
    assert info["classes"] == ["cat", "dog"]
    paths = [tmp_path / "train" / s["name"] for s in info["shards"]]
    samples = list(iter_samples(paths, CF))
    assert [s["key"] for s in samples] == ["a0", "a1", "a2", "a3"]
    for s, r in zip(samples, records):
        assert s["label"] == r.label
        assert s["boxes"] == [list(b) for b in r.boxes]
        assert s["group"] == r.group
        # Stored at the source size: image and counterfactuals are exactly the JPEG of the fill.
        assert np.array_equal(s["image"], decode_rgb(encode_jpeg(r.image)))
        want_tile = fill_tile(r.image, r.boxes) if r.boxes else r.image
        want_mean = fill_mean(r.image, r.boxes) if r.boxes else r.image
        assert np.array_equal(s["cf"]["tile"], decode_rgb(encode_jpeg(want_tile)))
        assert np.array_equal(s["cf"]["mean"], decode_rgb(encode_jpeg(want_mean)))
    # The record without boxes: its cf slots hold the image itself, byte for byte.
    with tarfile.open(paths[0]) as tar:
        jpg = tar.extractfile("a2.jpg").read()
        assert tar.extractfile("a2.cf_tile.jpg").read() == jpg
        assert tar.extractfile("a2.cf_mean.jpg").read() == jpg
        meta = json.loads(tar.extractfile("a2.json").read())
        assert meta == {"label": 1, "boxes": [], "group": "dog/in", "split": "train", "source": "", "attrs": {"k": 1}}
        assert json.loads(tar.extractfile("a0.json").read())["source"] == "a0.png"
        assert "a0.mask.png" not in tar.getnames()


def test_resize_scales_boxes_to_stored_pixels(tmp_path):
    wide = image(32, 64, seed=5)  # 64 wide, 32 high -> 16x16
    records = [Record("w", wide, 1, [(8, 4, 40, 20)], group="g")]
    mask = np.zeros((32, 64), np.uint8)
    mask[4:20, 8:40] = 1
    records[0].mask = mask
    preprocess(HandMade(records), tmp_path, ["mean"], size=16, progress=False)
    (sample,) = iter_samples([tmp_path / "train" / "train-000000.tar"], ["mean"])
    assert sample["boxes"] == [[2.0, 2.0, 10.0, 10.0]]
    assert sample["image"].shape == (16, 16, 3)
    with tarfile.open(tmp_path / "train" / "train-000000.tar") as tar:
        stored = decode_gray(tar.extractfile("w.mask.png").read())
    expected = np.zeros((16, 16), np.uint8)
    expected[2:10, 2:10] = 255
    assert np.array_equal(stored, expected)


def test_encoded_image_sources_are_read(tmp_path):
    rgb = image(16, 16, seed=6)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    (tmp_path / "img.png").write_bytes(png)
    records = [
        Record("bytes", png, 0, [(1, 1, 5, 5)]),
        Record("path", str(tmp_path / "img.png"), 0, [(1, 1, 5, 5)]),
        Record("pathobj", tmp_path / "img.png", 0, [(1, 1, 5, 5)]),
    ]
    out = tmp_path / "out"
    preprocess(HandMade(records), out, ["tile"], progress=False)
    samples = list(iter_samples([out / "train" / "train-000000.tar"], ["tile"]))
    assert [s["key"] for s in samples] == ["bytes", "path", "pathobj"]
    for s in samples:
        assert np.array_equal(s["image"], decode_rgb(encode_jpeg(rgb)))


# ---------------------------------------------------------------- preprocess problems


def _bad_records(tmp: Path) -> tuple[list[Record], dict[str, str]]:
    (tmp / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    good = image(seed=9)
    records = [
        Record("good", good, 0, [(1, 1, 5, 5)], source="src-good"),
        Record("missing", str(tmp / "nope.jpg"), 0, [(1, 1, 5, 5)], source="src-missing"),
        Record("garbage", str(tmp / "garbage.jpg"), 0, [(1, 1, 5, 5)], source="src-garbage"),
        Record("garbage_bytes", b"\x00\x01 junk" * 20, 0, [(1, 1, 5, 5)], source="src-gb"),
        Record("outside", good, 0, [(20, 20, 30, 30)], source="src-outside"),
        Record("zero", good, 1, [(3, 3, 3, 9)], source="src-zero"),
        Record("badlabel", good, 2, [(1, 1, 5, 5)], source="src-label"),
        Record("neglabel", good, -1, [(1, 1, 5, 5)], source="src-neg"),
        Record("good", good, 1, [(2, 2, 6, 6)], source="src-dup"),
        Record("dot.key", good, 0, [(1, 1, 5, 5)], source="src-dot"),
        Record("badmask", good, 0, [(1, 1, 5, 5)], mask=np.zeros((8, 8), np.uint8), source="src-mask"),
        Record("nomaskfile", good, 0, [(1, 1, 5, 5)], mask=str(tmp / "nomask.png"), source="src-nomask"),
        Record("nobox", good, 1, [], source="src-nobox"),
    ]
    reasons = {
        "missing": "missing image file",
        "garbage": "unreadable image",
        "garbage_bytes": "unreadable image",
        "outside": "outside the 16x16 image",
        "zero": "zero area",
        "badlabel": "label 2 outside 0..1",
        "neglabel": "label -1 outside 0..1",
        "good": "duplicate key",
        "dot.key": "key contains",
        "badmask": "mask is 8x8, image is 16x16",
        "nomaskfile": "missing mask file",
    }
    return records, reasons


def test_bad_records_are_skipped_and_listed(tmp_path):
    records, reasons = _bad_records(tmp_path)
    out = tmp_path / "out"
    (summary,) = preprocess(HandMade(records), out, CF, progress=False)
    assert summary.written == 2
    skipped = summary.skipped
    assert [s["key"] for s in skipped] == [r.key for r in records[1:-1]]
    for entry, record in zip(skipped, records[1:-1]):
        assert entry["source"] == record.source
        assert reasons[entry["key"]] in entry["reason"], entry
    info = read_info(out / "train")
    assert info["skipped"] == skipped
    assert info["num_samples"] == 2
    (shard,) = info["shards"]
    assert shard["num_samples"] == 2
    samples = list(iter_samples([out / "train" / shard["name"]], CF))
    assert [(s["key"], s["label"], s["boxes"]) for s in samples] == [
        ("good", 0, [[1.0, 1.0, 5.0, 5.0]]),  # the first "good", not the duplicate
        ("nobox", 1, []),
    ]


@pytest.mark.parametrize(
    "key",
    ["missing", "garbage", "garbage_bytes", "outside", "zero", "badlabel", "good", "dot.key", "badmask", "nomaskfile"],
)
def test_strict_makes_the_first_bad_record_an_error(tmp_path, key):
    records, reasons = _bad_records(tmp_path)
    bad = [r for r in records[1:-1] if r.key == key][0]
    data = HandMade([records[0], bad, records[-1]])
    with pytest.raises(UserError) as caught:
        preprocess(data, tmp_path / "out", CF, strict=True, progress=False)
    message = str(caught.value)
    assert f"record {key} " in message
    assert bad.source in message
    assert reasons[key] in message


def test_strict_error_leaves_no_partial_shard(tmp_path):
    records, _ = _bad_records(tmp_path)
    data = HandMade([records[0], records[1]])  # "good" is written, then "missing" stops the run
    out = tmp_path / "out"
    with pytest.raises(UserError, match="record missing"):
        preprocess(data, out, CF, strict=True, progress=False)
    assert sorted(p.name for p in out.rglob("*.tmp")) == []


def test_empty_image_file_is_skipped_as_unreadable(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    records = [Record("empty", str(tmp_path / "empty.jpg"), 0, [(1, 1, 5, 5)]), Record("ok", image(), 0, [])]
    try:
        (summary,) = preprocess(HandMade(records), tmp_path / "out", CF, progress=False)
    except Exception as exc:  # noqa: BLE001 - reported as a plain failure (pytest cannot render cv2's traceback)
        pytest.fail(f"preprocess raised {type(exc).__name__}: {exc}")
    assert summary.written == 1
    assert [(s["key"], s["reason"]) for s in summary.skipped] == [("empty", "unreadable image")]


def test_box_wholly_beyond_the_edge_is_rejected():
    with pytest.raises(RecordError):
        check_box((16.2, 0, 16.8, 5), 16, 16)


def test_boxes_of_a_larger_copy_are_rescaled_and_those_of_another_shape_refused():
    record = Record(key="k", image="unused", label=0, boxes=[(2.0, 2.0, 6.0, 10.0)], boxes_size=(48, 40))
    assert source_boxes(record, 24, 20, None) == [(1.0, 1.0, 3.0, 5.0)]
    rotated = Record(key="k", image="unused", label=0, boxes=[(2.0, 2.0, 6.0, 10.0)], boxes_size=(40, 48))
    with pytest.raises(RecordError, match=r"^the annotation's image is 40x48, the file 24x20: another shape"):
        source_boxes(rotated, 24, 20, None)


def test_check_box_rules():
    assert check_box((-0.5, 0, 10, 16.5), 16, 16) == (0.0, 0.0, 10.0, 16.0)  # overhang <= 1 px is clipped
    assert check_box((1, 2, 3, 4), 16, 16) == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(RecordError, match="outside the 16x16 image"):
        check_box((-2, 0, 5, 5), 16, 16)
    with pytest.raises(RecordError, match="outside the 16x16 image"):
        check_box((0, 0, 5, 17.5), 16, 16)
    with pytest.raises(RecordError, match="zero area"):
        check_box((5, 5, 5, 9), 16, 16)
    with pytest.raises(RecordError, match=r"^box \[6, 5, 5, 9\] \(x0, y0, x1, y1\) ends before it starts: a negative width"):
        check_box((6, 5, 5, 9), 16, 16)  # inverted


def test_make_sample_parts():
    record = Record("k", image(), 1, [(1, 1, 5, 5)], mask=np.ones((16, 16), np.uint8), group="g")
    sample = make_sample(record, 2, 16, CF)
    assert sorted(sample) == ["__key__", "_source_side", "cf_mean.jpg", "cf_tile.jpg", "jpg", "json", "mask.png"]
    assert sample["__key__"] == "k" and sample["_source_side"] == 16  # taken out before the sample is written
    with pytest.raises(RecordError, match="label 1 outside 0..0"):
        make_sample(record, 1, 16, CF)


def test_unknown_fill_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown counterfactual fill 'nope'"):
        preprocess(HandMade([]), tmp_path, ["nope"], progress=False)
    assert not (tmp_path / "train").exists()


def test_existing_split_needs_overwrite(tmp_path):
    first = HandMade([Record(f"a{i}", image(seed=i), 0, []) for i in range(5)])
    second = HandMade([Record(f"b{i}", image(seed=i), 1, []) for i in range(2)])
    preprocess(first, tmp_path, ["mean"], shard_size=2, progress=False)
    (tmp_path / "other").mkdir()  # not one of the dataset's splits: left alone
    before = {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir()}
    with pytest.raises(UserError, match="already holds output.*--overwrite"):
        preprocess(second, tmp_path, ["mean"], shard_size=2, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir()} == before  # untouched
    preprocess(second, tmp_path, ["mean"], shard_size=2, overwrite=True, progress=False)
    info = read_info(tmp_path / "train")
    assert info["num_samples"] == 2
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["_info.json", "train-000000.tar"]
    assert shard_keys(tmp_path / "train" / "train-000000.tar") == ["b0", "b1"]
    assert (tmp_path / "other").is_dir()


# ---------------------------------------------------------------- reader helpers


def test_shard_order_depends_on_seed_and_epoch_only():
    names = [f"s{i}" for i in range(10)]
    order = shard_order(names, 5, 0)
    assert sorted(order) == names
    assert shard_order(list(names), 5, 0) == order
    assert shard_order(names, 5, 1) != order
    assert shard_order(names, 6, 0) != order
    assert sorted(shard_order(names, 5, 1)) == names


def test_shards_for_worker_and_batches_per_worker():
    names = list("abcdefg")
    assert shards_for_worker(names, 0, 3) == ["a", "d", "g"]
    assert shards_for_worker(names, 1, 3) == ["b", "e"]
    assert shards_for_worker(names, 2, 3) == ["c", "f"]
    # 5 shards over 2 workers: each gets >= 2; the two smallest hold 3 + 10 = 13 -> 3 batches of 4.
    assert batches_per_worker([10, 10, 10, 10, 3], 2, 4) == 3
    assert batches_per_worker([4] * 9 + [2], 4, 3) == 2  # two smallest: 2 + 4 = 6
    assert batches_per_worker([4, 4], 4, 1) == 0  # fewer shards than workers


def test_by_sample_when_the_shards_would_drop_a_tenth_of_the_batches():
    # 2,400 images in shards of 1000, 1000, 400 (preprocess's default size), 2 workers, batch 64:
    # by shard a worker may be dealt only the 400 (6 batches), by sample each gets 2400 // 128 = 18.
    assert batches_per_worker([1000, 1000, 400], 2, 64) == 6
    assert by_sample(3, 6, 18, 2) is True
    assert by_sample(8, 18, 18, 2) is False  # 8 shards of 300: 4 each, 18 batches either way
    assert by_sample(101, 95, 100, 16) is False  # 95% of the batches: shards are cheaper to read
    assert by_sample(101, 89, 100, 16) is True
    assert by_sample(3, 10, 10, 4) is True  # fewer shards than workers


def test_collate_pads_boxes():
    def sample(key, n_boxes, value):
        return {
            "key": key,
            "image": image(4, 5, seed=value),
            "cf": {"tile": image(4, 5, value=value)},
            "label": value % 2,
            "boxes": [[1.0, 1.0, 2.0 + i, 3.0] for i in range(n_boxes)],
            "group": f"g{value}",
        }

    samples = [sample("x", 0, 1), sample("y", 2, 2), sample("z", 1, 3)]
    batch = collate(samples)
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.images.shape == (3, 3, 4, 5) and batch.images.dtype == torch.uint8
    assert torch.equal(batch.images[1], torch.from_numpy(samples[1]["image"]).permute(2, 0, 1))
    assert batch.images.permute(0, 2, 3, 1).is_contiguous()  # as decoded: normalize transposes, not the loader
    assert batch.cf["tile"].shape == (3, 3, 4, 5) and int(batch.cf["tile"][2, 0, 0, 0]) == 3
    assert batch.labels.tolist() == [1, 0, 1] and batch.labels.dtype == torch.int64
    assert batch.boxes.shape == (3, 2, 4) and batch.boxes.dtype == torch.float32
    assert batch.boxes.tolist() == [
        [[0, 0, 0, 0], [0, 0, 0, 0]],
        [[1, 1, 2, 3], [1, 1, 3, 3]],
        [[1, 1, 2, 3], [0, 0, 0, 0]],
    ]
    assert batch.box_valid.tolist() == [[False, False], [True, True], [True, False]]
    assert batch.keys == ["x", "y", "z"] and batch.groups == ["g1", "g2", "g3"]
    no_boxes = collate([sample("n", 0, 4)])
    assert no_boxes.boxes.shape == (1, 1, 4) and not no_boxes.box_valid.any()


# ---------------------------------------------------------------- EvalShards


def test_eval_single_worker_reads_in_manifest_order(shards, synthetic):
    out, _ = shards
    batches = list(EvalShards(out / "val", batch_size=3).iter_worker(0, 1))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    records = list(synthetic.records("val"))
    assert keys_of(batches) == [r.key for r in records]
    assert [g for b in batches for g in b.groups] == [r.group for r in records]
    assert [l for b in batches for l in b.labels.tolist()] == [r.label for r in records]
    assert [bx for b in batches for bx in b.boxes[:, 0].tolist()] == [list(r.boxes[0]) for r in records]
    assert batches[0].cf == {}  # eval reads no counterfactuals
    assert batches[0].images.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("split", ["val", "test"])  # val: 3 shards, test: 2
@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (1, 4), (2, 3)])
def test_eval_reads_every_sample_exactly_once(shards, expected_keys, split, world, workers):
    out, _ = shards
    seen = []
    for rank in range(world):
        ds = EvalShards(out / split, batch_size=3, rank=rank, world_size=world)
        for worker in range(workers):
            batches = list(ds.iter_worker(worker, workers))
            assert all(1 <= len(b) <= 3 for b in batches)
            seen += keys_of(batches)
    assert sorted(seen) == sorted(expected_keys[split])
    assert len(seen) == len(expected_keys[split])


def test_eval_through_a_dataloader_with_two_workers(shards, expected_keys):
    out, _ = shards
    # test has 2 shards: one per worker; val has 3: one worker reads two.
    for split in ["test", "val"]:
        loader = make_loader(EvalShards(out / split, batch_size=4), num_workers=2)
        seen = keys_of(loader)
        assert Counter(seen) == Counter(expected_keys[split])


def test_eval_with_more_workers_than_shards_through_a_dataloader(tmp_path):
    data = HandMade([Record(f"r{i}", image(seed=i), i % 2, []) for i in range(3)])
    preprocess(data, tmp_path, [], shard_size=5, progress=False)  # one shard, two workers
    loader = make_loader(EvalShards(tmp_path / "train", batch_size=2), num_workers=2)
    # Shared out by sample: worker 0 reads r0 and r2 (one batch), worker 1 r1; the loader alternates.
    assert keys_of(loader) == ["r0", "r2", "r1"]


# ---------------------------------------------------------------- TrainShards


def _train_epoch(out, epoch, world=2, workers=2, batch=5):
    """Keys per (rank, worker) for one epoch, and each rank's dataset."""
    by_worker, datasets = {}, []
    for rank in range(world):
        ds = TrainShards(out / "train", batch, CF, SEED, rank=rank, world_size=world, num_workers=workers)
        ds.set_epoch(epoch)
        datasets.append(ds)
        for worker in range(workers):
            batches = list(ds.iter_worker(worker, workers))
            for b in batches:
                assert len(b) == batch
                assert b.images.shape == (batch, 3, 32, 32) and b.images.dtype == torch.uint8
                assert set(b.cf) == set(CF) and b.cf["tile"].shape == (batch, 3, 32, 32)
                assert b.boxes.shape == (batch, 1, 4) and b.box_valid.all()
            by_worker[(rank, worker)] = batches
    return by_worker, datasets


@pytest.mark.parametrize("epoch", [0, 1])
def test_train_two_ranks_two_workers_equal_batches_disjoint_samples(shards, epoch):
    out, _ = shards
    by_worker, datasets = _train_epoch(out, epoch)
    # 10 shards over 4 workers: each gets >= 2, the two smallest hold 2 + 4 = 6 -> 1 batch of 5,
    # as many as sharing out by sample gives (38 // 20), so the split is shared out by shard.
    for ds in datasets:
        assert len(ds) == 2 * 1 and not ds.by_sample
    assert {key: len(batches) for key, batches in by_worker.items()} == {
        (0, 0): 1,
        (0, 1): 1,
        (1, 0): 1,
        (1, 1): 1,
    }
    all_keys = [k for batches in by_worker.values() for k in keys_of(batches)]
    assert len(all_keys) == 4 * 1 * 5
    assert len(set(all_keys)) == len(all_keys)  # disjoint across ranks and workers
    # Each worker reads only the shards the shared (seed, epoch) order deals it.
    info = read_info(out / "train")
    names = shard_order([s["name"] for s in info["shards"]], SEED, epoch)
    for (rank, worker), batches in by_worker.items():
        mine = shards_for_worker(names, rank * 2 + worker, 4)
        allowed = {k for n in mine for k in shard_keys(out / "train" / n)}
        assert set(keys_of(batches)) <= allowed


def test_train_epoch_changes_the_order_the_same_way_on_all_ranks(shards):
    out, _ = shards
    info = read_info(out / "train")
    names = [s["name"] for s in info["shards"]]
    assert shard_order(names, SEED, 0) != shard_order(names, SEED, 1)
    epoch0, _ = _train_epoch(out, 0)
    epoch1, _ = _train_epoch(out, 1)
    assert {k: keys_of(v) for k, v in epoch0.items()} != {k: keys_of(v) for k, v in epoch1.items()}
    # Same epoch again: the same samples in the same order (deterministic from seed + epoch).
    again, _ = _train_epoch(out, 1)
    assert {k: keys_of(v) for k, v in again.items()} == {k: keys_of(v) for k, v in epoch1.items()}


def test_train_fewer_shards_than_workers_shares_the_samples_out(shards):
    out, _ = shards
    # test split: 2 shards (4 + 3 samples) for 2 ranks x 2 workers: by sample, 7 // (4 x 1) = 1 batch each.
    data = TrainShards(out / "test", 1, CF, SEED, rank=0, world_size=2, num_workers=2)
    assert (data.by_sample, data.workers, data.per_worker, len(data)) == (True, 2, 1, 2)
    # train split: 10 shards for 4 workers, but the two smallest (2 + 4) fill no batch of 7.
    data = TrainShards(out / "train", 7, CF, SEED, world_size=2, num_workers=2)
    assert (data.by_sample, data.per_worker) == (True, 1)  # 38 // (4 x 7)
    # Batch 3: by shard 6 // 3 = 2 batches a worker, by sample 38 // 12 = 3; 2 < 0.9 x 3 drops too much.
    assert TrainShards(out / "train", 3, CF, SEED, world_size=2, num_workers=2).by_sample is True
    # Batch 5: 1 batch a worker either way, and by shard no worker reads another's shards.
    assert TrainShards(out / "train", 5, CF, SEED, world_size=2, num_workers=2).by_sample is False


def test_train_too_few_samples_for_the_batch_is_a_user_error(shards):
    out, _ = shards
    with pytest.raises(UserError, match=r"38 samples are too few for batch 100 on 1 process\(es\); lower --batch$"):
        TrainShards(out / "train", 100, CF, SEED)
    with pytest.raises(UserError, match=r"too few for batch 10 on 4 process\(es\); lower --batch or run fewer processes$"):
        TrainShards(out / "train", 10, CF, SEED, world_size=4, num_workers=2)


def test_train_single_process_reads_full_batches(shards):
    out, _ = shards
    ds = TrainShards(out / "train", 5, CF, SEED)
    assert len(ds) == 7  # 38 // 5
    batches = list(ds)
    assert len(batches) == 7
    keys = keys_of(batches)
    assert len(set(keys)) == 35


def test_train_through_a_dataloader_with_two_workers(shards):
    out, _ = shards
    ds = TrainShards(out / "train", 3, CF, SEED, num_workers=2)
    # 10 shards over 2 workers: each gets 5, the 5 smallest hold 2 + 4*4 = 18 -> 6 batches each.
    assert len(ds) == 12
    loader = make_loader(ds, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(ds)
    keys = keys_of(batches)
    assert len(keys) == 36 and len(set(keys)) == 36
    ds.set_epoch(1)
    assert len(list(make_loader(ds, num_workers=2))) == len(ds)


# ---------------------------------------------------------------- batch decoding


def test_threaded_decoding_equals_serial_and_uses_the_helper_threads(shards, monkeypatch):
    out, _ = shards
    raws = list(iter_raw_samples(sorted((out / "train").glob("*.tar")), CF))[:10]
    serial = [decode_sample(raw, CF) for raw in raws]
    threads_seen = set()

    def recording(raw, cf_methods, num_classes=None):
        threads_seen.add(threading.current_thread().name.split("_")[0])
        return decode_sample(raw, cf_methods, num_classes)

    monkeypatch.setattr(reader, "decode_sample", recording)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller + 2 helpers: parts of 4, 4 and 2 samples
    try:
        threaded = decode_many(raws, CF)
    finally:
        torch.set_num_threads(previous)
    assert threads_seen == {"MainThread", "cfrobust-decode"}
    assert [s["key"] for s in threaded] == [s["key"] for s in serial]
    for mine, theirs in zip(threaded, serial):
        assert np.array_equal(mine["image"], theirs["image"])
        assert all(np.array_equal(mine["cf"][m], theirs["cf"][m]) for m in CF)
        assert (mine["label"], mine["boxes"], mine["group"]) == (theirs["label"], theirs["boxes"], theirs["group"])


def test_a_bad_sample_in_a_helper_thread_is_reported_by_the_caller(shards):
    out, _ = shards
    raws = list(iter_raw_samples(sorted((out / "train").glob("*.tar")), CF))[:8]
    del raws[7]["jpg"]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(UserError, match=rf"sample {raws[7]['__key__']} has no 'jpg' part"):
            decode_many(raws, CF)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: raw.update(jpg=b"\xff\xd8 not a jpeg"), "ValueError: unreadable image data"),
    (lambda raw: raw.update(json=b'{"label": 0, "boxes"'), "JSONDecodeError: Expecting"),
    (lambda raw: raw.update(json=b'{"label": 0, "boxes": []}'), "KeyError: 'group'"),
    (lambda raw: raw.update(json=b'{"label": 7, "boxes": [], "group": "g"}'), "label 7 is not one of the split's 2 classes"),
])
def test_a_damaged_sample_is_named_in_one_line(shards, damage, reason):
    out, _ = shards
    raw = next(iter_raw_samples(sorted((out / "train").glob("*.tar")), []))
    damage(raw)
    with pytest.raises(UserError) as caught:
        decode_sample(raw, [], num_classes=2)
    message = str(caught.value)
    assert message.startswith(f"{raw['__url__']}: sample {raw['__key__']}") and reason in message
    assert "\n" not in message


def test_a_shard_of_garbage_is_named_in_one_line(tmp_path):
    path = tmp_path / "train-000000.tar"
    path.write_bytes(bytes(range(1, 256)) * 4)
    with pytest.raises(UserError, match=rf"^{path}: not a readable tar at byte 512 \(invalid literal for int"):
        list(iter_raw_samples([path], []))


def test_training_batches_do_not_depend_on_the_decoding_threads(shards):
    out, _ = shards
    previous = torch.get_num_threads()
    found = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            batches = list(TrainShards(out / "train", 8, CF, SEED))
        finally:
            torch.set_num_threads(previous)
        found.append([(b.keys, b.images, b.cf["tile"], b.boxes) for b in batches])
    assert len(found[0]) == len(found[1]) == 4
    for (keys, images, tiles, boxes), (keys3, images3, tiles3, boxes3) in zip(*found):
        assert keys == keys3
        assert torch.equal(images, images3) and torch.equal(tiles, tiles3) and torch.equal(boxes, boxes3)


def test_loader_workers_decode_serially(monkeypatch):
    monkeypatch.setattr(reader, "get_worker_info", lambda: object())
    assert reader._decoder_pool() == (None, 1)


def test_a_manifest_that_counts_more_samples_than_the_tars_hold_is_named(shards, tmp_path):
    out, _ = shards
    split = tmp_path / "train"
    shutil.copytree(out / "train", split)
    info = json.loads((split / "_info.json").read_text())
    for shard in info["shards"]:
        shard["num_samples"] += 10
    (split / "_info.json").write_text(json.dumps(info))
    data = TrainShards(split, batch_size=4, cf_methods=[], seed=0)
    with pytest.raises(UserError, match=rf"^{split}: the shards hold fewer samples than _info.json counts"):
        list(data.iter_worker(0, 1))
