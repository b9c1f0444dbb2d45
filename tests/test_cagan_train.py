"""`cfrobust cagan train|import`: background holes, the DeepFill v1 losses, a short run that learns,
an exact --resume, one-line CLI errors, and the TF import round trip."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.cagan import train as train_command
from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset
from cfrobust.distributed import DistEnv
from cfrobust.preprocess.cagan.critics import Critics, discount_weights, gradient_penalty
from cfrobust.preprocess.cagan.holes import largest_free_rectangle, local_patch_origin, sample_holes, size_range
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.preprocess.cagan.train import CaganConfig, Models, make_holes, state_path, train_cagan
from cfrobust.preprocess.cagan.weights import generator_state_from_tf, load_generator, save_weights
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import EvalShards

TF_FIXTURE = Path(__file__).parent / "fixtures" / "cagan_tf"
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _hole_pixels(hole, height, width) -> np.ndarray:
    image = np.zeros((height, width), bool)
    image[hole[1] : hole[3], hole[0] : hole[2]] = True
    return image


# ---------------------------------------------------------------- holes


def test_random_holes_avoid_every_box_and_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for size in (32, 256):
        count, k = 200, 3
        corner = rng.uniform(0, size * 0.8, (count, k, 2))
        extent = rng.uniform(1, size * 0.4, (count, k, 2))
        boxes = np.concatenate([corner, np.minimum(corner + extent, size)], axis=-1)
        valid = rng.random((count, k)) < 0.7
        holes, kept = sample_holes(boxes, valid, size, size, np.random.default_rng(1))
        low, high = size_range(size)
        assert kept.mean() > 0.9
        for hole, keep, image_boxes, image_valid in zip(holes, kept, boxes, valid):
            if not keep:
                assert (hole == 0).all()
                continue
            x0, y0, x1, y1 = hole
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert x1 - x0 <= high and y1 - y0 <= high
            hole_area = _hole_pixels(hole, size, size)
            for (bx0, by0, bx1, by1), v in zip(image_boxes, image_valid):
                if v:  # every pixel a box touches, fractional edges rounded outwards
                    box_area = _hole_pixels([math.floor(bx0), math.floor(by0), math.ceil(bx1), math.ceil(by1)], size, size)
                    assert not (hole_area & box_area).any()


def test_holes_on_hand_made_boxes():
    rng = np.random.default_rng(5)
    n = 50
    # A box over rows 0..23 leaves one place for an 8..16-pixel hole in a 32-pixel image: rows 24..31.
    holes, kept = sample_holes(np.tile([[0.0, 0.0, 32.0, 24.0]], (n, 1, 1)), np.ones((n, 1), bool), 32, 32, rng)
    assert kept.all() and (holes[:, 1] == 24).all() and (holes[:, 3] == 32).all()
    assert ((holes[:, 2] - holes[:, 0] >= 8) & (holes[:, 2] - holes[:, 0] <= 16)).all()
    # A fractional edge: the box ends inside pixel 23, so that row is taken too.
    holes, kept = sample_holes(np.tile([[0.0, 0.0, 32.0, 23.2]], (n, 1, 1)), np.ones((n, 1), bool), 32, 32, rng)
    assert kept.all() and (holes[:, 1] == 24).all()
    # Only a 5-pixel column is free: no random draw fits (holes are 8+ wide); the fallback uses it.
    holes, kept = sample_holes(np.tile([[0.0, 0.0, 27.0, 32.0]], (n, 1, 1)), np.ones((n, 1), bool), 32, 32, rng)
    assert kept.all() and (holes[:, 0] == 27).all() and (holes[:, 2] == 32).all()
    assert ((holes[:, 3] - holes[:, 1] >= 8) & (holes[:, 3] - holes[:, 1] <= 16)).all()
    # A box covering almost everything: no room, the image is left out (empty hole).
    holes, kept = sample_holes(np.array([[[1.0, 1.0, 31.0, 31.0]]]), np.ones((1, 1), bool), 32, 32, rng)
    assert not kept[0] and (holes[0] == 0).all()
    # No boxes (padding rows only): any hole, always kept; the same seed gives the same holes.
    boxes, valid = np.full((n, 2, 4), 5.0), np.zeros((n, 2), bool)
    first, kept = sample_holes(boxes, valid, 32, 32, np.random.default_rng(9))
    again, _ = sample_holes(boxes, valid, 32, 32, np.random.default_rng(9))
    assert kept.all() and (first == again).all()
    assert len({tuple(h) for h in first}) > n // 2


def test_largest_free_rectangle_and_local_patch():
    boxes = np.array([[0, 0, 32, 20], [0, 20, 10, 32]])
    assert largest_free_rectangle(boxes, 32, 32) == (10, 20, 32, 32)
    assert largest_free_rectangle(np.array([[0, 0, 32, 32]]), 32, 32) == (0, 0, 0, 0)
    assert largest_free_rectangle(np.zeros((0, 4)), 32, 32) == (0, 0, 32, 32)
    # The 16x16 critic patch is centred on the hole and moved back inside the image.
    origins = local_patch_origin(np.array([[8, 8, 16, 16], [0, 0, 10, 12], [20, 24, 32, 32]]), 16, 16, 32, 32)
    assert origins.tolist() == [[4, 4], [0, 0], [16, 16]]


# ---------------------------------------------------------------- losses


def test_spatial_discount_is_gamma_to_the_distance_from_known_pixels():
    mask = torch.zeros(2, 1, 7, 7)
    mask[0, 0, 1:6, 1:6] = 1  # an inner 5x5 hole: rim 1, next ring 2, centre 3
    mask[1, 0, 0:3, 0:4] = 1  # a 3x4 hole in the corner: the image border is not known
    weights = discount_weights(mask, 0.5)
    inner = [[1, 1, 1, 1, 1], [1, 2, 2, 2, 1], [1, 2, 3, 2, 1], [1, 2, 2, 2, 1], [1, 1, 1, 1, 1]]
    corner = [[3, 3, 2, 1], [2, 2, 2, 1], [1, 1, 1, 1]]
    expected = torch.zeros(2, 1, 7, 7)
    expected[0, 0, 1:6, 1:6] = 0.5 ** torch.tensor(inner, dtype=torch.float32)
    expected[1, 0, 0:3, 0:4] = 0.5 ** torch.tensor(corner, dtype=torch.float32)
    assert torch.equal(weights, expected)
    assert torch.equal(discount_weights(mask, 0.5, max_distance=3), expected)  # the bound the trainer passes


def test_gradient_penalty_of_a_linear_critic_matches_the_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, 1:3, 1:3] = 1
    mask[1] = 1
    scores = (x * w).sum(dim=(1, 2, 3))  # d score / d x = w everywhere
    penalty = gradient_penalty(scores, x, mask)
    expected = torch.stack([((w**2 * mask[i]).sum().sqrt() - 1) ** 2 for i in range(2)])
    assert torch.allclose(penalty, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gradient_penalty((x * w).sum(dim=(1, 2, 3)), x), ((w**2).sum().sqrt() - 1).expand(2) ** 2)


def test_critics_have_the_official_layers():
    critics = Critics(64, 48)
    convs = lambda c: [m for m in c.features if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert [m.out_channels for m in convs(critics.whole)] == [64, 128, 256, 256]
    assert [m.out_channels for m in convs(critics.local)] == [64, 128, 256, 512]
    assert all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in convs(critics.whole) + convs(critics.local))
    local, whole = critics(torch.zeros(3, 3, 32, 24), torch.zeros(3, 3, 64, 48))
    assert local.shape == whole.shape == (3,)
    assert critics.local.score_weight.numel() == 512 * 2 * 2 and critics.whole.score_weight.numel() == 256 * 4 * 3


# ---------------------------------------------------------------- training


def tiny_config(shards, out, **overrides) -> CaganConfig:
    options = dict(
        shards=str(shards), out=str(out), steps=20, batch=8, lr=1e-3, cnum=4, critic_steps=1, pretrain_steps=18,
        sample_every=10, save_every=0, workers=0, device="cpu",
    )
    return CaganConfig(**{**options, **overrides})


def heldout_l1(generator: Generator, held) -> float:
    """Mean L1 of the refined output in the holes of a fixed batch."""
    with torch.no_grad():
        _, refined = generator(held.images, held.mask)
    return float(((refined - held.images).abs() * held.mask).sum() / (held.mask.sum() * 3))


def test_twenty_steps_lower_the_reconstruction_loss_and_write_samples(tiny_shards, tmp_path):
    config = tiny_config(tiny_shards, tmp_path / "cagan.pt")
    batch = next(iter(EvalShards(Path(tiny_shards) / "test", 16)))
    held = make_holes(batch, config, (16, 16), np.random.default_rng(123), torch.device("cpu"))
    assert float(held.kept.sum()) == 16
    before = heldout_l1(Models(config, (32, 32), CPU).generator, held)  # the run's initial weights
    progress = train_cagan(config)
    assert (progress.step, progress.batches) == (20, 18 + 2 * 2)
    generator = load_generator(tmp_path / "cagan.pt")
    after = heldout_l1(generator, held)
    assert after < 0.8 * before, (before, after)  # 0.45 -> 0.27 here
    assert generator.cnum == 4 and generator.meta["steps"] == 20 and generator.meta["image_size"] == 32
    assert generator.meta["shards"] == str(tiny_shards)
    assert torch.load(tmp_path / "cagan.pt", weights_only=True)["channels"] == "rgb"  # learnt on RGB shards
    import cv2

    grids = sorted(p.name for p in (tmp_path / "cagan.samples").iterdir())
    assert grids == ["step-000010.png", "step-000020.png"]
    grid = cv2.imread(str(tmp_path / "cagan.samples" / "step-000020.png"))
    assert grid.shape == (8 * 32, 4 * 32, 3)  # 8 preview images x (input | coarse | refined | original)
    assert (grid[:, :32] == 255).all(axis=-1).any()  # the hole shows white in the input column


def test_resume_after_step_10_reaches_the_weights_of_the_straight_run(tiny_shards, tmp_path):
    # The 32 val images (2 shards, batch 4): the stream crosses epochs, and the stop falls mid-epoch
    # and after the critics started (step 8), so their weights and optimizer resume too. (12 steps,
    # not more: a critic update costs ~0.5 s on a CPU.)
    base = dict(split="val", batch=4, steps=12, pretrain_steps=8, sample_every=0, save_every=5)
    straight = train_cagan(tiny_config(tiny_shards, tmp_path / "a.pt", **base))
    first = train_cagan(tiny_config(tiny_shards, tmp_path / "b.pt", **{**base, "steps": 10}))
    assert (first.step, first.batches) == (10, 12)
    runner = CliRunner()
    args = ["--shards", str(tiny_shards), "--out", str(tmp_path / "b.pt"), "--split", "val", "--batch", "4", "--lr", "1e-3",
            "--cnum", "4", "--critic-steps", "1", "--pretrain-steps", "8", "--sample-every", "0", "--save-every", "5",
            "--workers", "0", "--device", "cpu", "--steps", "12"]  # fmt: skip
    result = runner.invoke(cli, ["cagan", "train", *args, "--resume"])
    assert result.exit_code == 0, result.output
    assert (straight.step, straight.batches) == (12, 16)
    a, b = load_generator(tmp_path / "a.pt"), load_generator(tmp_path / "b.pt")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    state_a = torch.load(state_path(tmp_path / "a.pt"), weights_only=True)
    state_b = torch.load(state_path(tmp_path / "b.pt"), weights_only=True)
    for key, value in state_a["critics"].items():
        assert torch.equal(value, state_b["critics"][key]), key
    assert state_a["opt_d"]["state"][0]["step"] == state_b["opt_d"]["state"][0]["step"] == 4
    # Resuming with other options is refused, in one line.
    line = _error_line(runner.invoke(cli, ["cagan", "train", *args, "--resume", "--lr", "0.5"]))
    assert "b.pt.state" in line and "lr" in line


def test_torchrun_two_processes_train_and_rank_0_alone_writes(tiny_shards, tmp_path):
    out = tmp_path / "cagan.pt"
    args = ["--shards", str(tiny_shards), "--out", str(out), "--steps", "2", "--pretrain-steps", "1", "--batch", "4",
            "--cnum", "4", "--critic-steps", "1", "--sample-every", "2", "--workers", "1", "--device", "cpu"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cfrobust", "cagan", "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("generator written to") == 1  # rank 0 reports
    assert "Grad strides do not match" not in run.stderr  # DDP's warning for a [1, n] critic score weight
    state = torch.load(state_path(out), weights_only=True)
    assert (state["world_size"], state["step"], state["batches"]) == (2, 2, 1 + 2)  # per rank
    assert load_generator(out).meta["processes"] == 2
    assert [p.name for p in (tmp_path / "cagan.samples").iterdir()] == ["step-000002.png"]


def test_existing_output_without_resume_is_a_one_line_error(tiny_shards, tmp_path):
    out = tmp_path / "cagan.pt"
    out.write_bytes(b"earlier weights")
    runner = CliRunner()
    line = _error_line(runner.invoke(cli, ["cagan", "train", "--shards", str(tiny_shards), "--out", str(out), "--device", "cpu"]))
    assert str(out) in line and "--resume" in line
    assert out.read_bytes() == b"earlier weights"
    # With --resume but no training state next to it, nothing is overwritten either.
    line = _error_line(runner.invoke(cli, ["cagan", "train", "--shards", str(tiny_shards), "--out", str(out), "--resume"]))
    assert "cagan.pt.state" in line


def test_image_size_must_be_a_multiple_of_8(tmp_path):
    shards = tmp_path / "shards"
    preprocess(open_dataset("synthetic", seed=1, sizes=(4, 2, 2), image_size=20), shards, ["mean"], shard_size=4, progress=False)
    result = CliRunner().invoke(cli, ["cagan", "train", "--shards", str(shards), "--out", str(tmp_path / "w.pt")])
    line = _error_line(result)
    assert "20x20" in line and "multiple of 8" in line and "--size 24" in line


def test_cli_defaults_are_the_config_defaults():
    options = {p.name: p for p in train_command.params}
    for field in fields(CaganConfig):
        assert field.name in options, field.name
        assert options[field.name].help, field.name
        if field.name not in ("shards", "out"):
            assert options[field.name].default == field.default, field.name


# ---------------------------------------------------------------- import


def test_import_round_trip_and_fine_tuning_from_a_tf_checkpoint(tiny_shards, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(cli, ["cagan", "import", str(TF_FIXTURE), "--list"])
    assert listed.exit_code == 0, listed.output
    assert "inpaint_net/conv1/kernel float32 [5, 5, 5, 4]" in listed.output.splitlines()
    result = runner.invoke(cli, ["cagan", "import", str(TF_FIXTURE), "--out", str(tmp_path / "w.pt")])
    assert result.exit_code == 0, result.output
    from cfrobust.preprocess.cagan.tf_checkpoint import read_tf_checkpoint

    cnum, expected = generator_state_from_tf(read_tf_checkpoint(TF_FIXTURE))
    loaded = load_generator(tmp_path / "w.pt")
    assert loaded.cnum == cnum == 4 and loaded.meta["source"] == str(TF_FIXTURE)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    assert "already exists" in _error_line(runner.invoke(cli, ["cagan", "import", str(TF_FIXTURE), "--out", str(tmp_path / "w.pt")]))
    # --init starts training from those weights (zero steps: the output is the import itself),
    # also from a file that keeps the release's BGR tensors and records so: read as RGB too.
    _, as_trained = generator_state_from_tf(read_tf_checkpoint(TF_FIXTURE), trained_on="rgb")
    bgr = Generator(cnum=4)
    bgr.load_state_dict(as_trained)
    save_weights(tmp_path / "bgr.pt", bgr, channels="bgr")
    for init in (TF_FIXTURE, tmp_path / "w.pt", tmp_path / "bgr.pt"):
        out = tmp_path / f"tuned-{init.name}.pt"
        train_cagan(tiny_config(tiny_shards, out, steps=0, init=str(init)))
        assert all(torch.equal(load_generator(out).state_dict()[k], v) for k, v in expected.items())
    wrong = replace(tiny_config(tiny_shards, tmp_path / "x.pt", steps=0, init=str(TF_FIXTURE)), cnum=8)
    with pytest.raises(Exception, match="--cnum 4"):
        train_cagan(wrong)
