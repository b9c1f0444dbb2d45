"""`cfrobust eval`: checkpoint + shards -> eval.json."""

from __future__ import annotations

import os

import click

from cfrobust.cli.options import comma_list


@click.command(name="eval", context_settings={"max_content_width": 100})
@click.option("--checkpoint", required=True, help="A checkpoint written by `cfrobust train` (best.pt, last.pt).")
@click.option("--shards", required=True, help="Shard root holding the split folders to score: a folder or a URL "
              "(https://, s3://, gs://, any fsspec protocol, or 'pipe:COMMAND' with {} for the file's path).")
@click.option("--cache-dir", default=None, help="With a URL --shards: keep each shard read here once its sha256 matches the manifest.")
@click.option("--out", required=True, help="Where to write the eval JSON (schema cfrobust.eval/1).")
@click.option("--splits", default="", help="Comma-separated splits to score  [default: every split but train]")
@click.option(
    "--ood", default="",
    help="Comma-separated noise kinds (gaussian, uniform) to detect as out-of-distribution against each split: "
    "FPR at 95% TPR, AUROC, AUPR of the score 1 - max softmax.",
)
@click.option("--ood-samples", type=int, default=None, help="Noise images per kind  [default: as many as the split]")
@click.option("--ood-seed", default=0, show_default=True, help="Seed of the noise images.")
@click.option(
    "--saliency-focus", is_flag=True,
    help="Also score the share of input-gradient saliency inside the boxes (one more forward and backward "
    "per batch; lower --batch if the device runs out of memory).",
)
@click.option("--batch", default=256, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes.")
def evaluate(checkpoint, shards, cache_dir, out, splits, ood, ood_samples, ood_seed, saliency_focus, batch, device, workers) -> None:
    """Score a checkpoint on shard splits: accuracy, loss, ECE, AUROC, AUPR, per-group and
    worst-group accuracy, the dataset's headline figures; optionally OOD detection of noise
    images and saliency focus. Runs under torchrun too (each split is read once in all)."""
    from cfrobust.trainer.evaluate import evaluate_checkpoint

    document = evaluate_checkpoint(
        checkpoint, shards, comma_list(splits) or None, out, batch, device, workers,
        ood=comma_list(ood), ood_samples=ood_samples, ood_seed=ood_seed, saliency_focus=saliency_focus,
        cache_dir=cache_dir,
    )
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    for split, figures in document["splits"].items():
        click.echo(split_line(split, figures))
    for name, value in document["derived"].items():
        click.echo(f"{name}: {_fmt(value)}")  # None where a split lacks the groups a figure needs
    click.echo(f"written to {out}")


def split_line(split: str, figures: dict) -> str:
    if not figures.get("n"):
        return f"{split}: no samples"
    line = f"{split}: n={figures['n']} accuracy {figures['accuracy']:.4f} worst-group {figures['worst_group_accuracy']:.4f}"
    if figures.get("saliency_focus") is not None:
        line += f" saliency-focus {figures['saliency_focus']:.4f}"
    for kind, ood in figures.get("ood", {}).items():
        line += f" | {kind}: FPR@95TPR {_fmt(ood['fpr_at_95_tpr'])} AUROC {_fmt(ood['auroc'])}"
    return line


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
