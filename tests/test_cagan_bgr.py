"""Channel order of imported CAGAN weights: the released DeepFill v1 models were trained on BGR,
cfrobust feeds RGB. Checked against tests/fixtures/cagan_tf (a DeepFill v1 checkpoint written by
TensorFlow itself, with TF's own outputs), through the import, the weight file and preprocess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.errors import UserError
from cfrobust.preprocess.cagan.inpaint import CaganFill, CaganSettings
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.preprocess.cagan.tf_checkpoint import read_tf_checkpoint
from cfrobust.preprocess.cagan.weights import (
    FORMAT,
    generator_state_from_tf,
    load_generator,
    save_weights,
    swap_red_blue,
)
from cfrobust.shards.schema import boxes_to_mask

FIXTURE = Path(__file__).parent / "fixtures" / "cagan_tf"
SAME = 1e-5  # torch vs torch, the same sums in another order
TF_TOLERANCE = 1e-4  # float32 TF vs torch, as in test_cagan_network.py
REVERSED = [2, 1, 0]


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def generator(state: dict) -> Generator:
    model = Generator(cnum=4)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def variables():
    return read_tf_checkpoint(str(FIXTURE / "model"))


@pytest.fixture(scope="module")
def as_trained(variables):
    """The checkpoint's tensors as they are: the generator the release runs on BGR."""
    return generator(generator_state_from_tf(variables, trained_on="rgb")[1])


@pytest.fixture(scope="module")
def imported(variables):
    return generator(generator_state_from_tf(variables)[1])


@pytest.fixture(scope="module")
def coloured_holes():
    """Two RGB pictures in [-1, 1] (the fixture's scene of colour ramps and discs): the fixture's
    own hole, and a hole over its red disc."""
    io = np.load(FIXTURE / "io.npz")
    image = nchw(io["image"]).float() / 127.5 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[0] = nchw(io["mask"])[0].float()
    mask[1, :, 10:26, 12:28] = 1
    return image.repeat(2, 1, 1, 1), mask


def test_only_the_image_slices_of_the_first_and_last_convolutions_change(variables):
    _, trained = generator_state_from_tf(variables, trained_on="rgb")
    _, rgb = generator_state_from_tf(variables)
    readers = ["coarse.conv1.weight", "dilated.xconv1.weight", "attention_in.pmconv1.weight"]
    writers = ["coarse.conv17.weight", "coarse.conv17.bias", "merge.allconv17.weight", "merge.allconv17.bias"]
    for key in readers:  # inputs: image (3), ones, mask
        assert rgb[key].shape[1] == 5, key
        assert torch.equal(rgb[key][:, :3], trained[key][:, REVERSED]), key
        assert torch.equal(rgb[key][:, 3:], trained[key][:, 3:]), key
    for key in writers:
        assert rgb[key].shape[0] == 3, key
        assert torch.equal(rgb[key], trained[key][REVERSED]), key
    unchanged = [k for k in trained if k not in readers + writers]
    assert (len(trained), len(unchanged)) == (2 * 42, 2 * 42 - 7)  # 42 convolutions
    assert all(torch.equal(rgb[k], trained[k]) for k in unchanged)
    assert all(torch.equal(swap_red_blue(rgb)[k], v) for k, v in trained.items())  # its own inverse


def test_imported_generator_on_rgb_gives_the_release_on_bgr_flipped_back(as_trained, imported, coloured_holes):
    rgb, mask = coloured_holes
    with torch.no_grad():
        ours = imported(rgb, mask)
        release = [out.flip(1) for out in as_trained(rgb.flip(1), mask)]  # BGR in, back to RGB
        unconverted = as_trained(rgb, mask)
    for stage in (0, 1):  # coarse, refined
        assert (ours[stage] - release[stage]).abs().max() < SAME, stage
        # Not vacuous: the hole's fill is coloured, and feeding RGB to the unconverted weights
        # (what cfrobust did before) gives another fill.
        fill = release[stage] * mask
        assert float((fill[:, 0] - fill[:, 2]).abs().sum() / mask.sum()) > 0.1, stage
        assert ((unconverted[stage] - release[stage]).abs() * mask).max() > 0.5, stage


def test_imported_generator_matches_tensorflow_run_on_the_bgr_picture(imported):
    """TF itself ran the fixture's picture as the release runs cv2.imread's array: as BGR."""
    io = np.load(FIXTURE / "io.npz")
    for case in ("", "_border"):
        bgr = nchw(io["image" + case]).float() / 127.5 - 1
        mask = nchw(io["mask" + case]).float()
        with torch.no_grad():
            coarse, refined = imported(bgr.flip(1), mask)
        assert (coarse.flip(1) - nchw(io["coarse" + case])).abs().max() < TF_TOLERANCE, case
        assert (refined.flip(1) - nchw(io["refined" + case])).abs().max() < TF_TOLERANCE, case


def test_the_channel_record_survives_import_save_and_load(tmp_path, variables, imported, as_trained):
    out = tmp_path / "w.pt"
    result = CliRunner().invoke(cli, ["cagan", "import", str(FIXTURE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["channels"] == "rgb"
    loaded = load_generator(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in imported.state_dict().items())

    again = tmp_path / "again.pt"  # what `cagan train` does with its generator: records RGB
    save_weights(again, loaded)
    assert torch.load(again, weights_only=True)["channels"] == "rgb"
    assert load_generator(again).meta == loaded.meta == {"source": str(FIXTURE), "cnum": 4}

    bgr = tmp_path / "bgr.pt"  # tensors kept as trained, with their order recorded
    save_weights(bgr, as_trained, meta={"source": "release"}, channels="bgr")
    assert torch.load(bgr, weights_only=True)["channels"] == "bgr"
    read_back = load_generator(bgr)
    assert all(torch.equal(read_back.state_dict()[k], v) for k, v in imported.state_dict().items())

    legacy = tmp_path / "legacy.pt"  # written before the record existed: read as RGB, as before
    state = {k: v.clone() for k, v in as_trained.state_dict().items()}
    torch.save({"format": FORMAT, "cnum": 4, "state_dict": state, "meta": {}}, legacy)
    assert all(torch.equal(load_generator(legacy).state_dict()[k], v) for k, v in state.items())

    odd = tmp_path / "odd.pt"
    torch.save({"format": FORMAT, "cnum": 4, "channels": "grb", "state_dict": state, "meta": {}}, odd)
    with pytest.raises(UserError, match=f"{odd}: unknown channel order 'grb' \\(expected one of rgb, bgr\\)"):
        load_generator(odd)
    with pytest.raises(UserError, match="unknown channel order 'BGR'"):
        generator_state_from_tf(variables, trained_on="BGR")


def test_preprocess_fills_with_the_colours_the_release_would_give(tmp_path, as_trained):
    result = CliRunner().invoke(cli, ["cagan", "import", str(FIXTURE), "--out", str(tmp_path / "w.pt")])
    assert result.exit_code == 0, result.output
    io = np.load(FIXTURE / "io.npz")
    picture = np.ascontiguousarray(io["image"][0])  # 64x64 RGB uint8; the fill works at 256
    boxes = [[12.0, 10.0, 28.0, 26.0]]  # the red disc
    filled = CaganFill(CaganSettings(tmp_path / "w.pt", "cpu", 1))([picture], [boxes])[0]

    def release_fill(model_input_flip: bool) -> np.ndarray:
        import cv2

        small = cv2.resize(picture, (256, 256), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 127.5 - 1
        m = torch.from_numpy(boxes_to_mask([np.asarray(boxes[0]) * 4], 256, 256))[None, None].float()
        with torch.no_grad():
            refined = as_trained((x.flip(1) if model_input_flip else x) * (1 - m), m)[1]
        refined = refined.flip(1) if model_input_flip else refined
        out = ((refined.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
        back = cv2.resize(out, (64, 64), interpolation=cv2.INTER_LINEAR)
        pasted = picture.copy()
        hole = boxes_to_mask(boxes, 64, 64)
        pasted[hole] = back[hole]
        return pasted

    expected = release_fill(True)
    hole = boxes_to_mask(boxes, 64, 64)
    assert np.array_equal(filled[~hole], picture[~hole])
    # Equal but for a rounding at .5 now and then (sums in another order, then uint8).
    assert np.abs(filled.astype(int) - expected).max() <= 1
    assert (filled != expected).mean() < 0.01
    unconverted = release_fill(False)  # RGB fed to the tensors as trained: red and blue swapped
    assert np.abs(unconverted.astype(int) - expected)[hole].max() > 40
