"""Reading shard tars fast: members straight from their 512-byte headers, grouped into samples.

Python's tarfile parses each header through a general-purpose path that costs more than
decoding a 64-px JPEG; a training stream reads three members per image, so it does its own
minimal parsing here (regular files, GNU long names, pax `path` records). The files stay plain
WebDataset tars that any tar reader understands; `cfrobust shards verify` checks them strictly.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Collection, Iterator

from cfrobust.errors import UserError
from cfrobust.shards.remote import open_shard

if TYPE_CHECKING:
    from cfrobust.shards.remote import Remote

BLOCK = 512
# Sizes above this are checked against what is left of the file before they are read: a damaged
# header could claim terabytes. Below it a short read costs nothing, and `shards verify` finds it.
SUSPECT_SIZE = 64 << 20
_REGULAR = (b"0", b"\0", b"7")
_LONG_NAME = b"L"
_PAX = (b"x", b"g")


def header_fields(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a tar header block."""
    end = block.find(b"\0", 0, 100)
    name = block[:end if end >= 0 else 100]
    if block[345] and block[257:263] == b"ustar\0":  # POSIX: a prefix holds the leading directories
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    size_field = block[124:136]
    if size_field[0] & 0x80:  # GNU base-256 for sizes beyond 8 GiB
        size = int.from_bytes(size_field[1:], "big")
    else:
        size = int(size_field.strip(b"\0 ") or b"0", 8)
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def iter_members(stream: BinaryIO, wanted_exts: Collection[str] | None = None) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, extension, data) of each regular file of a tar stream, in order, its name split as
    WebDataset splits it: the key ends at the first dot of the last path component. With
    `wanted_exts`, the other members' payloads are skipped, not read, and come as None."""
    pending_name = None
    read = stream.read
    while True:
        block = read(BLOCK)
        if len(block) < BLOCK or (block[0] == 0 and not block.strip(b"\0")):
            return  # end-of-archive marker (or a short file: `shards verify` reports those)
        name, size, kind = header_fields(block)
        padded = size + (-size % BLOCK)
        if padded > SUSPECT_SIZE and padded > _file_size(stream) - stream.tell():
            raise ValueError(f"a member of {size} bytes runs past the end of the file")
        if kind in _REGULAR:
            head, slash, tail = (pending_name or name).rpartition("/")
            stem, _, ext = tail.partition(".")
            pending_name = None
            if wanted_exts is None or ext in wanted_exts:
                yield head + slash + stem, ext, read(padded)[:size]
            else:
                stream.seek(padded, 1)
                yield head + slash + stem, ext, None
        elif kind == _LONG_NAME:
            pending_name = read(padded)[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in _PAX:
            pending_name = _pax_path(read(padded)[:size]) or pending_name
        else:
            stream.seek(padded, 1)
            pending_name = None


def _file_size(stream) -> int:
    """The size of the file behind a stream: a local file's, or a remote one's as its server gave it."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, ValueError, io.UnsupportedOperation):
        size = getattr(getattr(stream, "raw", None), "size", None)
        return size if size is not None else SUSPECT_SIZE << 10


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        key, _, value = field.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def iter_tar_samples(path: "Path | Remote", wanted_exts: Collection[str] | None = None) -> Iterator[dict]:
    """WebDataset samples of one shard: {"__key__", "__url__", ext: bytes, ...}, consecutive
    members with the same key grouped; with `wanted_exts`, samples carry only those parts (a
    sample with none of them is still yielded, bare, so that its reader can name what is
    missing). A damaged header is reported as the file's fault in one line."""
    sample: dict = {}
    url = str(path)
    with open_shard(path) as stream:  # a local file, or a remote one streamed with retries
        try:
            for key, ext, data in iter_members(stream, wanted_exts):
                if not sample or sample["__key__"] != key:
                    if sample:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if data is not None:
                    sample[ext] = data
        except ValueError as exc:  # a size field that is not octal, or past the end: not a tar header
            raise UserError(f"{path}: not a readable tar at byte {stream.tell()} ({exc}); "
                            f"`cfrobust shards verify` checks every shard") from None
    if sample:
        yield sample
