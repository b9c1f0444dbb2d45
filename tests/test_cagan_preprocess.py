"""`preprocess --cf cagan`: batched generator inference inside the shard pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset
from cfrobust.errors import UserError
from cfrobust.preprocess.cagan.inpaint import CaganFill, CaganSettings, fill_cagan_samples
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.preprocess.cagan.weights import save_weights
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import iter_samples
from cfrobust.shards.schema import boxes_to_mask

SIZES = (24, 8, 8)


def synthetic():
    return open_dataset("synthetic", seed=7, sizes=SIZES, image_size=16)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read(split_dir: Path, methods: list[str]) -> list[dict]:
    return list(iter_samples(sorted(split_dir.glob("*.tar")), methods))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small random generator working at 32 px (the stored images are 16 px: resized both ways)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cagan") / "g.pt"
    save_weights(path, Generator(cnum=4), meta={"image_size": 32})
    return path


def settings(weights: Path, batch: int = 5) -> CaganSettings:
    return CaganSettings(weights, "cpu", batch)


def test_fill_changes_only_the_hole_and_matches_the_generator(weights):
    fill = CaganFill(settings(weights))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    boxes = [[(2, 3, 9, 11)], [(0, 0, 4, 16), (10.5, 10.5, 16, 16)], [(5, 5, 6, 6)]]
    out = fill(images, boxes)
    for image, box, filled in zip(images, boxes, out):
        hole = boxes_to_mask(box, 16, 16)
        assert np.array_equal(filled[~hole], image[~hole])
        # Inside: the generator's output at 32 px, resized back to 16.
        small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)
        mask = torch.from_numpy(boxes_to_mask([np.asarray(b) * 2 for b in box], 32, 32))[None, None].float()
        x = torch.from_numpy(small).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            _, refined = fill.generator(x * (1 - mask), mask)
        want = ((refined[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        want = cv2.resize(want, (16, 16), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(filled[hole], want[hole])


def test_batches_end_at_multiples_of_the_batch_size_counted_from_the_split_start():
    """A run resumed at record 7 must batch records 7..9 together, as the clean run did."""
    seen = []

    class Recorder:
        settings = CaganSettings(Path("unused"), "cpu", 5)

        def __call__(self, images, boxes):
            seen.append(len(images))
            return images

    pairs = [(i, {"_cagan_source": (np.zeros((2, 2, 3), np.uint8), [(0, 0, 1, 1)]), "cf_cagan.jpg": None}) for i in range(13)]
    out = list(fill_cagan_samples(iter(pairs[7:]), Recorder(), position=7))
    assert seen == [3, 3]  # records 7-9, then 10-12 (the end)
    assert [i for i, _ in out] == list(range(7, 13))
    assert all("_cagan_source" not in s and isinstance(s["cf_cagan.jpg"], bytes) for _, s in out)


def test_shards_carry_cagan_next_to_other_fills_for_any_worker_count(weights, tmp_path):
    preprocess(synthetic(), tmp_path / "w1", ["tile", "cagan"], shard_size=7, progress=False, cagan=settings(weights))
    preprocess(synthetic(), tmp_path / "w3", ["tile", "cagan"], shard_size=7, progress=False, workers=3, cagan=settings(weights))
    assert files(tmp_path / "w1") == files(tmp_path / "w3")
    samples = read(tmp_path / "w1" / "train", ["tile", "cagan"])
    assert len(samples) == 24
    assert sum(not np.array_equal(s["cf"]["cagan"], s["cf"]["tile"]) for s in samples) == 24


SLOW_RUN = """
import sys, time
from pathlib import Path
from cfrobust.datasets.synthetic import SyntheticDataset
from cfrobust.preprocess.cagan.inpaint import CaganSettings
from cfrobust.preprocess.pipeline import preprocess

class Slow(SyntheticDataset):
    def make_record(self, split, index):
        time.sleep(0.05)
        return super().make_record(split, index)

preprocess(Slow(seed=7, sizes={sizes}, image_size=16), sys.argv[1], ["cagan"], shard_size=7, progress=False,
           cagan=CaganSettings(Path(sys.argv[2]), "cpu", 5))
"""


def test_a_killed_cagan_run_resumes_to_the_clean_result(weights, tmp_path):
    preprocess(synthetic(), tmp_path / "clean", ["cagan"], shard_size=7, progress=False, cagan=settings(weights))
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(sizes=SIZES), str(out), str(weights)])
    journal = out / "train" / "_progress.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 1):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "train" / "_info.json").exists()
    preprocess(synthetic(), out, ["cagan"], shard_size=7, progress=False, resume=True, cagan=settings(weights))
    assert files(out) == files(tmp_path / "clean")


def test_cagan_without_weights_or_with_a_foreign_file_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="--cf cagan needs --cagan-weights"):
        preprocess(synthetic(), tmp_path / "a", ["cagan"], progress=False)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    result = CliRunner().invoke(cli, ["preprocess", "--dataset", "synthetic", "--out", str(tmp_path / "b"),
                                      "--cf", "cagan", "--cagan-weights", str(foreign)])
    assert result.exit_code == 1 and "foreign.pt" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()  # nothing written before the weights were checked


def test_cli_writes_cagan_shards(weights, tmp_path):
    result = CliRunner().invoke(cli, ["preprocess", "--dataset", "synthetic", "--synthetic-sizes", "8,4,4",
                                      "--synthetic-image-size", "16", "--out", str(tmp_path / "s"), "--cf", "cagan",
                                      "--cagan-weights", str(weights), "--batch", "3"])
    assert result.exit_code == 0, result.output
    samples = read(tmp_path / "s" / "val", ["cagan"])
    assert len(samples) == 4 and all(s["cf"]["cagan"].shape == (16, 16, 3) for s in samples)
