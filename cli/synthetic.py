"""`cfrobust synthetic`: a member of the built-in benchmark family -> raw files in a real layout.

The files read back through `cfrobust preprocess --dataset waterbirds` or `--dataset coco`.
"""

from __future__ import annotations

from pathlib import Path

import click

from cfrobust.datasets.export import IMAGE_FORMATS, LAYOUTS
from cfrobust.datasets.synthetic_variants import DEFAULT_VARIANT, VARIANT_NAMES, variants_help


@click.command(context_settings={"max_content_width": 100})
@click.option("--variant", type=click.Choice(VARIANT_NAMES), default=DEFAULT_VARIANT, show_default=True,
              help=f"Member of the family: {variants_help()}.")
@click.option("--twin", is_flag=True, help="The uncorrelated twin: the same objects, each training place drawn independently of the label.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the dataset.")
@click.option("--synthetic-sizes", default="2000,400,800", show_default=True, help="train,val,test image counts.")
@click.option("--synthetic-image-size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--synthetic-correlation", type=float, help="Share of training images whose place agrees with the label  [default: the member's]")
@click.option("--export-layout", type=click.Choice(LAYOUTS), required=True,
              help="waterbirds: metadata.csv, class folders, segmentations/ (2 classes only); coco: images/ + annotations/<split>.json.")
@click.option("--image-format", type=click.Choice(IMAGE_FORMATS), default="png", show_default=True, help="png keeps every pixel; jpg as the real releases.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write (must be missing or empty).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in OUT (a folder holding anything else is refused).")
def synthetic(variant, twin, seed, synthetic_sizes, synthetic_image_size, synthetic_correlation, export_layout,
              image_format, out, overwrite) -> None:
    """Write a member of the built-in benchmark family (or its uncorrelated twin) as files in the
    Waterbirds or COCO layout, to read back through those adapters.

    \b
      cfrobust synthetic --variant shapes --twin --export-layout waterbirds --out wb_shapes_twin
      cfrobust preprocess --dataset waterbirds --root wb_shapes_twin --out shards
    """
    from cfrobust.cli.preprocess import synthetic_sizes as parse_sizes
    from cfrobust.datasets import open_dataset
    from cfrobust.datasets.export import export_dataset

    dataset = open_dataset("synthetic", seed=seed, sizes=parse_sizes(synthetic_sizes), image_size=synthetic_image_size,
                           correlation=synthetic_correlation, variant=variant, twin=twin)
    summary = export_dataset(dataset, out, export_layout, image_format, overwrite=overwrite)
    counts = ", ".join(f"{split} {n}" for split, n in summary.counts.items())
    click.echo(f"{out}: {sum(summary.counts.values())} images ({counts}) of {variant}{' (twin)' if twin else ''} "
               f"in the {export_layout} layout")
    click.echo(f"read it back with: {summary.read_back_command()}")
