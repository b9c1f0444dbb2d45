"""What a run logs: metrics.jsonl per epoch, the progress bar, epoch lines, TensorBoard scalars."""

from __future__ import annotations

import io
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.errors import UserError
from cfrobust.trainer import train_log
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.train import train
from cfrobust.trainer.train_log import EpochMeter, TrainLog

STEPS_PER_EPOCH = 3  # 96 training samples, batch 32


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what it is given."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.scalars: dict[str, dict[int, float]] = {}
        self.closed = False

    def add_scalar(self, tag, value, step):
        assert step not in self.scalars.setdefault(tag, {}), (tag, step)  # each step once
        self.scalars[tag][step] = value

    def flush(self):
        pass

    def close(self):
        self.closed = True


def tiny_config(shards, out, **overrides) -> TrainConfig:
    options = dict(shards=str(shards), out=str(out), arch="simple-cnn", epochs=2, batch=32, lr=0.05, workers=0,
                   device="cpu", cf="tile", reg="bbox_o", quiet=True)
    return TrainConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def logged_run(tiny_shards, tmp_path_factory):
    """A 2-epoch run with --tensorboard, the writer replaced by a FakeWriter, which keeps the exact
    values and checks each step is written once (test_tensorboard.py reads real event files)."""
    run = tmp_path_factory.mktemp("logs") / "run"
    writers = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_log, "require_tensorboard", lambda: None)  # the package may be absent here
        patch.setattr(train_log, "open_summary_writer", lambda log_dir, purge_step: writers.append(FakeWriter(log_dir)) or writers[-1])
        train(tiny_config(tiny_shards, run, tensorboard=True))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (writer,) = writers
    return SimpleNamespace(run=run, records=records, writer=writer)


def test_metrics_jsonl_holds_each_epochs_terms_lr_speed_and_val_figures(logged_run):
    records = logged_run.records
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 3), (2, 6)]
    for record in records:
        assert set(record["terms"]) == {"ce", "cf", "sal"}
        assert all(math.isfinite(v) for v in record["terms"].values()) and record["terms"]["sal"] > 0
        assert record["loss"] == pytest.approx(sum(record["terms"].values()))
        assert 0 <= record["train_accuracy"] <= 1
        assert record["images_per_s"] > 0 and record["seconds"] > 0
        assert set(record["val"]) == {"split", "accuracy", "loss", "worst_group_accuracy", "mean_group_accuracy", "auroc",
                                      "selected_by"}
        assert record["val"]["selected_by"] == "worst_group_accuracy"  # auto: the built-in groups carry the place
    # cosine schedule from 0.05 to 0 over 6 steps, read after each epoch's last step
    assert records[0]["lr"] == pytest.approx(0.025) and records[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_tensorboard_gets_every_steps_terms_and_each_epochs_val_figures(logged_run):
    writer, records = logged_run.writer, logged_run.records
    assert writer.log_dir == logged_run.run / "tensorboard" and writer.closed
    steps = list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for tag in ("train/ce", "train/cf", "train/sal", "train/loss", "train/lr"):
        assert sorted(writer.scalars[tag]) == steps, tag
    for epoch, record in enumerate(records):
        epoch_steps = steps[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]
        for name, mean in record["terms"].items():  # the epoch mean is the mean of its steps
            assert sum(writer.scalars[f"train/{name}"][s] for s in epoch_steps) / STEPS_PER_EPOCH == pytest.approx(mean)
        for name in ("accuracy", "loss", "worst_group_accuracy", "mean_group_accuracy"):
            assert writer.scalars[f"val/{name}"][record["step"]] == record["val"][name]
        assert writer.scalars["epoch/images_per_s"][record["step"]] == record["images_per_s"]
    # each step's scalar is the rate that step used: cosine from 0.05 at step 1 over 6 steps
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 6)) for s in steps]
    assert [writer.scalars["train/lr"][s] for s in steps] == pytest.approx(expected)


def test_tensorboard_without_the_package_is_one_line_and_writes_nothing(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(UserError, match=r"^--tensorboard needs the tensorboard package: pip install tensorboard$"):
        train(tiny_config(tiny_shards, tmp_path / "run", tensorboard=True))
    assert not (tmp_path / "run").exists()  # a retry without --tensorboard needs no --overwrite
    result = CliRunner().invoke(cli, ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "run"), "--tensorboard"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --tensorboard needs the tensorboard package: pip install tensorboard"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_steps(log: TrainLog, steps: int, images: int = 8) -> None:
    log.start_epoch(0, steps, 0, images)
    meter = EpochMeter(torch.device("cpu"))
    for step in range(1, steps + 1):
        terms = {"ce": torch.tensor(0.5 + step), "cf": torch.tensor(0.25)}
        meter.add(terms, torch.zeros(images, 2), torch.zeros(images, dtype=torch.long))
        log.after_step(step, terms, 0.1, images, meter)


def test_progress_bar_counts_images_and_shows_running_term_means_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    log = TrainLog("unused", SimpleNamespace(epochs=3, quiet=False, tensorboard=False), is_main=True)
    run_steps(log, steps=20)
    shown = str(log.bar)
    assert shown.startswith("epoch 1/3: 100%") and "160/160" in shown and "img/s" in shown
    assert "ce=11" in shown and "cf=0.25" in shown  # means over steps 1..20: ce = 0.5 + 10.5


@pytest.mark.parametrize("terminal, quiet, is_main", [(False, False, True), (True, True, True), (True, False, False)])
def test_no_bar_off_a_terminal_with_quiet_or_off_rank_0(monkeypatch, capsys, terminal, quiet, is_main):
    monkeypatch.setattr(sys, "stderr", Terminal() if terminal else io.StringIO())
    log = TrainLog("unused", SimpleNamespace(epochs=1, quiet=quiet, tensorboard=False), is_main=is_main)
    run_steps(log, steps=2)
    assert log.bar.disable and sys.stderr.getvalue() == ""
    log.end_epoch(EpochMeter(torch.device("cpu")))
    log.epoch_done({"epoch": 1, "step": 2, "loss": 1.0, "terms": {"ce": 0.75, "cf": 0.25}, "train_accuracy": 0.5,
                    "lr": 0.1, "images_per_s": 16.0, "seconds": 1.0})
    printed = capsys.readouterr().out
    if quiet or not is_main:
        assert printed == ""
    else:  # off a terminal the epoch lines still go to the log
        assert printed == "epoch 1: loss 1.000 (ce=0.75 cf=0.25) train acc 0.500 | lr 0.1 | 16 img/s, 1.0 s\n"


def epochs_with_ce(*losses: float) -> list[dict]:
    return [{"epoch": i + 1, "terms": {"ce": ce, "sal": 5.0}} for i, ce in enumerate(losses)]


def test_chance_note_comes_at_the_first_thirds_end_only_while_every_epochs_ce_stayed_near_log_k():
    at_chance = epochs_with_ce(0.70, 0.69, 0.6932, 0.6931, 0.695)  # each >= 0.97 x log 2 = 0.6724
    note = train_log.chance_note(at_chance, num_classes=2, epochs=15)
    assert note.startswith("note: after 5 of 15 epochs the classification loss is still at chance (ce 0.695; "
                           "log 2 = 0.693): the net has not started to learn the labels.")
    assert train_log.chance_note(at_chance[:4], 2, 15) is None  # before the due epoch
    assert train_log.chance_note(at_chance + epochs_with_ce(0.7), 2, 15) is None  # after it
    left_once = epochs_with_ce(0.70, 0.67, 0.6932, 0.6931, 0.695)  # 0.67 < 0.6724: it learnt something
    assert train_log.chance_note(left_once, 2, 15) is None
    assert train_log.chance_note(epochs_with_ce(1.36, 1.35), num_classes=4, epochs=6) is not None  # 0.97 x log 4 = 1.345
    assert train_log.chance_note(epochs_with_ce(1.36, 1.34), num_classes=4, epochs=6) is None
    assert train_log.chance_note(epochs_with_ce(0.7), num_classes=2, epochs=5) is None  # a third under 2 epochs: none


def test_a_run_that_learns_nothing_says_so_once_even_when_quiet(tiny_shards, tmp_path, capsys):
    train(tiny_config(tiny_shards, tmp_path / "run", epochs=6, lr=1e-9, cf="none", reg="none"))
    printed = capsys.readouterr().err
    assert printed.count("note: after 2 of 6 epochs the classification loss is still at chance") == 1
