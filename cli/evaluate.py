"""`cfrobust eval`: checkpoint + shards -> eval.json."""

from __future__ import annotations

import click

from cfrobust.cli.options import comma_list


@click.command(name="eval", context_settings={"max_content_width": 100})
@click.option("--checkpoint", required=True, help="A checkpoint written by `cfrobust train` (best.pt, last.pt).")
@click.option("--shards", required=True, help="Shard root holding the split folders to score.")
@click.option("--out", required=True, help="Where to write the eval JSON (schema cfrobust.eval/1).")
@click.option("--splits", default="", help="Comma-separated splits to score  [default: every split but train]")
@click.option("--batch", default=256, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes.")
def evaluate(checkpoint, shards, out, splits, batch, device, workers) -> None:
    """Score a checkpoint on shard splits: accuracy, loss, ECE, AUROC, per-group and
    worst-group accuracy."""
    from cfrobust.trainer.evaluate import evaluate_checkpoint

    document = evaluate_checkpoint(checkpoint, shards, comma_list(splits) or None, out, batch, device, workers)
    for split, figures in document["splits"].items():
        click.echo(
            f"{split}: n={figures['n']} accuracy {figures['accuracy']:.4f} "
            f"worst-group {figures['worst_group_accuracy']:.4f}"
        )
    click.echo(f"written to {out}")
