"""Reading TensorFlow V2 checkpoints without TensorFlow, on real checkpoints that TF 2.21 wrote
(tests/fixtures/tf_bundle/, made by tests/fixtures/make_tf_checkpoint_fixture.py with the values
TF's own reader returned), and on damaged copies of them made here.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cfrobust.errors import UserError
from cfrobust.preprocess.cagan import tf_checkpoint as tfc
from cfrobust.preprocess.cagan.tf_checkpoint import crc32c, list_tf_variables, read_tf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "tf_bundle"
SAVER = FIXTURES / "saver"


def load_expected(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (TF dtype name, value) from expected.npz (layout: the fixture script's docstring)."""
    with np.load(folder / "expected.npz") as stored:
        names = bytes(stored["names"]).decode().split("\n")
        dtypes = bytes(stored["dtypes"]).decode().split("\n")
        ranks, dims, sizes = stored["ranks"].tolist(), stored["dims"].tolist(), stored["sizes"].tolist()
        data, string_lengths = bytes(stored["data"]), stored["string_lengths"].tolist()
    expected, dim_at, byte_at, string_at = {}, 0, 0, 0
    for name, dtype, rank, size in zip(names, dtypes, ranks, sizes):
        shape = tuple(dims[dim_at : dim_at + rank])
        dim_at += rank
        chunk, byte_at = data[byte_at : byte_at + size], byte_at + size
        if dtype == "string":
            count = int(np.prod(shape))
            ends = np.cumsum([0] + string_lengths[string_at : string_at + count]).tolist()
            string_at += count
            value = np.empty(count, dtype=object)
            value[:] = [chunk[a:b] for a, b in zip(ends, ends[1:])]
        else:
            stored_as = np.dtype("float32" if dtype == "bfloat16" else dtype).newbyteorder("<")
            value = np.frombuffer(chunk, stored_as)
        expected[name] = (dtype, value.reshape(shape))
    return expected


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.fixture
def multiblock(tmp_path) -> Path:
    """The multi-block checkpoint with its index un-gzipped (committed gzipped: 1 MB raw)."""
    folder = copy_of(FIXTURES / "multiblock", tmp_path)
    (folder / "snap-1.index").write_bytes(gzip.decompress((folder / "snap-1.index.gz").read_bytes()))
    return folder


def assert_matches_expected(tensors: dict, expected: dict) -> None:
    assert sorted(tensors) == sorted(expected)
    for name, (dtype, want) in expected.items():
        got = tensors[name]
        assert got.shape == want.shape, name
        if dtype == "string":
            assert got.dtype == object and got.tolist() == want.tolist(), name
        else:
            assert got.dtype == np.dtype("float32" if dtype == "bfloat16" else dtype), name
            assert got.tobytes() == want.astype(got.dtype).tobytes(), name  # bit-exact, -0.0 included


# ---------------------------------------------------------------- crc32c


def test_crc32c_known_vectors_and_extension():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(b"") == 0
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283
    assert tfc.unmask_crc(tfc.mask_crc(0xE3069283)) == 0xE3069283 != tfc.mask_crc(0xE3069283)


@pytest.mark.parametrize("size", [4096, 4099, 10_007, 65_536, 200_003])
def test_vectorised_crc32c_equals_the_byte_loop(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert size >= tfc.VECTOR_MIN_BYTES  # the numpy path runs
    assert crc32c(data) == tfc._crc_loop(0xFFFFFFFF, memoryview(data)) ^ 0xFFFFFFFF
    assert crc32c(data[size // 3 :], crc32c(data[: size // 3])) == crc32c(data)


def test_vectorised_crc32c_on_tiny_inputs(monkeypatch):
    monkeypatch.setattr(tfc, "VECTOR_MIN_BYTES", 0)
    data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    for size in [0, 1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 299]:
        assert crc32c(data[:size]) == tfc._crc_loop(0xFFFFFFFF, memoryview(data[:size])) ^ 0xFFFFFFFF, size
    assert crc32c(b"123456789") == 0xE3069283


# ---------------------------------------------------------------- real checkpoints


@pytest.mark.parametrize("name", ["saver", "sharded", "tf2"])
def test_every_variable_equals_what_tensorflow_read(name):
    folder = FIXTURES / name
    expected = load_expected(folder)
    assert_matches_expected(read_tf_checkpoint(folder), expected)
    listed = list_tf_variables(folder)
    assert listed == {name: (dtype, value.shape) for name, (dtype, value) in expected.items()}


def test_saver_fixture_covers_every_dtype_and_rank():
    listed = list_tf_variables(SAVER)
    assert len(listed) == 338
    assert {dtype for dtype, _ in listed.values()} == {
        "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
        "uint16", "bool", "complex64", "complex128", "string",
    }
    assert listed["global_step"] == ("int64", ())
    assert listed["inpaint_net/stage_3/conv159/kernel"] == ("float32", (3, 3, 1, 2))
    assert listed["inpaint_net/empty"] == ("float32", (0, 3))
    some = ["global_step", "inpaint_net/labels", "inpaint_net/bf16/kernel"]
    tensors = read_tf_checkpoint(SAVER, names=some)
    assert list(tensors) == some
    assert tensors["global_step"] == 1000
    assert tensors["inpaint_net/labels"].tolist() == [b"", b"cat", b"\xff\x00z" * 70]


def test_tf2_checkpoint_keeps_object_graph_keys():
    tensors = read_tf_checkpoint(FIXTURES / "tf2")
    assert tensors["inpaint_net/conv1/kernel/.ATTRIBUTES/VARIABLE_VALUE"].shape == (5, 5, 3, 4)
    assert tensors["save_counter/.ATTRIBUTES/VARIABLE_VALUE"] == 1
    graph = tensors["_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert graph.shape == () and isinstance(graph.item(), bytes) and b"inpaint_net" in graph.item()


def data_block_handles(table: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each data block of an index, from its footer and index block."""
    footer = table[-tfc.FOOTER_SIZE :]
    _, pos = tfc._block_handle(footer, 0)
    index_handle, _ = tfc._block_handle(footer, pos)
    index_block = tfc._block_entries(tfc._read_block(table, index_handle))
    return [tfc._block_handle(handle, 0)[0] for _, handle in index_block]


def test_index_spanning_several_blocks_and_restart_points(multiblock):
    assert len(data_block_handles((multiblock / "snap-1.index").read_bytes())) >= 4
    assert_matches_expected(read_tf_checkpoint(multiblock), load_expected(multiblock))
    saver_table = (SAVER / "snap-1000.index").read_bytes()
    [handle] = data_block_handles(saver_table)  # TF's blocks are 256 KB: one for 338 entries
    assert int.from_bytes(tfc._read_block(saver_table, handle)[-4:], "little") == 22  # restarts


def test_the_four_path_forms(tmp_path):
    expected = load_expected(SAVER)
    for path in [
        SAVER / "snap-1000",
        str(SAVER / "snap-1000.index"),
        SAVER / "snap-1000.data-00000-of-00001",
        SAVER,  # its `checkpoint` file says "snap-1000"
        SAVER / "snap-1000.meta",  # the graph file TF 1 saves beside them (not committed here)
    ]:
        assert_matches_expected(read_tf_checkpoint(path), expected)
    folder = copy_of(SAVER, tmp_path)
    (folder / "checkpoint").write_text(f'model_checkpoint_path: "{folder / "snap-1000"}"\n')
    assert_matches_expected(read_tf_checkpoint(folder), expected)
    # An absolute path from the machine that trained it: the file next to `checkpoint` is used.
    (folder / "checkpoint").write_text('model_checkpoint_path: "/home/someone/model_logs/snap-1000"\n')
    assert list_tf_variables(folder) == list_tf_variables(SAVER)
    (folder / "checkpoint").unlink()  # no `checkpoint` file, a single .index: that one
    assert list_tf_variables(folder) == list_tf_variables(SAVER)


# ---------------------------------------------------------------- what users can get wrong


def user_error(path, match: str, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as caught:
        read_tf_checkpoint(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def rewrite_first_block(index: Path, edit) -> None:
    """Apply `edit` to the first data block's bytes (header entry first) and fix its crc."""
    table = bytearray(index.read_bytes())
    offset, size = data_block_handles(bytes(table))[0]
    edit(table, offset, size)
    crc = tfc.mask_crc(crc32c(table[offset : offset + size + 1]))  # the block and its type byte
    table[offset + size + 1 : offset + size + 5] = crc.to_bytes(4, "little")
    index.write_bytes(bytes(table))


def test_corrupt_index_byte_fails_its_crc(tmp_path):
    folder = copy_of(SAVER, tmp_path)
    index = folder / "snap-1000.index"
    table = bytearray(index.read_bytes())
    table[len(table) // 2] ^= 0x01
    index.write_bytes(bytes(table))
    message = user_error(folder, "crc32c mismatch")
    assert str(index) in message
    with pytest.raises(UserError, match="crc32c mismatch"):
        list_tf_variables(index)


def test_bad_magic_and_truncated_index(tmp_path):
    folder = copy_of(SAVER, tmp_path)
    index = folder / "snap-1000.index"
    table = index.read_bytes()
    index.write_bytes(table[:-1] + b"\x00")
    assert str(index) in user_error(index, "bad magic number")
    index.write_bytes(table[:-100])  # the footer is now somewhere in the entries
    assert str(index) in user_error(index, "corrupt TensorFlow checkpoint index")
    index.write_bytes(table[:30])
    assert str(index) in user_error(index, "too short")


def test_truncated_missing_and_damaged_data_file(tmp_path):
    folder = copy_of(SAVER, tmp_path)
    data = folder / "snap-1000.data-00000-of-00001"
    contents = data.read_bytes()
    data.write_bytes(contents[:-10])
    message = user_error(folder, "is truncated: variable ")
    assert str(data) in message
    flipped = bytearray(contents)
    flipped[100] ^= 0x40
    data.write_bytes(bytes(flipped))
    assert str(data) in user_error(folder, r"crc32c mismatch in .*, variable inpaint_net/")
    data.unlink()
    assert str(data) in user_error(folder, "cannot read TensorFlow checkpoint data")
    assert list_tf_variables(folder) == list_tf_variables(SAVER)  # the index alone still lists
    sharded = copy_of(FIXTURES / "sharded", tmp_path)
    os.remove(sharded / "snap-5.data-00001-of-00002")
    user_error(sharded, r"snap-5\.data-00001-of-00002 \(holds inpaint_net/device1/")
    assert len(read_tf_checkpoint(sharded, names=["inpaint_net/device0/conv0/kernel"])) == 1


def test_missing_checkpoint_paths(tmp_path):
    user_error(tmp_path / "snap-7", r"snap-7\.index does not exist")
    user_error(tmp_path / "snap-7.data-00000-of-00001", r"snap-7\.index does not exist")
    v1 = tmp_path / "model.ckpt"
    v1.write_bytes(b"not a bundle")
    user_error(v1, "not a TensorFlow V2 checkpoint")
    user_error(tmp_path, "no TensorFlow `checkpoint` file")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "snap-9"\n')
    user_error(tmp_path, "names checkpoint 'snap-9'")
    user_error(SAVER, "has no variable nope", names=["global_step", "nope"])


def test_partitioned_variable_is_refused_by_name():
    folder = FIXTURES / "partitioned"
    assert list_tf_variables(folder) == {
        "inpaint_net/part/kernel": ("float32", (6, 2)),
        "inpaint_net/whole/bias": ("float32", (2,)),
    }
    message = user_error(folder, "variable inpaint_net/part/kernel is partitioned into 3 slices")
    assert "snap-1.index" in message
    whole = read_tf_checkpoint(folder, names=["inpaint_net/whole/bias"])
    assert whole["inpaint_net/whole/bias"].shape == (2,)


def test_big_endian_and_snappy_blocks_are_refused(tmp_path):
    folder = copy_of(SAVER, tmp_path)
    index = folder / "snap-1000.index"
    header = b"\x08\x01\x1a\x02\x08\x01"  # num_shards 1, version {producer 1}, as TF writes it

    def big_endian(table, offset, size):
        at = table.index(header, offset)
        table[at : at + 6] = b"\x08\x01\x10\x01\x1a\x00"  # same length: endianness BIG, version {}

    rewrite_first_block(index, big_endian)
    user_error(folder, "big-endian")
    shutil.copy(SAVER / "snap-1000.index", index)
    rewrite_first_block(index, lambda table, offset, size: table.__setitem__(offset + size, 1))
    user_error(folder, "snappy")
