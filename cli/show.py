"""`cfrobust show`: shards (+ a checkpoint) -> a PNG grid of what training sees."""

from __future__ import annotations

import click

from cfrobust.cli.options import comma_list


@click.command(context_settings={"max_content_width": 100})
@click.option("--shards", required=True, help="Shard root made by `cfrobust preprocess`: a folder or a URL.")
@click.option("--split", default="train", show_default=True, help="Split to draw samples from.")
@click.option("-n", "count", default=16, show_default=True, help="Samples (rows); all of the split if it holds fewer.")
@click.option("--seed", default=0, show_default=True, help="Picks the samples and the factuals' randomness.")
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--checkpoint", default=None, help="Add predictions and saliency columns (input gradient, integrated gradients, Grad-CAM).")
@click.option(
    "--f",
    "factual",
    default=None,
    help="Factual modes, one column each, e.g. random,mrand ('none': no column)  "
    "[default: random,shuffle,mrand; with --checkpoint also fgsm,pgd]",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (for --checkpoint).")
def show(shards, split, count, seed, out, checkpoint, factual, device) -> None:
    """Draw a grid, one row per sample: original | boxes (and mask) | each stored counterfactual |
    one factual per --f mode, made by the trainer's own code | with --checkpoint, saliency maps,
    and the prediction in the first column.

    \b
      cfrobust show --shards S --split val -n 8 --out grid.png --checkpoint RUN/checkpoints/best.pt
    """
    from cfrobust.trainer.visualize import render_grid, write_png

    from pathlib import Path

    from cfrobust.errors import UserError
    from cfrobust.outputs import check_output_file

    if Path(out).suffix.lower() != ".png":
        raise UserError(f"--out {out}: the grid is a PNG picture; give a .png file name")
    check_output_file(Path(out), [Path(checkpoint)] if checkpoint else [])
    modes = None if factual is None else comma_list(factual)
    grid = render_grid(shards, split, count, seed, modes, checkpoint, device)
    path = write_png(out, grid.image)
    for note in grid.notes:
        click.echo(f"note: {note}")
    click.echo(f"{path}: {len(grid.keys)} samples x {len(grid.titles)} columns ({', '.join(grid.titles)})")
