"""Write samples into fixed-size tar shards, each renamed into place only once complete."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable

from cfrobust.shards.schema import shard_name


class _HashingFile:
    """A write-only file that hashes what passes through it, so shards are not read twice."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class _TarStream:
    """Sample dicts -> tar members `KEY.EXT`, the layout WebDataset readers expect.

    Headers are built directly (GNU tar: ustar fields plus `././@LongLink` for names over 100
    bytes) with fixed metadata (mtime 0, mode 0444, uid/gid 0), so shards are byte-identical
    across runs; tarfile's generic path costs more per member than encoding a 64-px JPEG.
    """

    def __init__(self, fileobj):
        self.file = fileobj

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            self._member(f"{key}.{ext}".encode(), sample[ext])

    def close(self) -> None:
        self.file.write(bytes(2 * _BLOCK))  # end-of-archive marker

    def _member(self, name: bytes, data: bytes, kind: bytes = b"0") -> None:
        if len(name) > 100:
            self._member(b"././@LongLink", name + b"\0", kind=b"L")
            name = name[:100]
        self.file.write(_header(name, len(data), kind))
        self.file.write(data)
        self.file.write(bytes(-len(data) % _BLOCK))


_BLOCK = 512


def _header(name: bytes, size: int, kind: bytes) -> bytes:
    header = bytearray(_BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    header[156:157] = kind
    header[257:265] = b"ustar  \0"  # GNU magic + version
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Samples in, `<split>-NNNNNN.tar` files out; every shard but the last holds the same count.

    A shard is written as `NAME.tmp` and renamed when complete, so a crash never leaves a
    truncated file under a final name. `on_shard(entry)` runs after each rename (the resume
    journal); `first_index` continues the numbering of shards kept from an earlier run.
    """

    def __init__(
        self,
        split_dir: Path,
        split: str,
        samples_per_shard: int,
        first_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_shard: Callable[[dict], None] | None = None,
    ):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.split_dir = Path(split_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.next_index = first_index
        self.rank, self.world_size = rank, world_size
        self.on_shard = on_shard
        self.shards: list[dict] = []
        self._tar = None
        self._file = None
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    @property
    def pending(self) -> int:
        """Samples written to the shard in progress (not yet renamed into place)."""
        return self._count if self._tar is not None else 0

    def close(self) -> list[dict]:
        """Finish the last shard; return this writer's [{"name", "num_samples", "sha256"}]."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (after an error): no `.tmp` file is left behind."""
        if self._tar is None:
            return
        # Closing flushes, which fails again on a full disk: the shard is dropped either way.
        with contextlib.suppress(OSError):
            self._tar.close()
        with contextlib.suppress(OSError):
            self._file.close()
        self._temporary().unlink(missing_ok=True)
        self._tar = self._file = None

    def _name(self) -> str:
        return shard_name(self.split, self.next_index, self.rank, self.world_size)

    def _temporary(self) -> Path:
        return self.split_dir / (self._name() + ".tmp")

    def _open(self) -> None:
        self._file = _HashingFile(self._temporary())
        self._tar = _TarStream(self._file)
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._temporary(), self.split_dir / self._name())
        entry = {"name": self._name(), "num_samples": self._count, "sha256": self._file.sha256.hexdigest()}
        self.shards.append(entry)
        self.next_index += 1
        self._tar = self._file = None
        self._count = 0
        if self.on_shard is not None:
            self.on_shard(entry)
