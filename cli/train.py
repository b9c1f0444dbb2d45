"""`cfrobust train`: shards -> run folder."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from cfrobust.cli.options import dataclass_options
from cfrobust.trainer.config import TrainConfig


@click.command(context_settings={"max_content_width": 100})
@dataclass_options(TrainConfig, required=("shards", "out"))
@click.pass_context
def train(ctx, **options) -> None:
    """Train a classifier on shards, with the counterfactual (--cf), factual (--f) and saliency
    (--reg) terms of the method, and score the best checkpoint into OUT/eval.json.

    \b
    One process:   cfrobust train --shards S --out RUN --cf tile --f mrand --reg bbox_o
    N GPUs:        torchrun --nproc_per_node=N -m cfrobust train --shards S --out RUN ...

    \b
    While it runs: a progress bar on a terminal (images/s, running loss terms), one line per
    epoch, OUT/metrics.jsonl (one JSON record per epoch) and, with --tensorboard, OUT/tensorboard/.
    """
    from cfrobust.trainer.train import train as run_training

    explicit = {name for name in options if ctx.get_parameter_source(name) != ParameterSource.DEFAULT}
    config = TrainConfig(**options).with_preset(explicit)
    if config.preset != "none" and not config.pretrained and os.environ.get("RANK", "0") == "0":
        # The paper fine-tunes ImageNet weights; its presets' schedules do not train from scratch.
        click.echo(f"warning: --preset {config.preset} without --pretrained trains {config.arch} from random "
                   f"weights; the paper starts from ImageNet weights (--pretrained FILE)", err=True)
    document = run_training(config)
    test = document["splits"].get("test")
    if test is not None and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        click.echo(
            f"test accuracy {test['accuracy']:.4f}, worst-group {test['worst_group_accuracy']:.4f} "
            f"(best epoch {document['best_epoch']}); written to {options['out']}/eval.json"
        )
