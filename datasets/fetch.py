"""Download the public datasets to a folder: resumable, checksummed, unpacked in place.

When a host cannot be reached the error says exactly which file to fetch by hand and where to
put it; a later run verifies and unpacks what it finds.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from cfrobust.errors import UserError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str | None = None  # None: not pinned; the digest seen first is recorded and then enforced

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1].split("?")[0]


# The datasets' public homes (DATASETS.md). Digests are not pinned here: this project was built
# without network access to these hosts. The first complete download records its digest in
# FILE.sha256 and every later run checks the file against it.
SOURCES: dict[str, list[Download]] = {
    "waterbirds": [
        Download("https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"),
        Download("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"),
        Download("https://data.caltech.edu/records/w9d68-gec53/files/segmentations.tgz"),
    ],
    # The release holds the test sets only (bg_challenge/<variant>/val); the training archives
    # (MadryLab/backgrounds_challenge README, "Training Data") unpack beside it as original/ and
    # no_fg/ (train/ + val/ each; no_fg gives the training masks). IN-9L's in9l.tar.gz is not
    # fetched here: the in9l adapter names it when it is missing.
    "in9": [
        Download("https://github.com/MadryLab/backgrounds_challenge/releases/download/data/backgrounds_challenge_data.tar.gz"),
        Download("https://www.dropbox.com/s/0vv2qsc4ywb4z5v/original.tar.gz?dl=1"),
        Download("https://www.dropbox.com/s/0v6w9k7q7i1ytvr/no_fg.tar.gz?dl=1"),
    ],
    "cct": [
        Download("https://lilablobssc.blob.core.windows.net/caltechcameratraps/eccv_18_annotations.tar.gz"),
        Download("https://lilablobssc.blob.core.windows.net/caltechcameratraps/eccv_18_all_images_sm.tar.gz"),
    ],
}

Opener = Callable[[urllib.request.Request], object]


def fetch(name: str, to: Path, opener: Opener | None = None, report=print) -> list[Path]:
    """Download (or find) every file of dataset `name` in `to`, verify it, unpack it."""
    if name not in SOURCES:
        raise UserError(f"no download known for {name!r}; choose one of {', '.join(SOURCES)}")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    opener = opener or (lambda request: urllib.request.urlopen(request, timeout=60))
    unreachable = []
    for item in SOURCES[name]:
        path = to / item.filename
        if path.exists():
            report(f"{path.name}: already here, verifying")
        elif not download(item, path, opener, report):
            unreachable.append(item.url)
            continue
        verify(item, path, report)
        unpack(path, to, report)
    if unreachable:
        raise UserError(
            f"cannot reach {', '.join(unreachable)}; download by hand into {to} (a .part file there "
            f"is resumed) and run this command again to verify and unpack"
        )
    return [to / item.filename for item in SOURCES[name]]


def download(item: Download, path: Path, opener: Opener, report) -> bool:
    """Fetch into FILE.part (resuming what a previous run left there), then rename to FILE.
    Returns False when the host cannot be reached."""
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(item.url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = opener(request)
    except (urllib.error.URLError, OSError) as exc:
        report(f"{path.name}: cannot reach the host ({getattr(exc, 'reason', exc)})")
        return False
    with response:
        resumed = start and getattr(response, "status", 200) == 206
        report(f"{path.name}: {'resuming at ' + str(start) + ' bytes' if resumed else 'downloading'}")
        expected = expected_size(response, start if resumed else 0)
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=expected, initial=out.tell(), unit="B", unit_scale=True, desc=path.name, disable=None
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if expected is not None and got != expected:  # the connection dropped: keep the part, resume later
        raise UserError(f"{path.name}: the host sent {got} of {expected} bytes; run this command again to resume")
    os.replace(part, path)
    return True


def expected_size(response, offset: int) -> int | None:
    """The whole file's size by the response's headers (None when it does not say)."""
    headers = getattr(response, "headers", None) or {}
    whole = (headers.get("Content-Range") or "").rpartition("/")[2]
    if whole.isdigit():
        return int(whole)
    length = headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(item: Download, path: Path, report) -> None:
    """Check the file against the pinned digest, or the one recorded at its first download."""
    actual = sha256_of(path)
    record = path.with_name(path.name + ".sha256")
    expected = item.sha256 or (record.read_text().split()[0] if record.exists() else None)
    if expected is None:
        record.write_text(f"{actual}  {path.name}\n")
        report(f"{path.name}: sha256 {actual} (recorded in {record.name})")
        return
    if actual != expected:
        raise UserError(f"{path}: sha256 {actual} does not match the expected {expected}; delete it and fetch again")
    report(f"{path.name}: sha256 ok")


def unpack(path: Path, to: Path, report) -> None:
    marker = to / f".unpacked-{path.name}"
    if marker.exists():
        return
    if not tarfile.is_tarfile(path):
        report(f"{path.name}: not an archive; kept as it is")
        return
    report(f"{path.name}: unpacking into {to}")
    with tarfile.open(path) as archive:
        # The "data" filter refuses absolute paths and links that leave `to` (Python >= 3.10.12).
        archive.extractall(to, filter="data")
    marker.touch()
