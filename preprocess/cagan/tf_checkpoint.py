"""Read TensorFlow checkpoints (the V2 "tensor bundle" format of TF 1.x Savers and TF 2) without
TensorFlow, to import the released DeepFill v1 snapshots (`snap-XXXX.index` + `.data-*`).

The format, as TensorFlow writes it (tensor_bundle.proto / tensor_bundle.cc, and LevelDB's
table_format.md, which TF's table code follows):

- `<prefix>.index` is a LevelDB table of sorted keys. Its last 48 bytes are a footer: the
  metaindex and index block handles (varint offset, varint size), zero padding, and the magic
  number 0xdb4775248b80fb57. The index block maps a key >= each data block's last key (and
  < the next block's first) to that block's handle.
  A block holds prefix-compressed entries (varint shared, unshared and value lengths, the
  unshared key bytes, the value), then its restart offsets (uint32, entries stored with their
  full key) and their count; 5 bytes follow each block: compression type (TF writes 0, none)
  and a masked crc32c of block + type byte.
- The entry with the empty key is a BundleHeaderProto (num_shards, endianness, version); every
  other key is a variable name and its value a BundleEntryProto (dtype, shape, shard_id,
  offset, size, masked crc32c, and slices for partitioned variables).
- A tensor's bytes are `<prefix>.data-<shard_id:05d>-of-<num_shards:05d>`[offset, offset+size),
  C order, little-endian. A string tensor stores varint lengths, a masked crc32c of the lengths
  (as uint32), then the strings' bytes.

Checksums: every index block and every tensor is checked, whatever its size (a damaged
download then fails with the file's name instead of importing garbage weights). crc32c runs
vectorised with numpy at ~130 MB/s on the 2-core dev machine, against ~5 MB/s for a byte loop:
  python -m timeit -s "import os; from cfrobust.preprocess.cagan.tf_checkpoint import crc32c;
  d = os.urandom(16 << 20)" "crc32c(d)"         # 124 ms per 16 MB
so checking costs well under a second for DeepFill-sized checkpoints (tens of MB).

Supported dtypes: float16/32/64, bfloat16 (returned as float32), int8/16/32/64, uint8/16/32/64,
bool, complex64/128, and strings (returned as object arrays of `bytes`, shaped like the tensor;
TF 2 checkpoints hold one, `_CHECKPOINTABLE_OBJECT_GRAPH`). Not supported (a UserError when
read): resource/variant/quantized/float8/int4 tensors, partitioned (sliced) variables,
big-endian bundles, snappy-compressed indexes and the V1 format (one file, no `.index`).
"""

from __future__ import annotations

import codecs
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from cfrobust.errors import UserError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c

# TF DataType enum -> (name reported by list_tf_variables, little-endian numpy dtype read from disk).
DTYPES = {
    1: ("float32", "<f4"),
    2: ("float64", "<f8"),
    3: ("int32", "<i4"),
    4: ("uint8", "u1"),
    5: ("int16", "<i2"),
    6: ("int8", "i1"),
    7: ("string", None),
    8: ("complex64", "<c8"),
    9: ("int64", "<i8"),
    10: ("bool", "?"),
    14: ("bfloat16", "<u2"),  # upper half of a float32: widened on read
    17: ("uint16", "<u2"),
    18: ("complex128", "<c16"),
    19: ("float16", "<f2"),
    22: ("uint32", "<u4"),
    23: ("uint64", "<u8"),
}
UNSUPPORTED_DTYPES = {
    0: "invalid", 11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16",
    20: "resource", 21: "variant", 24: "float8_e5m2", 25: "float8_e4m3fn", 29: "int4", 30: "uint4",
}


# ---------------------------------------------------------------- crc32c (Castagnoli)


def _crc_tables() -> np.ndarray:
    """4 x 256 tables: row k advances the register over one byte followed by k zero bytes."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # reflected polynomial 0x82F63B78, one bit at a time for all 256 bytes
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    tables = [table]
    for _ in range(3):
        tables.append((tables[-1] >> 8) ^ table[tables[-1] & 0xFF])
    return np.stack(tables)


CRC_TABLES = _crc_tables()
_CRC_LIST = CRC_TABLES[0].tolist()
VECTOR_MIN_BYTES = 4096  # below this the plain loop beats numpy's per-call overhead (measured)


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """crc32c of `data`; pass a previous result as `crc` to extend it over more bytes."""
    return _crc_register(crc ^ 0xFFFFFFFF, memoryview(data).cast("B")) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """The "masked" crc LevelDB and TF store (a crc of data holding crcs is then less trivial)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def _crc_register(register: int, data: memoryview) -> int:
    """Run the crc register over `data`, many lanes at once.

    The update is linear over GF(2), so the data is cut into `lanes` chunks, each chunk's
    register is computed from 0 in one numpy pass over its 32-bit words (slicing by 4), and the
    chunks are chained with "advance over one chunk of zero bytes", a linear map found by
    running 32 extra lanes of zeros from the 32 unit registers (speed: module docstring).
    """
    size = len(data)
    if size < VECTOR_MIN_BYTES:
        return _crc_loop(register, data)
    lanes = max(1, 2 * math.isqrt(size // 4))  # ~ as many lanes as words per lane, x2 (measured)
    words = size // (4 * lanes)
    columns = np.zeros((words, lanes + 32), np.uint32)
    columns[:, :lanes] = np.frombuffer(data, "<u4", count=lanes * words).reshape(lanes, words).T
    registers = np.zeros(lanes + 32, np.uint32)
    registers[lanes:] = np.uint32(1) << np.arange(32, dtype=np.uint32)
    t0, t1, t2, t3 = CRC_TABLES
    byte, acc = np.empty_like(registers), np.empty_like(registers)
    for row in columns:  # in place: this loop is the whole cost
        np.bitwise_xor(registers, row, out=registers)
        np.bitwise_and(registers, 0xFF, out=byte)
        np.take(t3, byte, out=acc)
        for table, shift in ((t2, 8), (t1, 16)):
            np.right_shift(registers, shift, out=byte)
            np.bitwise_and(byte, 0xFF, out=byte)
            np.bitwise_xor(acc, table.take(byte), out=acc)
        np.right_shift(registers, 24, out=byte)
        np.bitwise_xor(acc, t0.take(byte), out=registers)
    advance = registers[lanes:]  # image of each register bit after one chunk of zero bytes
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1 == 1
    a0, a1, a2, a3 = (
        np.bitwise_xor.reduce(np.where(bits, advance[8 * k : 8 * k + 8], np.uint32(0)), axis=1).tolist()
        for k in range(4)
    )
    for chunk in registers[:lanes].tolist():
        low, high = register & 0xFFFF, register >> 16
        register = a0[low & 0xFF] ^ a1[low >> 8] ^ a2[high & 0xFF] ^ a3[high >> 8] ^ chunk
    return _crc_loop(register, data[4 * lanes * words :])


def _crc_loop(register: int, data: memoryview) -> int:
    table = _CRC_LIST
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


# ---------------------------------------------------------------- protobuf wire format


class _Corrupt(Exception):
    """A malformed structure; turned into a UserError naming the file by the caller."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the base-128 varint at `pos`."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Corrupt("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Field number -> values of a serialized message: ints for varint and fixed fields, bytes
    for length-delimited ones (strings, sub-messages). Unknown fields just come along."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):  # fixed64, fixed32
            width = 8 if wire_type == 1 else 4
            if pos + width > len(buf):
                raise _Corrupt("truncated fixed-width field")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Corrupt("truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list], number: int, default=0):
    return fields[number][-1] if number in fields else default  # proto3: the last value wins


# ---------------------------------------------------------------- LevelDB table (.index)


def _block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos


def _read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    """A block's contents, after checking its bounds, compression type and crc."""
    offset, size = handle
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table) - FOOTER_SIZE:
        raise _Corrupt(f"block [{offset}, {end}) runs past the end of the file")
    contents, compression = table[offset:end], table[end]
    stored = int.from_bytes(table[end + 1 : end + 5], "little")
    if unmask_crc(stored) != crc32c(table[offset : end + 1]):
        raise _Corrupt(f"crc32c mismatch in the block at byte {offset}")
    if compression == 1:
        raise _Corrupt("snappy-compressed block (TensorFlow never writes these; re-save the checkpoint)")
    if compression != 0:
        raise _Corrupt(f"unknown block compression type {compression}")
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of a block, keys rebuilt from their shared prefixes."""
    if len(block) < 4:
        raise _Corrupt("block too short")
    num_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 - 4 * num_restarts
    if num_restarts < 1 or entries_end < 0:
        raise _Corrupt("bad restart count")
    restarts = np.frombuffer(block, "<u4", count=num_restarts, offset=entries_end).tolist()
    full_key_offsets = set()  # entries stored with their whole key, where restarts may point
    entries, key, pos = [], b"", 0
    while pos < entries_end:
        start = pos
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > entries_end:
            raise _Corrupt(f"bad entry at block offset {start}")
        if shared == 0:
            full_key_offsets.add(start)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_length]))
        pos += value_length
    if not set(restarts) <= full_key_offsets:
        raise _Corrupt("a restart point is not at the start of a full-key entry")
    return entries


def _table_entries(table: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table file's contents, in key order."""
    if len(table) < FOOTER_SIZE:
        raise _Corrupt(f"file too short ({len(table)} bytes) to be an index")
    footer = table[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise _Corrupt("bad magic number: not a TensorFlow V2 checkpoint index")
    _, pos = _block_handle(footer, 0)  # metaindex: TF stores no filters there
    index_handle, _ = _block_handle(footer, pos)
    entries = []
    for _, handle_bytes in _block_entries(_read_block(table, index_handle)):
        handle, _ = _block_handle(handle_bytes, 0)
        entries += _block_entries(_read_block(table, handle))
    keys = [key for key, _ in entries]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise _Corrupt("keys out of order")
    return entries


# ---------------------------------------------------------------- tensor bundle


@dataclass(frozen=True)
class Entry:
    """Where and what one variable is (a BundleEntryProto)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked
    num_slices: int

    @property
    def dtype_name(self) -> str:
        if self.dtype in DTYPES:
            return DTYPES[self.dtype][0]
        return UNSUPPORTED_DTYPES.get(self.dtype, f"dtype{self.dtype}")


@dataclass(frozen=True)
class Bundle:
    prefix: str
    num_shards: int
    entries: dict[str, Entry]

    def data_path(self, shard_id: int) -> str:
        return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    fields = _proto_fields(buf)
    if _last(fields, 3):
        raise _Corrupt("tensor shape of unknown rank")
    dims = []
    for dim in fields.get(2, []):
        size = _last(_proto_fields(dim), 1)
        size = size - (1 << 64) if size >= 1 << 63 else size  # int64 two's complement
        if size < 0:
            raise _Corrupt(f"negative dimension {size}")
        dims.append(size)
    return tuple(dims)


def _parse_entry(name: str, value: bytes) -> Entry:
    fields = _proto_fields(value)
    return Entry(
        name=name,
        dtype=_last(fields, 1),
        shape=_parse_shape(_last(fields, 2, b"")),
        shard_id=_last(fields, 3),
        offset=_last(fields, 4),
        size=_last(fields, 5),
        crc32c=_last(fields, 6),
        num_slices=len(fields.get(7, [])),
    )


def _read_bundle(prefix: str) -> Bundle:
    index_path = f"{prefix}.index"
    try:
        table = Path(index_path).read_bytes()
    except OSError as error:
        raise UserError(f"cannot read TensorFlow checkpoint index {index_path}: {error.strerror}") from None
    try:
        entries = _table_entries(table)
        if not entries or entries[0][0] != b"":
            raise _Corrupt("no bundle header entry")
        header = _proto_fields(entries[0][1])
        num_shards = _last(header, 1)
        version = _proto_fields(_last(header, 3, b""))
        parsed = {}
        for key, value in entries[1:]:
            if key.startswith(b"\x00"):
                continue  # one slice of a partitioned variable; its full entry names it
            name = key.decode("utf-8", errors="backslashreplace")
            parsed[name] = _parse_entry(name, value)
    except _Corrupt as error:
        raise UserError(f"corrupt TensorFlow checkpoint index {index_path}: {error}") from None
    if _last(header, 2) == 1:
        raise UserError(f"{index_path}: checkpoint written on a big-endian machine; not supported")
    if _last(version, 2) > 1:
        newer = _last(version, 2)
        raise UserError(f"{index_path}: bundle format version {newer} is newer than this reader (1)")
    for entry in parsed.values():
        if entry.num_slices == 0 and not 0 <= entry.shard_id < num_shards:
            where = f"{entry.name} in shard {entry.shard_id} of {num_shards}"
            raise UserError(f"corrupt TensorFlow checkpoint index {index_path}: {where}")
    return Bundle(prefix, num_shards, parsed)


_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
# model_checkpoint_path: "snap-1000" (a text-format proto string: either quote, C escapes)
_CHECKPOINT_LINE = re.compile(
    r"""^\s*model_checkpoint_path\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')""", re.M
)


def resolve_prefix(path: str | os.PathLike) -> str:
    """The checkpoint prefix (`.../snap-1000`) named by a prefix, an `.index`, `.data-*` or
    `.meta` file, or a folder holding a TF `checkpoint` file (or a single `.index`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _prefix_in_folder(Path(path))
    prefix = _DATA_SUFFIX.sub("", path)
    for suffix in (".index", ".meta"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    if not os.path.isfile(f"{prefix}.index"):
        if os.path.isfile(path) and prefix == path:
            raise UserError(f"{path} is not a TensorFlow V2 checkpoint: no {prefix}.index next to it")
        raise UserError(f"no TensorFlow checkpoint at {path}: {prefix}.index does not exist")
    return prefix


def _prefix_in_folder(folder: Path) -> str:
    state = folder / "checkpoint"
    if not state.is_file():
        indexes = sorted(folder.glob("*.index"))
        if len(indexes) == 1:
            return str(indexes[0])[: -len(".index")]
        found = ", ".join(p.name for p in indexes) or "none"
        raise UserError(
            f"{folder} has no TensorFlow `checkpoint` file; pass one of its .index files: {found}"
        )
    match = _CHECKPOINT_LINE.search(state.read_text(errors="replace"))
    if not match:
        raise UserError(f"{state} has no model_checkpoint_path line")
    quoted = match.group(1) if match.group(1) is not None else match.group(2)
    named = codecs.escape_decode(quoted.encode())[0].decode("utf-8", errors="replace")
    candidates = [folder / named]
    if os.path.isabs(named):  # a path on the machine that trained it: also look next to the file
        candidates.append(folder / os.path.basename(named))
    for prefix in candidates:
        if Path(f"{prefix}.index").is_file():
            return str(prefix)
    raise UserError(f"{state} names checkpoint {named!r} but {candidates[-1]}.index does not exist")


# ---------------------------------------------------------------- tensors


def _decode_strings(buf: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The elements of a string tensor, and the bytes its entry crc covers: the lengths as
    little-endian uint32 (uint64 past 4 GB), the stored length checksum, then the strings."""
    lengths, pos = [], 0
    for _ in range(count):
        length, pos = _varint(buf, pos)
        lengths.append(length)
    packed = b"".join(n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little") for n in lengths)
    checksum, start = bytes(buf[pos : pos + 4]), pos + 4
    if start + sum(lengths) != len(buf):
        raise _Corrupt("string lengths do not add up to the tensor size")
    if unmask_crc(int.from_bytes(checksum, "little")) != crc32c(packed):
        raise _Corrupt("crc32c mismatch in the string lengths")
    ends = np.cumsum([start] + lengths).tolist()
    strings = [bytes(buf[a:b]) for a, b in zip(ends, ends[1:])]
    return strings, packed + checksum + bytes(buf[start:])


def _read_tensor(entry: Entry, buf: bytearray, data_path: str, index_path: str) -> np.ndarray:
    where = f"{data_path}, variable {entry.name}"
    count = math.prod(entry.shape)
    _, disk_dtype = DTYPES[entry.dtype]
    if disk_dtype is None:
        if entry.size == 0:  # as TF's reader: no bytes at all means empty strings
            return np.full(entry.shape, b"", dtype=object)
        try:
            strings, covered = _decode_strings(buf, count)
        except _Corrupt as error:
            raise UserError(f"corrupt TensorFlow checkpoint data {where}: {error}") from None
        if unmask_crc(entry.crc32c) != crc32c(covered):
            raise UserError(f"crc32c mismatch in {where}: the file is damaged")
        array = np.empty(len(strings), dtype=object)
        array[:] = strings
        return array.reshape(entry.shape)
    if entry.size != count * np.dtype(disk_dtype).itemsize:
        what = f"{entry.size} bytes for {entry.name}, a {entry.dtype_name} tensor of shape {entry.shape}"
        raise UserError(f"corrupt TensorFlow checkpoint index {index_path}: {what}")
    if unmask_crc(entry.crc32c) != crc32c(buf):
        raise UserError(f"crc32c mismatch in {where}: the file is damaged")
    array = np.frombuffer(buf, disk_dtype).reshape(entry.shape)
    if entry.dtype == 14:  # bfloat16: the top 16 bits of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _check_readable(bundle: Bundle, entry: Entry) -> None:
    index_path = f"{bundle.prefix}.index"
    if entry.num_slices:
        raise UserError(
            f"{index_path}: variable {entry.name} is partitioned into {entry.num_slices} slices; "
            "not supported (re-save it unpartitioned)"
        )
    if entry.dtype not in DTYPES:
        what = f"variable {entry.name} has dtype {entry.dtype_name}"
        raise UserError(f"{index_path}: {what}, which this reader does not support (pass names= without it)")


def list_tf_variables(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every variable's name -> (dtype name, shape), from the index alone. Partitioned variables
    are listed with their full shape (read_tf_checkpoint refuses them); bfloat16 is "bfloat16"."""
    bundle = _read_bundle(resolve_prefix(path))
    return {name: (entry.dtype_name, entry.shape) for name, entry in bundle.entries.items()}


def read_tf_checkpoint(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Every variable of a TensorFlow checkpoint (or only `names`) by full name -> array, each
    crc-checked. bfloat16 comes back as float32, strings as object arrays of bytes."""
    bundle = _read_bundle(resolve_prefix(path))
    wanted = list(bundle.entries) if names is None else list(names)
    missing = [name for name in wanted if name not in bundle.entries]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{bundle.prefix}.index has no variable {shown} (it has {len(bundle.entries)})")
    entries = [bundle.entries[name] for name in wanted]
    for entry in entries:
        _check_readable(bundle, entry)
    tensors = {}
    for shard_id in sorted({entry.shard_id for entry in entries}):
        data_path = bundle.data_path(shard_id)
        in_shard = [entry for entry in entries if entry.shard_id == shard_id]
        try:
            file = open(data_path, "rb")
        except OSError as error:
            what = f"{data_path} (holds {in_shard[0].name}): {error.strerror}"
            raise UserError(f"cannot read TensorFlow checkpoint data {what}") from None
        with file:
            file_size = os.fstat(file.fileno()).st_size
            for entry in sorted(in_shard, key=lambda e: e.offset):
                if entry.offset + entry.size > file_size:
                    raise UserError(
                        f"{data_path} is truncated: variable {entry.name} needs bytes "
                        f"[{entry.offset}, {entry.offset + entry.size}) of a {file_size}-byte file"
                    )
                file.seek(entry.offset)
                buf = bytearray(entry.size)
                file.readinto(buf)
                tensors[entry.name] = _read_tensor(entry, buf, data_path, f"{bundle.prefix}.index")
    return {name: tensors[name] for name in wanted}
