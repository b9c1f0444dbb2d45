"""`cfrobust shards verify` and `merge`: each kind of damage is made on purpose and must be named.

Shards come from the real pipeline (synthetic data, 16 px, 24/8/8 images in shards of 5) and
are copied per test before they are damaged; bad shards are written with the real ShardWriter.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfrobust.cli.shards import shards
from cfrobust.datasets import open_dataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.manifest import read_info, write_info
from cfrobust.shards.schema import INFO_NAME, part_info_name, shard_name
from cfrobust.shards import verify
from cfrobust.shards.verify import merge_parts, stray_files, verify_split
from cfrobust.shards.writer import ShardWriter

ALL_OK = ["train: OK, 5 shards, 24 samples", "val: OK, 2 shards, 8 samples", "test: OK, 2 shards, 8 samples"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("made") / "shards"
    dataset = open_dataset("synthetic", sizes=(24, 8, 8), image_size=16)
    preprocess(dataset, root, ["tile"], shard_size=5, progress=False)
    return root


@pytest.fixture
def root(made, tmp_path) -> Path:
    """A private copy of the shards, free to damage."""
    return Path(shutil.copytree(made, tmp_path / "shards"))


def run(*args):
    return CliRunner().invoke(shards, [str(a) for a in args])


def lines(text: str) -> list[str]:
    return text.splitlines()


def member(path: Path, index: int) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmembers()[index]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_samples(path: Path) -> list[dict]:
    """A shard's samples as writer input: {"__key__", ext: bytes}, in tar order."""
    samples: list[dict] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(m).read()
    return samples


def replace_shard(split_dir: Path, index: int, samples: list[dict], scratch: Path) -> None:
    """Write `samples` as shard `index` with the real writer and record its new hash in the
    manifest, so that only the damage inside the samples remains to be found."""
    scratch.mkdir()
    writer = ShardWriter(scratch, split_dir.name, len(samples))
    for sample in samples:
        writer.write(sample)
    (entry,) = writer.close()
    info = read_info(split_dir)
    shutil.move(scratch / entry["name"], split_dir / info["shards"][index]["name"])
    info["shards"][index]["sha256"] = entry["sha256"]
    write_info(split_dir, info)


# ---------------------------------------------------------------- verify: good shards, leftovers


def test_good_shards_pass_as_root_and_as_split_folder(root):
    result = run("verify", root)
    assert (result.exit_code, lines(result.output)) == (0, ALL_OK)
    result = run("verify", root / "val")
    assert (result.exit_code, lines(result.output)) == (0, ["val: OK, 2 shards, 8 samples"])
    assert verify_split(root / "train") == [] and stray_files(root / "train") == []


def test_leftover_tmp_and_unlisted_tar_are_warnings_only(root):
    (root / "train" / "train-000005.tar.tmp").write_bytes(b"half a shard")
    shutil.copy(root / "train" / "train-000000.tar", root / "train" / "old-000000.tar")
    result = run("verify", root)
    assert result.exit_code == 0
    assert lines(result.output) == [
        "warning: train/old-000000.tar: not listed in _info.json",
        "warning: train/train-000005.tar.tmp: temporary file left by an interrupted run",
        *ALL_OK,
    ]


# ---------------------------------------------------------------- verify: damaged shards


def test_shard_cut_in_half(root):
    path = root / "train" / "train-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a member boundary: Python's tarfile reads this without complaint
    result = run("verify", root)
    assert result.exit_code == 1
    assert lines(result.stdout) == [
        "train/train-000002.tar: truncated tar (ends before the end-of-archive marker)",
        *ALL_OK[1:],
    ]
    assert result.stderr == f"Error: 1 problem in {root}\n"


def test_shard_cut_inside_a_member(root):
    path = root / "val" / "val-000001.tar"
    cut = member(path, 5)
    path.write_bytes(path.read_bytes()[: cut.offset_data + 10])
    assert verify_split(root / "val") == [f"val/val-000001.tar: truncated tar (ends inside {cut.name})"]


def test_flipped_byte_in_a_jpeg_is_a_sha256_mismatch(root):
    path = root / "train" / "train-000001.tar"
    jpeg = member(path, 1)
    assert jpeg.name == "train_0000005.jpg"
    manifest_hash = sha256(path)
    flip_byte(path, jpeg.offset_data + jpeg.size // 2)
    result = run("verify", root / "train")
    assert result.exit_code == 1
    assert lines(result.stdout) == [
        f"train/train-000001.tar: sha256 mismatch (manifest {manifest_hash[:12]}..., file {sha256(path)[:12]}...)"
    ]


def test_corrupt_header_after_the_first_member(root):
    path = root / "test" / "test-000000.tar"
    header = member(path, 4).offset
    flip_byte(path, header + 3)  # tarfile would take this for the end of the archive
    expected = f"test/test-000000.tar: corrupt tar (bad header at byte {header}: bad checksum)"
    assert verify_split(root / "test") == [expected]


def test_listed_shard_missing(root):
    (root / "val" / "val-000001.tar").unlink()
    result = run("verify", root / "val")
    assert (result.exit_code, lines(result.stdout)) == (1, ["val/val-000001.tar: listed in _info.json but missing"])


def test_sample_lacking_a_counterfactual(root, tmp_path):
    split_dir = root / "train"
    samples = read_samples(split_dir / "train-000000.tar")
    del samples[2]["cf_tile.jpg"]
    replace_shard(split_dir, 0, samples, tmp_path / "scratch")
    result = run("verify", split_dir)
    assert result.exit_code == 1
    assert lines(result.stdout) == ["train/train-000000.tar: sample train_0000002 lacks cf_tile.jpg"]


def test_sample_with_incomplete_json(root, tmp_path):
    split_dir = root / "train"
    samples = read_samples(split_dir / "train-000003.tar")
    meta = json.loads(samples[0]["json"])
    del meta["boxes"], meta["group"]
    samples[0]["json"] = json.dumps(meta).encode()
    samples[1]["json"] = b"{not json"
    replace_shard(split_dir, 3, samples, tmp_path / "scratch")
    assert verify_split(split_dir) == [
        "train/train-000003.tar: sample train_0000015 json lacks boxes, group",
        "train/train-000003.tar: sample train_0000016 has unreadable json",
    ]


def test_shard_count_differs_from_manifest(root):
    info = read_info(root / "train")
    info["shards"][1]["num_samples"] = 6
    info["num_samples"] = 25  # kept consistent, so only the shard's own count is wrong
    write_info(root / "train", info)
    assert verify_split(root / "train") == ["train/train-000001.tar: holds 5 samples, manifest says 6"]


def test_manifest_total_differs_from_its_shards(root):
    info = read_info(root / "test")
    info["num_samples"] = 9
    write_info(root / "test", info)
    assert verify_split(root / "test") == ["test/_info.json: num_samples 9, but its shards add up to 8"]


def test_key_written_twice_in_a_split(root, tmp_path):
    split_dir = root / "train"
    samples = read_samples(split_dir / "train-000004.tar")
    samples[1]["__key__"] = "train_0000003"  # already in train-000000.tar
    replace_shard(split_dir, 4, samples, tmp_path / "scratch")
    assert verify_split(split_dir) == ["train/train-000004.tar: sample train_0000003 also in train-000000.tar"]


def test_many_bad_samples_are_summarised(root, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "SAMPLE_PROBLEMS_SHOWN", 2)
    split_dir = root / "train"
    samples = read_samples(split_dir / "train-000000.tar")
    for sample in samples:
        del sample["cf_tile.jpg"]
    replace_shard(split_dir, 0, samples, tmp_path / "scratch")
    assert verify_split(split_dir) == [
        "train/train-000000.tar: sample train_0000000 lacks cf_tile.jpg",
        "train/train-000000.tar: sample train_0000001 lacks cf_tile.jpg",
        "train/train-000000.tar: ... and 3 more sample problems",
    ]


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_repeated_parts_in_tars_of_other_writers(tmp_path, tar_format):
    path, key = tmp_path / "other.tar", "k" * 120  # past ustar's 100 bytes: a GNU or pax long-name header
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name in (f"{key}.jpg", f"{key}.json", f"{key}.jpg"):
            data = b'{"label": 0, "boxes": [], "group": "g"}'
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples, digest = verify.read_shard(path)
    assert [key for key, _ in samples] == [key] and digest == sha256(path)
    assert verify.sample_problems_of(key, samples[0][1], ["tile"], {}, "other.tar") == [
        f"sample {key} has jpg twice",
        f"sample {key} lacks cf_tile.jpg",
    ]


def test_missing_or_unreadable_manifest_is_one_error_line(root, tmp_path):
    result = run("verify", tmp_path / "nowhere")
    assert (result.exit_code, result.output) == (1, f"Error: {tmp_path / 'nowhere'}: no such shard folder\n")
    (root / "val" / INFO_NAME).write_text("{oops")
    result = run("verify", root / "val")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {root / 'val' / INFO_NAME}: unreadable manifest (")
    assert len(lines(result.output)) == 1


# ---------------------------------------------------------------- merge


def groups_in(path: Path) -> Counter:
    return Counter(json.loads(s["json"])["group"] for s in read_samples(path))


def split_into_parts(split_dir: Path, shards_per_rank: list[int], skipped: list[list[dict]]) -> list[dict]:
    """Turn a normal split folder into what len(shards_per_rank) processes would have left:
    renamed shards and one partial manifest each (written highest rank first), no _info.json."""
    info = read_info(split_dir)
    (split_dir / INFO_NAME).unlink()
    world_size, entries, renamed = len(shards_per_rank), iter(info["shards"]), []
    parts = []
    for rank, count in enumerate(shards_per_rank):
        mine = []
        for index in range(count):
            entry = next(entries)
            name = shard_name(info["split"], index, rank, world_size)
            (split_dir / entry["name"]).rename(split_dir / name)
            mine.append({**entry, "name": name})
        groups = sum((groups_in(split_dir / e["name"]) for e in mine), Counter())
        parts.append({
            **info,
            "rank": rank,
            "world_size": world_size,
            "shards": mine,
            "num_samples": sum(e["num_samples"] for e in mine),
            "groups": sorted(groups),
            "group_counts": dict(groups),
            "skipped": skipped[rank],
        })
        renamed += mine
    for part in reversed(parts):
        (split_dir / part_info_name(part["rank"], world_size)).write_text(json.dumps(part))
    return renamed


SKIPPED = [[{"key": "a", "source": "a.png", "reason": "unreadable image"}],
           [{"key": "b", "source": "b.png", "reason": "duplicate key"}, {"key": "c", "source": "c.png", "reason": "x"}]]


def test_merge_combines_parts_in_rank_order(root):
    split_dir = root / "train"
    original = read_info(split_dir)
    renamed = split_into_parts(split_dir, [3, 2], SKIPPED)
    assert [e["name"] for e in renamed] == ["train-r000-000000.tar", "train-r000-000001.tar", "train-r000-000002.tar",
                                            "train-r001-000000.tar", "train-r001-000001.tar"]
    expected = {**original, "shards": renamed, "skipped": SKIPPED[0] + SKIPPED[1]}
    assert merge_parts(split_dir) == expected
    assert read_info(split_dir) == expected
    written = (split_dir / INFO_NAME).read_bytes()
    assert merge_parts(split_dir) == expected  # the last rank and a user may both run it
    assert (split_dir / INFO_NAME).read_bytes() == written
    assert sorted(p.name for p in split_dir.glob("_info.r*")) == ["_info.r000-of-002.json", "_info.r001-of-002.json"]
    assert verify_split(split_dir) == [] and stray_files(split_dir) == []


def test_merged_split_reads_every_sample_once(root):
    from cfrobust.shards.reader import EvalShards  # torch: only this test pays for it

    split_dir = root / "train"
    split_into_parts(split_dir, [3, 2], [[], []])
    merge_parts(split_dir)
    keys = [key for batch in EvalShards(split_dir, batch_size=7).iter_worker(0, 1) for key in batch.keys]
    assert keys == [f"train_{i:07d}" for i in range(24)]


def test_merge_command_on_a_shard_root(root):
    split_into_parts(root / "val", [1, 1], [[], []])
    split_into_parts(root / "train", [3, 2], [[], []])
    result = run("merge", root)
    assert result.exit_code == 0, result.output
    assert lines(result.output) == [
        "train: merged 2 parts, 5 shards, 24 samples",
        "val: merged 2 parts, 2 shards, 8 samples",
    ]
    assert lines(run("verify", root).output) == ALL_OK


def test_merge_without_parts(root):
    assert merge_parts(root / "test") is None
    result = run("merge", root)
    assert (result.exit_code, result.output) == (
        1, f"Error: {root}: no partial manifests (_info.rNNN-of-NNN.json) here or in its split folders\n")


def test_merge_refuses_missing_ranks(root):
    split_dir = root / "train"
    split_into_parts(split_dir, [1, 1, 2, 1], [[], [], [], []])
    (split_dir / part_info_name(1, 4)).unlink()
    (split_dir / part_info_name(3, 4)).unlink()
    with pytest.raises(UserError) as caught:
        merge_parts(split_dir)
    assert str(caught.value) == (
        f"{split_dir}: rank(s) 1, 3 of 4 have not written their partial manifest "
        f"(_info.r001-of-004.json, _info.r003-of-004.json); wait for them or rerun them"
    )
    assert not (split_dir / INFO_NAME).exists()
    result = run("merge", split_dir)
    assert (result.exit_code, result.output) == (1, f"Error: {caught.value}\n")


def test_merge_refuses_parts_that_disagree(root):
    split_dir = root / "train"
    split_into_parts(split_dir, [3, 2], [[], []])
    part = json.loads((split_dir / part_info_name(1, 2)).read_text())
    part["cf_methods"] = ["tile", "mean"]
    (split_dir / part_info_name(1, 2)).write_text(json.dumps(part))
    with pytest.raises(UserError) as caught:
        merge_parts(split_dir)
    assert str(caught.value) == (
        f"{split_dir}: partial manifests disagree on cf_methods: ['tile'] (rank 0) vs ['tile', 'mean'] (rank 1)"
    )
    assert not (split_dir / INFO_NAME).exists()


def test_merge_refuses_a_missing_shard(root):
    split_dir = root / "val"
    split_into_parts(split_dir, [1, 1], [[], []])
    (split_dir / "val-r001-000000.tar").unlink()
    with pytest.raises(UserError, match="shard val-r001-000000.tar listed in a partial manifest is missing$"):
        merge_parts(split_dir)


def test_verify_points_an_unmerged_split_to_merge(root):
    split_into_parts(root / "val", [1, 1], [[], []])
    result = run("verify", root / "val")
    assert (result.exit_code, result.output) == (
        1, f"Error: {root / 'val'}: only partial manifests here; run `cfrobust shards merge {root / 'val'}` first\n")


def test_verify_of_a_root_names_splits_that_lost_or_never_got_their_manifest(root):
    split_into_parts(root / "val", [1, 1], [[], []])  # an unmerged multi-process split
    shutil.copytree(root / "train", root / "extra")
    (root / "extra" / "_info.json").unlink()  # shards of an interrupted run
    (root / "notes").mkdir()  # a folder of anything else is none of verify's business
    result = run("verify", root)
    assert result.exit_code == 1
    assert lines(result.output) == [
        f"val: partial manifests but no _info.json; run `cfrobust shards merge {root}` once every process has finished",
        "extra: shards but no _info.json (an interrupted preprocess? run it again with --resume)",
        *[line for line in ALL_OK if not line.startswith("val:")],
        f"Error: 2 problems in {root}",
    ]
