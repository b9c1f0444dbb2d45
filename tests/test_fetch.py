"""Dataset downloads without a network: a fake host that honours HTTP Range requests."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error

import pytest

import cfrobust.datasets.fetch as fetch_module
from cfrobust.datasets.fetch import Download, fetch
from cfrobust.errors import UserError


def make_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        payload = b"img_id,img_filename,y,split,place,place_filename\n" * 50
        info = tarfile.TarInfo("wb/metadata.csv")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


class Response(io.BytesIO):
    def __init__(self, data: bytes, status: int, headers: dict):
        super().__init__(data)
        self.status, self.headers = status, headers


class FakeHost:
    """Serves one file with HTTP's length headers; answers Range requests with 206 unless told
    to ignore them; with `cut_after`, the connection drops after that many bytes of a response."""

    def __init__(self, data: bytes, honour_range: bool = True, reachable: bool = True, cut_after: int | None = None):
        self.data, self.honour_range, self.reachable, self.cut_after = data, honour_range, reachable, cut_after
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        if not self.reachable:
            raise urllib.error.URLError("Name or service not known")
        wanted = request.get_header("Range")
        start, status = 0, 200
        headers = {"Content-Length": str(len(self.data))}
        if wanted and self.honour_range:
            start, status = int(wanted.split("=")[1].rstrip("-")), 206
            headers = {"Content-Length": str(len(self.data) - start),
                       "Content-Range": f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"}
        return Response(self.data[start:][: self.cut_after], status, headers)


@pytest.fixture
def one_file(monkeypatch):
    data = make_archive()
    monkeypatch.setitem(fetch_module.SOURCES, "toy", [Download("https://example.org/files/toy.tar.gz?dl=1")])
    return data


def test_download_verifies_records_digest_and_unpacks(tmp_path, one_file):
    host = FakeHost(one_file)
    paths = fetch("toy", tmp_path, opener=host, report=lambda _: None)
    assert paths == [tmp_path / "toy.tar.gz"]
    assert paths[0].read_bytes() == one_file
    digest = hashlib.sha256(one_file).hexdigest()
    assert (tmp_path / "toy.tar.gz.sha256").read_text() == f"{digest}  toy.tar.gz\n"
    assert (tmp_path / "wb" / "metadata.csv").read_bytes().startswith(b"img_id,")
    assert not (tmp_path / "toy.tar.gz.part").exists()
    # A second run downloads nothing and verifies against the recorded digest.
    fetch("toy", tmp_path, opener=host, report=lambda _: None)
    assert len(host.requests) == 1


def test_a_partial_download_is_resumed_with_a_range_request(tmp_path, one_file):
    (tmp_path / "toy.tar.gz.part").write_bytes(one_file[:100])
    host = FakeHost(one_file)
    fetch("toy", tmp_path, opener=host, report=lambda _: None)
    assert host.requests[0].get_header("Range") == "bytes=100-"
    assert (tmp_path / "toy.tar.gz").read_bytes() == one_file


def test_a_dropped_connection_keeps_the_part_and_the_next_run_resumes(tmp_path, one_file):
    half = len(one_file) // 2
    with pytest.raises(UserError, match=rf"^toy.tar.gz: the host sent {half} of {len(one_file)} bytes; run this command again"):
        fetch("toy", tmp_path, opener=FakeHost(one_file, cut_after=half), report=lambda _: None)
    assert not (tmp_path / "toy.tar.gz").exists() and not (tmp_path / "toy.tar.gz.sha256").exists()
    assert (tmp_path / "toy.tar.gz.part").read_bytes() == one_file[:half]
    host = FakeHost(one_file)
    fetch("toy", tmp_path, opener=host, report=lambda _: None)
    assert host.requests[0].get_header("Range") == f"bytes={half}-"
    assert (tmp_path / "toy.tar.gz").read_bytes() == one_file


def test_a_host_that_ignores_range_restarts_the_file(tmp_path, one_file):
    (tmp_path / "toy.tar.gz.part").write_bytes(b"stale bytes")
    fetch("toy", tmp_path, opener=FakeHost(one_file, honour_range=False), report=lambda _: None)
    assert (tmp_path / "toy.tar.gz").read_bytes() == one_file


def test_unreachable_host_says_what_to_download_by_hand(tmp_path, one_file):
    with pytest.raises(UserError) as caught:
        fetch("toy", tmp_path, opener=FakeHost(one_file, reachable=False), report=lambda _: None)
    message = str(caught.value)
    assert "cannot reach https://example.org/files/toy.tar.gz?dl=1" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []
    # The user downloads it by hand; the next run verifies and unpacks without the network.
    (tmp_path / "toy.tar.gz").write_bytes(one_file)
    fetch("toy", tmp_path, opener=FakeHost(one_file, reachable=False), report=lambda _: None)
    assert (tmp_path / "wb" / "metadata.csv").exists()


def test_a_corrupted_file_fails_the_recorded_digest(tmp_path, one_file):
    fetch("toy", tmp_path, opener=FakeHost(one_file), report=lambda _: None)
    damaged = bytearray(one_file)
    damaged[10] ^= 0xFF
    (tmp_path / "toy.tar.gz").write_bytes(bytes(damaged))
    with pytest.raises(UserError, match="does not match the expected"):
        fetch("toy", tmp_path, opener=FakeHost(one_file), report=lambda _: None)


def test_a_pinned_digest_is_enforced(tmp_path, monkeypatch, one_file):
    monkeypatch.setitem(fetch_module.SOURCES, "toy", [Download("https://example.org/toy.tar.gz", sha256="0" * 64)])
    with pytest.raises(UserError, match=f"sha256 {hashlib.sha256(one_file).hexdigest()} does not match"):
        fetch("toy", tmp_path, opener=FakeHost(one_file), report=lambda _: None)


def test_unknown_dataset():
    with pytest.raises(UserError, match="no download known for 'imagenet'"):
        fetch("imagenet", "/nonexistent")


# --- ImageNet-9: the test-set release and the training archives ------------------------------

IN9_RELEASE = "https://github.com/MadryLab/backgrounds_challenge/releases/download/data/backgrounds_challenge_data.tar.gz"
IN9_ORIGINAL = "https://www.dropbox.com/s/0vv2qsc4ywb4z5v/original.tar.gz?dl=1"
IN9_NO_FG = "https://www.dropbox.com/s/0v6w9k7q7i1ytvr/no_fg.tar.gz?dl=1"


def archive_of(names: list[str]) -> bytes:
    """A .tar.gz holding each named file (a few placeholder bytes: nothing here decodes them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"JPEG"))
    return buffer.getvalue()


class Hosts:
    """Several URLs, each served whole (no Range requests needed: nothing is resumed here)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requested = files, []

    def __call__(self, request):
        self.requested.append(request.full_url)
        data = self.files[request.full_url]
        return Response(data, 200, {"Content-Length": str(len(data))})


def test_in9_fetches_the_release_and_the_training_archives_into_one_layout(tmp_path):
    """The release unpacks to bg_challenge/ (test sets only), each training archive to its variant
    folder beside it; `--root` that folder then gives train/val from the archives, tests from the release."""
    from cfrobust.datasets.in9 import BackgroundsDataset

    assert [item.url for item in fetch_module.SOURCES["in9"]] == [IN9_RELEASE, IN9_ORIGINAL, IN9_NO_FG]
    release = [f"bg_challenge/{v}/val/00_dog/n1.JPEG" for v in ("original", "mixed_same", "mixed_rand")]
    hosts = Hosts({
        IN9_RELEASE: archive_of(release + ["bg_challenge/fg_mask/val/00_dog/n1.npy"]),
        IN9_ORIGINAL: archive_of(["original/train/00_dog/n2.JPEG", "original/val/00_dog/n1.JPEG"]),
        IN9_NO_FG: archive_of(["no_fg/train/00_dog/n2.JPEG", "no_fg/val/00_dog/n1.JPEG"]),
    })
    paths = fetch("in9", tmp_path, opener=hosts, report=lambda _: None)
    archives = ("backgrounds_challenge_data.tar.gz", "original.tar.gz", "no_fg.tar.gz")
    assert paths == [tmp_path / name for name in archives]
    assert hosts.requested == [IN9_RELEASE, IN9_ORIGINAL, IN9_NO_FG]
    dataset = BackgroundsDataset(tmp_path)
    assert dataset.describe()["splits"] == {
        "train": str(tmp_path / "original/train"),
        "val": str(tmp_path / "original/val"),
        "original": str(tmp_path / "bg_challenge/original/val"),
        "mixed_same": str(tmp_path / "bg_challenge/mixed_same/val"),
        "mixed_rand": str(tmp_path / "bg_challenge/mixed_rand/val"),
    }


def test_in9_unreachable_names_every_archive(tmp_path):
    with pytest.raises(UserError) as caught:
        fetch("in9", tmp_path, opener=FakeHost(b"", reachable=False), report=lambda _: None)
    assert str(caught.value) == (
        f"cannot reach {IN9_RELEASE}, {IN9_ORIGINAL}, {IN9_NO_FG}; download by hand into {tmp_path} (a .part file "
        f"there is resumed) and run this command again to verify and unpack")
