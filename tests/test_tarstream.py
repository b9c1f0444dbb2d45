"""The fast shard reader agrees with tarfile and WebDataset on every kind of member name."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from cfrobust.errors import UserError
from cfrobust.shards.reader import iter_samples
from cfrobust.shards.tarstream import iter_tar_samples
from cfrobust.shards.writer import ShardWriter

MEMBERS = [("a/" + "k" * 150 + ".jpg", b"abc"), ("a/" + "k" * 150 + ".json", b"{}"), ("b.x.png", b"\x89"), ("c.jpg", b"z" * 700)]


def parts(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_members_of_tarfile_archives_group_as_webdataset_does(tmp_path, fmt):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    ours = list(iter_tar_samples(path))
    theirs = list(wds.tarfile_samples([{"url": str(path)}]))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] == ["a/" + "k" * 150, "b", "c"]
    assert [parts(s) for s in ours] == [parts(s) for s in theirs]
    assert parts(ours[1]) == {"x.png": b"\x89"}  # the key ends at the first dot


def test_our_writer_round_trips_long_keys(tmp_path):
    writer = ShardWriter(tmp_path, "t", 10)
    samples = [{"__key__": "k" * 120, "jpg": b"1" * 513, "json": b"{}"}, {"__key__": "s", "jpg": b""}]
    for sample in samples:
        writer.write(sample)
    writer.close()
    read = list(iter_tar_samples(tmp_path / "t-000000.tar"))
    assert [(s["__key__"], parts(s)) for s in read] == [(s["__key__"], parts(s)) for s in samples]
    with tarfile.open(tmp_path / "t-000000.tar") as archive:  # and any tar reader agrees
        assert archive.getnames() == ["k" * 120 + ".jpg", "k" * 120 + ".json", "s.jpg"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_wanted_extensions_skip_the_other_payloads(tmp_path, fmt):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in MEMBERS + [("a/" + "k" * 150 + ".png", b"p" * 600), ("d.json", b"[]")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    kept = list(iter_tar_samples(path, {"jpg", "json"}))
    # Long names of skipped members must not leak onto the next member, nor payloads shift;
    # samples made only of skipped parts stay, bare, so a reader can say what they lack.
    assert [(s["__key__"], parts(s)) for s in kept] == [
        ("a/" + "k" * 150, {"jpg": b"abc", "json": b"{}"}),
        ("b", {}),
        ("c", {"jpg": b"z" * 700}),
        ("a/" + "k" * 150, {}),
        ("d", {"json": b"[]"}),
    ]


def test_a_sample_with_only_unread_parts_is_named_by_the_reader(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("lonely.mask.png")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"png"))
    with pytest.raises(UserError, match=r"s\.tar: sample lonely has no 'jpg' part"):
        list(iter_samples([path], []))


@pytest.mark.parametrize("size_field", [b"77777777777\0", b"\xff" * 12])  # 8 GiB in octal; GNU base-256
def test_a_header_claiming_more_bytes_than_the_file_holds_is_named_in_one_line(tmp_path, size_field):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(path.read_bytes())
    data[124:136] = size_field
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^{path}: not a readable tar at byte 512 \(a member of \d+ bytes runs past the end"):
        list(iter_tar_samples(path))
