"""What a training run tells its researcher as it goes: a progress bar (images/s, running loss
terms), one line per epoch, and with --tensorboard scalars under RUN/tensorboard/. Rank 0 only.
"""

# Loss terms stay on the device until they are read, every PROGRESS_EVERY steps: reading one
# each step would make the CPU wait for the GPU before it can queue the next step.

from __future__ import annotations

import contextlib
import importlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cfrobust.errors import UserError

PROGRESS_EVERY = 10  # steps between reads of the running loss terms (each read syncs the device)
VAL_FIGURES = ("accuracy", "loss", "worst_group_accuracy", "mean_group_accuracy")
EPOCH_FIGURES = ("loss", "train_accuracy", "images_per_s", "seconds")
# A classification CE at or above this share of log K is a near-uniform output: no label learnt yet.
# Every run of the built-in family fell below it within 3 epochs; every run of the hold-out set that
# ended near chance stayed above it for 5 or more (README, "The learner comes first").
CHANCE_SHARE = 0.97


def check_log_options(config) -> None:
    """Checked on every rank before the run folder is made: a failure leaves nothing behind that
    would need --overwrite, and no rank trains on alone, waiting for the others."""
    if config.tensorboard:
        require_tensorboard()


def require_tensorboard() -> None:
    """Fail before anything is written when --tensorboard cannot work (the package is optional)."""
    try:
        importlib.import_module("torch.utils.tensorboard")  # which imports the `tensorboard` package
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


def open_summary_writer(log_dir: Path, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class EpochMeter:
    """One epoch's running sums, kept on the device: loss terms by name, correct predictions."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.seen = 0  # images on this rank
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.seen += len(labels)
        self.steps += 1

    def term_means(self) -> dict[str, float]:
        """Mean of each loss term over the steps so far (reads the device)."""
        return {name: float(total) / max(1, self.steps) for name, total in self.sums.items()}

    def summary(self, lr: float, world_size: int) -> dict:
        """The epoch's part of its metrics.jsonl record."""
        seconds = time.perf_counter() - self.start
        terms = self.term_means()
        return {
            "loss": sum(terms.values()),
            "terms": terms,
            "train_accuracy": float(self.correct) / max(1, self.seen),
            "lr": lr,
            "images_per_s": self.seen * world_size / max(seconds, 1e-9),
            "seconds": seconds,
        }


class TrainLog:
    """The bar, the epoch lines and the TensorBoard writer of one run; use as a context manager
    so the writer is closed (and its last scalars flushed) however the run ends."""

    def __init__(self, out: Path, config, is_main: bool, resumed_at: int | None = None):
        self.epochs = config.epochs
        self.show = is_main and not config.quiet
        self.writer = None
        if config.tensorboard and is_main:
            # A resumed run steps again through what the killed one logged after its checkpoint:
            # TensorBoard hides those earlier events from resumed_at + 1 on, so no step shows twice.
            purge = resumed_at + 1 if resumed_at is not None else None
            self.writer = open_summary_writer(Path(out) / "tensorboard", purge)
        self.pending: list[tuple[int, dict[str, torch.Tensor], float]] = []  # steps not yet written
        self.bar = None

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()
        if self.writer is not None:
            # Steps taken before a crash are real: write them (a resume from an earlier
            # checkpoint hides those it takes again). A failing device read must not mask the crash.
            with contextlib.suppress(Exception):
                if self.pending:
                    self._write_steps()
            self.writer.close()

    def start_epoch(self, epoch: int, steps: int, steps_done: int, images_per_step: int) -> None:
        """A bar counting the epoch's images (so its rate is images/s); drawn only on a terminal."""
        self.bar = tqdm(
            total=steps * images_per_step,
            initial=steps_done * images_per_step,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            unit="img",
            unit_scale=True,
            leave=False,
            dynamic_ncols=True,
            disable=None if self.show else True,  # None: tqdm draws only when stderr is a tty
        )

    def after_step(self, step: int, terms: dict[str, torch.Tensor], lr: float, images: int, meter: EpochMeter) -> None:
        self.bar.update(images)
        if self.writer is not None:
            self.pending.append((step, terms, lr))
        if meter.steps % PROGRESS_EVERY == 0:
            self._flush(meter)

    def end_epoch(self, meter: EpochMeter) -> None:
        self._flush(meter)
        self._close_bar()

    def epoch_done(self, record: dict) -> None:
        """The finished epoch's record (train and val figures): one line, and epoch scalars."""
        if self.writer is not None:
            scalars = {f"epoch/{k}": record[k] for k in EPOCH_FIGURES}
            scalars.update({f"epoch/{k}": v for k, v in record["terms"].items()})
            scalars.update({f"val/{k}": record["val"][k] for k in VAL_FIGURES if "val" in record})
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()
        if self.show:
            tqdm.write(epoch_line(record))

    def _flush(self, meter: EpochMeter) -> None:
        if self.bar is not None and not self.bar.disable and meter.steps:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in meter.term_means().items()}, refresh=False)
        if self.writer is not None and self.pending:
            self._write_steps()

    def _write_steps(self) -> None:
        # One device read for all pending steps, then each step's scalars at its own step number.
        values = iter(torch.stack([v for _, terms, _ in self.pending for v in terms.values()]).tolist())
        for step, terms, lr in self.pending:
            by_name = {name: next(values) for name in terms}
            for name, value in by_name.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("train/loss", sum(by_name.values()), step)
            self.writer.add_scalar("train/lr", lr, step)
        self.pending.clear()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def chance_note(metrics: list[dict], num_classes: int, epochs: int) -> str | None:
    """A note for the end of the run's first third (when that is 2 epochs or more) if every epoch
    so far kept the classification CE at chance; None otherwise, and at every other epoch."""
    due = epochs // 3
    if due < 2 or len(metrics) != due:
        return None
    chance = math.log(num_classes)
    losses = [record["terms"].get("ce", 0.0) for record in metrics]
    if min(losses) < CHANCE_SHARE * chance:
        return None
    return (f"note: after {due} of {epochs} epochs the classification loss is still at chance (ce {losses[-1]:.3f}; "
            f"log {num_classes} = {chance:.3f}): the net has not started to learn the labels. From random weights, "
            "small objects on a few thousand images can take longer than the run; pretrained weights (--pretrained), "
            "more images or more --epochs help (README: The learner comes first)")


def epoch_line(record: dict) -> str:
    terms = " ".join(f"{k}={v:.4g}" for k, v in record["terms"].items())
    line = f"epoch {record['epoch']}: loss {record['loss']:.3f} ({terms}) train acc {record['train_accuracy']:.3f}"
    if "val" in record:
        line += f" | val acc {record['val']['accuracy']:.3f} worst group {record['val']['worst_group_accuracy']:.3f}"
    return line + f" | lr {record['lr']:.3g} | {record['images_per_s']:.0f} img/s, {record['seconds']:.1f} s"
