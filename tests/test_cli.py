"""The command line: fast help without torch, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cfrobust.cli.main import COMMANDS, cli

HELP_WITHOUT_TORCH = """
import sys
from click.testing import CliRunner
from cfrobust.cli.main import cli
runner = CliRunner()
for args in [["--help"]] + [[name, "--help"] for name in {names!r}]:
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
    assert "Usage:" in result.output, args
print(sorted(m for m in ("torch", "torchvision", "webdataset", "cv2") if m in sys.modules))
"""


def test_help_of_every_command_does_not_import_torch():
    code = HELP_WITHOUT_TORCH.format(names=list(COMMANDS))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_entry_point_answers():
    out = subprocess.run([sys.executable, "-m", "cfrobust", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cfrobust, version 0.1.0"


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_train_on_a_folder_without_shards_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["train", "--shards", str(tmp_path / "empty"), "--out", str(tmp_path / "run")])
    line = _error_line(result)
    assert str(tmp_path / "empty") in line and "no shards here" in line
    assert not (tmp_path / "run").exists()


def test_train_without_the_requested_counterfactual_names_it(tiny_shards, tmp_path):
    args = ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "run"), "--cf", "tile"]
    # The tiny shards carry tile, so ask for a fill they lack by editing a copy of the manifest.
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    info = json.loads((copy / "train" / "_info.json").read_text())
    info["cf_methods"] = ["mean"]
    (copy / "train" / "_info.json").write_text(json.dumps(info))
    args[2] = str(copy)
    line = _error_line(CliRunner().invoke(cli, args))
    assert "no 'tile' counterfactual" in line and "they have: mean" in line


def test_eval_with_a_missing_checkpoint_is_a_one_line_error(tiny_shards, tmp_path):
    missing = tmp_path / "nope.pt"
    result = CliRunner().invoke(
        cli, ["eval", "--checkpoint", str(missing), "--shards", str(tiny_shards), "--out", str(tmp_path / "e.json")]
    )
    assert _error_line(result) == f"Error: {missing}: no such checkpoint"


def test_eval_of_a_file_that_is_not_a_checkpoint_is_a_one_line_error(tiny_shards, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    result = CliRunner().invoke(
        cli, ["eval", "--checkpoint", str(bogus), "--shards", str(tiny_shards), "--out", str(tmp_path / "e.json")]
    )
    assert "not a readable checkpoint" in _error_line(result)


def test_preprocess_says_when_size_upscales_the_images(tmp_path):
    args = ["preprocess", "--dataset", "synthetic", "--synthetic-sizes", "3,2,2", "--synthetic-image-size", "24"]
    upscaled = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a"), "--size", "40"])
    assert upscaled.exit_code == 0, upscaled.output
    assert upscaled.stdout.splitlines()[:2] == [
        "   train: 3 samples written, 0 skipped",
        "          warning: 3 upscaled, their source smaller than --size (the smallest side 24 px); "
        "--size 24 or less upscales none",
    ]
    kept = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--size", "24"])
    assert kept.exit_code == 0 and "warning" not in kept.output, kept.output
    shrunk = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "c"), "--size", "16"])
    assert shrunk.exit_code == 0 and "warning" not in shrunk.output, shrunk.output


def test_preprocess_into_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "shards"
    args = ["preprocess", "--dataset", "synthetic", "--out", str(out), "--synthetic-sizes", "8,4,4"]
    first = CliRunner().invoke(cli, args + ["--synthetic-image-size", "16"])
    assert first.exit_code == 0, first.output
    assert "train: 8 samples written, 0 skipped" in first.output
    before = (out / "train" / "_info.json").read_text()
    line = _error_line(CliRunner().invoke(cli, args))
    assert line == (
        f"Error: {out / 'train'} already holds output; pass --resume to continue it, "
        "--overwrite to replace it, or choose another --out"
    )
    assert (out / "train" / "_info.json").read_text() == before  # nothing touched
    again = CliRunner().invoke(cli, args + ["--overwrite", "--synthetic-image-size", "16"])
    assert again.exit_code == 0, again.output


def test_a_user_error_from_the_console_script_has_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cfrobust", "train", "--shards", str(tmp_path), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"Error: {tmp_path}: no shards here (no <split>/_info.json); run `cfrobust preprocess` first"


@pytest.mark.parametrize("bad", [["--cf", "blur"], ["--arch", "vgg"], ["--f", "swap"]])
def test_unknown_choices_are_rejected_by_the_parser(tmp_path, bad):
    result = CliRunner().invoke(cli, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "r")] + bad)
    assert result.exit_code == 2 and "Invalid value" in result.output


def test_preprocess_masks_from_boxes_choices_are_the_pipelines():
    """The CLI spells the choices out so that --help need not import cv2; they must stay the ones
    the pipeline accepts."""
    from cfrobust.cli.preprocess import preprocess
    from cfrobust.preprocess.grabcut import MASKS_FROM_BOXES

    option = next(p for p in preprocess.params if p.name == "masks_from_boxes")
    assert tuple(option.type.choices) == MASKS_FROM_BOXES


def test_preprocess_without_size_stores_small_images_as_they_are(tmp_path):
    """--size left out: 256, unless the training images' median shorter side is under 205 px
    (256 / 1.25); then that side, so a 40-px dataset is not stored at 16 times its pixels."""
    from cfrobust.datasets.record import DatasetSource, Record
    from cfrobust.preprocess.pipeline import default_size

    class Sides(DatasetSource):
        splits = ["train", "test"]

        def __init__(self, *shapes):
            self.shapes = shapes

        def records(self, split):
            for i, (h, w) in enumerate(self.shapes if split == "train" else [(999, 999)]):
                yield Record(f"k{i}", np.zeros((h, w, 3), np.uint8), 0)

    assert default_size(Sides((40, 60), (40, 40), (50, 45))) == 40  # the median shorter side
    assert default_size(Sides((210, 300))) == 256  # 1.22x up to 256: kept, as the official 224 -> 256
    assert default_size(Sides((204, 300))) == 204
    assert default_size(Sides((30, 30), (300, 300), (300, 300))) == 256  # the median, not the smallest
    assert default_size(Sides((4, 4))) == 8  # never below --size's least value
    assert default_size(Sides()) == 256  # nothing to look at: the adapter's default
    unreadable = Sides()
    unreadable.records = lambda split: iter([Record("bad", b"not an image", 0),
                                             Record("ok", np.zeros((40, 50, 3), np.uint8), 0)])
    assert default_size(unreadable) == 40  # the unreadable one is left to the run to report


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_source_size_reads_the_header_or_decodes(ext, tmp_path):
    import cv2

    from cfrobust.preprocess.images import source_size

    path = tmp_path / f"image{ext}"
    assert cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))
    assert source_size(path) == (30, 20)  # (width, height)
    assert source_size(path.read_bytes()) == (30, 20)
