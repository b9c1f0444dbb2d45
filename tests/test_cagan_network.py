"""The CAGAN (DeepFill v1) generator: contextual attention, shapes, per-image masks, the import
of TensorFlow checkpoints (against tests/fixtures/cagan_tf, made by TensorFlow itself) and
cfrobust's weight files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cfrobust.errors import UserError
from cfrobust.preprocess.cagan.attention import contextual_attention, resize_nearest, same_padding
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.preprocess.cagan.weights import (
    generator_state_from_tf,
    load_generator,
    save_weights,
    tf_variable_name,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cagan_tf"
TF_TOLERANCE = 1e-4  # float32 TF vs torch, max abs, on outputs in [-1, 1]


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def rectangle_mask(size: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., top:bottom, left:right] = 1
    return mask


@pytest.fixture(scope="module")
def fixture_io():
    return dict(np.load(FIXTURE / "io.npz"))


@pytest.fixture(scope="module")
def tf_variables():
    if importlib.util.find_spec("cfrobust.preprocess.cagan.tf_checkpoint") is None:
        pytest.skip("cfrobust.preprocess.cagan.tf_checkpoint (the TF checkpoint reader) is not there yet")
    from cfrobust.preprocess.cagan.tf_checkpoint import read_tf_checkpoint

    return read_tf_checkpoint(str(FIXTURE / "model"))


def tf_layout(generator: Generator) -> dict[str, np.ndarray]:
    """The generator's weights as a TF checkpoint names and shapes them (kernels HWIO)."""
    variables = {}
    for key, value in generator.state_dict().items():
        array = value.numpy()
        variables[tf_variable_name(key)] = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    return variables


# --- TF conventions -------------------------------------------------------------------------


def test_tf_conventions_for_padding_and_nearest_resize():
    assert same_padding(64, 3, stride=2) == (0, 1)  # TF pads the leftover at the bottom/right
    assert same_padding(16, 3, dilation=16) == (16, 16)
    assert same_padding(64, 4, stride=2) == (1, 1)
    rows = torch.arange(16.0).view(1, 1, 16, 1)
    # Values TF1 resize_nearest_neighbor(align_corners=True) gives (torch's would be 0,2,...,14).
    assert resize_nearest(rows, (8, 1)).flatten().tolist() == [0, 2, 4, 6, 9, 11, 13, 15]
    assert resize_nearest(torch.arange(8.0).view(1, 1, 8, 1), (16, 1)).flatten().tolist() == [
        i // 2 for i in range(16)
    ]


# --- contextual attention -------------------------------------------------------------------


def test_attention_pastes_the_exact_background_copy_into_the_hole():
    # Features constant on 2x2 blocks, so the 1/2-resolution matching grid sees `grid` exactly.
    # Around the hole (grid rows/cols 10..13, with a margin of 2) the features are an exact copy
    # of the top-left background region (shift 8, 8): that patch matches with cosine 1 and every
    # other patch with random Gaussian cosines, so the scaled softmax is one-hot.
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(1, 8, 16, 16, generator=gen)
    grid[..., 8:16, 8:16] = grid[..., 0:8, 0:8]
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 10:14, 10:14] = 1
    features = grid.repeat_interleave(2, -2).repeat_interleave(2, -1)
    mask = hole.repeat_interleave(2, -2).repeat_interleave(2, -1)

    out = contextual_attention(features, mask)

    inside = out[..., 20:28, 20:28]
    source = features[..., 4:12, 4:12]  # 16 full-resolution pixels up and left
    assert inside.shape == (1, 8, 8, 8)
    assert torch.allclose(inside, source, atol=1e-5, rtol=0)


def test_attention_matches_tensorflow(fixture_io):
    features = nchw(fixture_io["attention_features"])
    mask = nchw(fixture_io["attention_mask"]).float()
    expected = nchw(fixture_io["attention_out"])
    assert (contextual_attention(features, mask) - expected).abs().max() < TF_TOLERANCE


def test_attention_with_no_background_pastes_nothing():
    features = torch.rand(1, 4, 16, 16)
    assert contextual_attention(features, torch.ones(1, 1, 16, 16)).abs().max() == 0


# --- the generator --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128, 256])
def test_generator_shapes_and_range(size):
    torch.manual_seed(0)
    generator = Generator(cnum=2).eval()
    image = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        coarse, refined = generator(image, rectangle_mask(size, size // 4, size // 2, size // 8, size // 2))
    for out in (coarse, refined):
        assert out.shape == (1, 3, size, size)
        assert out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1


def test_generator_rejects_sides_that_are_not_multiples_of_8():
    with pytest.raises(ValueError, match="multiples of 8"):
        Generator(cnum=2)(torch.zeros(1, 3, 60, 64), torch.zeros(1, 1, 60, 64))


def test_batch_equals_images_one_at_a_time_with_their_own_masks():
    torch.manual_seed(1)
    generator = Generator(cnum=4).eval()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    masks = torch.cat(
        [rectangle_mask(64, 8, 30, 8, 40), rectangle_mask(64, 30, 60, 0, 24), rectangle_mask(64, 16, 48, 16, 48)]
    )
    with torch.no_grad():
        batch = generator(images, masks)
        single = [generator(images[i : i + 1], masks[i : i + 1]) for i in range(3)]
    for stage in (0, 1):
        together = torch.cat([out[stage] for out in single])
        assert (batch[stage] - together).abs().max() < 1e-5


def test_hole_content_does_not_reach_the_network():
    torch.manual_seed(2)
    generator = Generator(cnum=2).eval()
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = rectangle_mask(64, 16, 40, 16, 40)
    with torch.no_grad():
        a = generator(image, mask)
        b = generator(torch.where(mask.bool(), torch.rand_like(image), image), mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- TensorFlow checkpoints -----------------------------------------------------------------


def test_tf_layout_maps_one_to_one_and_ignores_other_variables():
    torch.manual_seed(3)
    generator = Generator(cnum=4)
    variables = tf_layout(generator)
    assert "inpaint_net/conv13_upsample/conv13_upsample_conv/kernel" in variables
    assert variables["inpaint_net/conv1/kernel"].shape == (5, 5, 5, 4)
    variables["discriminator/discriminator_local/conv1/kernel"] = np.zeros((5, 5, 3, 64), np.float32)
    variables["inpaint_net/conv1/kernel/Adam"] = np.zeros((5, 5, 5, 4), np.float32)
    variables["global_step"] = np.int64(7)

    cnum, state = generator_state_from_tf(variables, trained_on="rgb")  # the tensors as stored

    assert cnum == 4
    assert state.keys() == generator.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in generator.state_dict().items())


def test_tf_import_names_the_first_missing_or_misshaped_variable():
    variables = tf_layout(Generator(cnum=2))
    del variables["inpaint_net/pmconv9/bias"]
    with pytest.raises(UserError, match="inpaint_net/pmconv9/bias is missing"):
        generator_state_from_tf(variables)

    variables = tf_layout(Generator(cnum=2))
    variables["inpaint_net/allconv13_upsample/allconv13_upsample_conv/kernel"] = np.zeros((3, 3, 8, 5), np.float32)
    with pytest.raises(UserError, match=r"allconv13_upsample_conv/kernel has shape \[3, 3, 8, 5\], expected \[3, 3, 8, 4\]"):
        generator_state_from_tf(variables)

    with pytest.raises(UserError, match="no variable inpaint_net/conv1/kernel"):
        generator_state_from_tf({"global_step": np.int64(1)})


def test_tf_checkpoint_round_trip_matches_tensorflow(tf_variables, fixture_io):
    cnum, state = generator_state_from_tf(tf_variables, trained_on="rgb")  # TF's order, whatever it is
    assert cnum == 4
    generator = Generator(cnum)
    generator.load_state_dict(state)
    generator.eval()
    for case in ("", "_border"):
        image = nchw(fixture_io["image" + case]).float() / 127.5 - 1
        mask = nchw(fixture_io["mask" + case]).float()
        with torch.no_grad():
            coarse, refined = generator(image, mask)
        assert (coarse - nchw(fixture_io["coarse" + case])).abs().max() < TF_TOLERANCE, case
        assert (refined - nchw(fixture_io["refined" + case])).abs().max() < TF_TOLERANCE, case


# --- cfrobust weight files ------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(4)
    generator = Generator(cnum=2)
    path = tmp_path / "cagan.pt"
    save_weights(path, generator, meta={"image_size": 64, "source": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["cagan.pt"]  # no temporary file left

    loaded = load_generator(path)

    assert loaded.cnum == 2 and not loaded.training
    assert loaded.meta == {"image_size": 64, "source": "test"}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in generator.state_dict().items())
    image, mask = torch.zeros(1, 3, 64, 64), rectangle_mask(64, 8, 24, 8, 24)
    with torch.no_grad():
        assert torch.equal(loaded(image, mask)[1], generator.eval()(image, mask)[1])


@pytest.mark.parametrize("content", ["text", "other_dict", "missing"])
def test_load_rejects_files_that_are_not_cagan_weights(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content == "text":
        path.write_text("not weights\n")
    elif content == "other_dict":
        torch.save({"model": {}}, path)
    with pytest.raises(UserError, match=f"{path}: ") as info:
        load_generator(path)
    assert "\n" not in str(info.value)
