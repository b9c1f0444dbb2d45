"""`cfrobust train --tensorboard` with the real tensorboard package: the event files it writes,
read back with TensorBoard's own reader, hold every step's loss terms and lr and every epoch's
figures, each at its step."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cfrobust.cli.main import cli

STEPS = [1, 2, 3, 4, 5, 6]  # 2 epochs of 96 images, batch 32
EPOCH_ENDS = [3, 6]


@pytest.fixture(scope="module")
def run(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("tensorboard") / "run"
    result = CliRunner().invoke(cli, [
        "train", "--shards", str(tiny_shards), "--out", str(out), "--arch", "simple-cnn", "--epochs", "2",
        "--batch", "32", "--lr", "0.05", "--workers", "0", "--device", "cpu", "--cf", "tile", "--reg", "bbox_o",
        "--quiet", "--tensorboard",
    ])
    assert result.exit_code == 0, result.output
    return out


def events(out) -> EventAccumulator:
    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return accumulator


def test_event_files_hold_exactly_the_documented_scalars(run):
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    accumulator = events(run)
    assert sorted(accumulator.Tags()["scalars"]) == sorted([
        "train/ce", "train/cf", "train/sal", "train/loss", "train/lr",
        "epoch/loss", "epoch/train_accuracy", "epoch/images_per_s", "epoch/seconds",
        "epoch/ce", "epoch/cf", "epoch/sal",
        "val/accuracy", "val/loss", "val/worst_group_accuracy", "val/mean_group_accuracy",
    ])
    for tag in accumulator.Tags()["scalars"]:
        expected = STEPS if tag.startswith("train/") else EPOCH_ENDS
        assert [event.step for event in accumulator.Scalars(tag)] == expected, tag


def test_event_values_agree_with_metrics_jsonl(run):
    accumulator = events(run)
    scalar = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == EPOCH_ENDS
    for record in records:
        step, steps = record["step"], [s for s in STEPS if record["step"] - 3 < s <= record["step"]]
        for name, mean in record["terms"].items():  # event files store float32
            assert scalar[f"epoch/{name}"][step] == pytest.approx(mean, rel=1e-6)
            assert sum(scalar[f"train/{name}"][s] for s in steps) / 3 == pytest.approx(mean, rel=1e-5)
        for name in ("loss", "train_accuracy", "images_per_s", "seconds"):
            assert scalar[f"epoch/{name}"][step] == pytest.approx(record[name], rel=1e-6)
        for name in ("accuracy", "loss", "worst_group_accuracy", "mean_group_accuracy"):
            assert scalar[f"val/{name}"][step] == pytest.approx(record["val"][name], rel=1e-6)
    for s in STEPS:
        terms = sum(scalar[f"train/{name}"][s] for name in ("ce", "cf", "sal"))
        assert scalar["train/loss"][s] == pytest.approx(terms, rel=1e-5)
    assert scalar["train/lr"][1] == pytest.approx(0.05)  # cosine from --lr, read before each step


class Killed(Exception):
    pass


def test_a_resumed_run_shows_each_step_once(tiny_shards, tmp_path, monkeypatch):
    """Killed before its 6th step, with a checkpoint every 2 steps, the run had logged steps 1-5;
    resumed from its last checkpoint, it takes step 5 again: the event files show every step
    once, from 1 to 6."""
    import cfrobust.trainer.train as train_module

    out = tmp_path / "run"
    args = ["train", "--shards", str(tiny_shards), "--out", str(out), "--arch", "simple-cnn", "--epochs", "2",
            "--batch", "32", "--lr", "0.05", "--workers", "0", "--device", "cpu", "--cf", "tile", "--reg", "bbox_o",
            "--quiet", "--tensorboard", "--save-every", "2"]
    step, calls = train_module.optimizer_step, []

    def killed_at_the_sixth(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise Killed
        return step(*a, **k)

    monkeypatch.setattr(train_module, "optimizer_step", killed_at_the_sixth)
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, Killed)
    assert sorted({event.step for event in events(out).Scalars("train/loss")}) == [1, 2, 3, 4, 5]
    monkeypatch.setattr(train_module, "optimizer_step", step)
    result = CliRunner().invoke(cli, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    accumulator = events(out)
    for tag in accumulator.Tags()["scalars"]:
        expected = STEPS if tag.startswith("train/") else EPOCH_ENDS
        assert [event.step for event in accumulator.Scalars(tag)] == expected, tag
