"""Write samples into fixed-size tar shards, each renamed into place only once complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import webdataset as wds

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


class ShardWriter:
    """Samples in, `<split>-NNNNNN.tar` files out; every shard but the last holds the same count.

    A shard is written as `NAME.tmp` and renamed when complete, so a crash never leaves a
    truncated file under a final name.
    """

    def __init__(self, split_dir: Path, split: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be at least 1")
        self.split_dir = Path(split_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
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

    def close(self) -> list[dict]:
        """Finish the last shard; return [{"name", "num_samples", "sha256"}] for the manifest."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (after an error): no `.tmp` file is left behind."""
        if self._tar is not None:
            name = shard_name(self.split, len(self.shards))
            try:
                self._tar.close()
            finally:
                self._file.close()
                (self.split_dir / (name + ".tmp")).unlink(missing_ok=True)
                self._tar = self._file = None

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file = _HashingFile(self.split_dir / (name + ".tmp"))
        # mtime=0 makes shards byte-identical across runs of the same input.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._count = 0

    def _finish(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tar.close()
        self._file.close()
        os.replace(self.split_dir / (name + ".tmp"), self.split_dir / name)
        self.shards.append({"name": name, "num_samples": self._count, "sha256": self._file.sha256.hexdigest()})
        self._tar = self._file = None
