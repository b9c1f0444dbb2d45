"""`cfrobust preprocess`: raw dataset -> shards with precomputed counterfactuals."""

from __future__ import annotations

from pathlib import Path

import click

from cfrobust.cli.options import comma_list
from cfrobust.datasets import DATASET_NAMES

SHOWN_PROBLEMS = 10  # skipped records printed per split; all of them are in _info.json


@click.command(context_settings={"max_content_width": 100})
@click.option("--dataset", type=click.Choice(DATASET_NAMES), required=True, help="Source format.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Shard root to create (OUT/<split>/).")
@click.option("--cf", default="tile", show_default=True, help="Counterfactual fills to precompute, comma-separated (mean, tile) or none.")
@click.option("--size", type=int, default=None, help="Stored image side in pixels  [default: 256; synthetic: its image size]")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--strict", is_flag=True, help="Stop at the first bad record instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Replace split folders that already exist under OUT.")
@click.option("--seed", default=0, show_default=True, help="Seed of the built-in dataset.")
@click.option("--synthetic-sizes", default="2000,400,800", show_default=True, help="Built-in dataset: train,val,test counts.")
@click.option("--synthetic-image-size", default=64, show_default=True, help="Built-in dataset: image side in pixels.")
@click.option("--synthetic-correlation", default=0.95, show_default=True, help="Built-in dataset: share of training images whose background agrees with the label.")
def preprocess(dataset, out, cf, size, shard_size, strict, overwrite, seed, synthetic_sizes, synthetic_image_size, synthetic_correlation):
    """Validate and resize a dataset, precompute its counterfactual images and write
    WebDataset shards with the boxes: OUT/<split>/<split>-NNNNNN.tar + _info.json."""
    from cfrobust.datasets import open_dataset
    from cfrobust.preprocess.pipeline import preprocess as run_preprocess

    options = {}
    if dataset == "synthetic":
        options = dict(
            seed=seed,
            sizes=tuple(int(n) for n in comma_list(synthetic_sizes)),
            image_size=synthetic_image_size,
            correlation=synthetic_correlation,
        )
    source = open_dataset(dataset, **options)
    summaries = run_preprocess(source, out, comma_list(cf), size, shard_size, strict, overwrite)
    print_summary(summaries, out)


def print_summary(summaries, out: Path) -> None:
    for s in summaries:
        click.echo(f"{s.split:>8}: {s.written} samples written, {len(s.skipped)} skipped")
        for problem in s.skipped[:SHOWN_PROBLEMS]:
            click.echo(f"          skipped {problem['key']} ({problem['source']}): {problem['reason']}")
        if len(s.skipped) > SHOWN_PROBLEMS:
            click.echo(f"          ... and {len(s.skipped) - SHOWN_PROBLEMS} more, listed in {out / s.split / '_info.json'}")
    click.echo(f"shards in {out}")
