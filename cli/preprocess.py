"""`cfrobust preprocess`: raw dataset -> shards with precomputed counterfactuals."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cfrobust.cli.options import comma_list
from cfrobust.datasets import DATASET_NAMES
from cfrobust.datasets.synthetic_variants import VARIANT_NAMES, variants_help
from cfrobust.errors import UserError

SHOWN_PROBLEMS = 10  # skipped records printed per split; all of them are in _info.json

# Which source options each dataset takes (the rest must stay unset).
SOURCE_OPTIONS = {
    "synthetic": ("seed", "synthetic_sizes", "synthetic_image_size", "synthetic_correlation", "variant", "twin"),
    "waterbirds": ("root", "boxes", "cub_root", "seg_rule"),
    "in9": ("root", "train_root", "loc_csv"),
    "in9l": ("root", "train_root", "loc_csv"),
    "cct": ("root", "images"),
    "coco": ("images", "annotations"),
    "folder": ("root", "boxes_csv"),
}
REQUIRED = {"waterbirds": ("root",), "in9": ("root",), "in9l": ("root",), "cct": ("root",),
            "coco": ("images", "annotations"), "folder": ("root",)}
DEFAULTS = {"seed": 0, "synthetic_sizes": "2000,400,800", "synthetic_image_size": 64, "synthetic_correlation": None,
            "variant": "default", "twin": False, "boxes": "segmentation"}

existing = click.Path(exists=True, path_type=Path)


@click.command(context_settings={"max_content_width": 100})
@click.option("--dataset", type=click.Choice(DATASET_NAMES), required=True, help="Source format (see README).")
@click.option("--out", required=True, help="Shard root to create (OUT/<split>/): a folder, or a URL of a writable store "
              "(s3://, gs://, any fsspec protocol), where each shard is uploaded once complete.")
@click.option("--root", type=existing, help="Dataset folder (waterbirds, cct, folder); in9/in9l: the test-set release (its bg_challenge folder, or the folder holding it).")
@click.option("--cf", default="tile", show_default=True, help="Counterfactual fills to precompute, comma-separated (mean, random, shuffle, tile, telea, ns, cagan) or none.")
@click.option("--cagan-weights", type=existing, help="cagan: generator weights from `cfrobust cagan train` or `cfrobust cagan import`.")
@click.option("--device", default="auto", show_default=True,
              help="cagan: where the generator runs: auto (this process's GPU when there is one), cpu, cuda, cuda:N.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1), help="cagan: images per generator batch.")
@click.option("--size", type=int, default=None, help="Stored image side in pixels  [default: 256, or the training images' median shorter side when "
              "that is under 205 px (small images are not upscaled); synthetic: its image size]")
@click.option("--masks-from-boxes", type=click.Choice(("none", "grabcut")), default="none", show_default=True,
              help="Records with boxes but no mask: none (F and Sal use the rectangles), or grabcut (GrabCut cuts the "
              "object out of its boxes and the shards store that as its mask; about 10 ms an image at 64 px).")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--strict", is_flag=True, help="Stop at the first bad record instead of skipping it.")
@click.option("--overwrite", is_flag=True, help="Delete this process's earlier output under OUT first.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: keep its complete shards, redo the rest.")
@click.option("--workers", default=1, show_default=True, help="Processes that build samples in parallel (same output for any count).")
@click.option("--rank", type=int, default=lambda: int(os.environ.get("RANK", 0)), show_default="$RANK or 0", help="This process's slice, for several machines writing one OUT.")
@click.option("--world-size", type=int, default=lambda: int(os.environ.get("WORLD_SIZE", 1)), show_default="$WORLD_SIZE or 1", help="Number of processes writing OUT; the last to finish merges the manifests.")
@click.option("--boxes", type=click.Choice(["segmentation", "cub"]), help="waterbirds: object from CUB segmentations (default) or CUB bounding boxes.")
@click.option("--cub-root", type=existing, help="waterbirds: CUB_200_2011 folder (images.txt, bounding_boxes.txt); segmentations/ may be inside it or beside it.")
@click.option("--seg-rule", type=click.Choice(["nonzero", "all255"]),
              help="waterbirds: segmentation pixels that are the bird: nonzero (default, the official code's rule) or all255 (only pixels 255 in every channel, without the soft grey edges).")
@click.option("--train-root", type=existing, help="in9/in9l: folder of the unpacked training archives (original/, in9l/, no_fg/), where train and val come from  [default: --root]")
@click.option("--loc-csv", type=existing, help="in9/in9l: ImageNet LOC_train_solution.csv, for boxes where no mask exists.")
@click.option("--images", type=existing, help="cct: image folder (default ROOT/eccv_18_all_images_sm); coco: image root.")
@click.option("--annotations", multiple=True, metavar="SPLIT=FILE", help="coco: a COCO JSON per split, e.g. --annotations train=train.json (repeat).")
@click.option("--boxes-csv", type=existing, help="folder: CSV of boxes, header path,x0,y0,x1,y1.")
@click.option("--seed", type=int, help="synthetic: seed  [default: 0]")
@click.option("--synthetic-sizes", help="synthetic: train,val,test counts  [default: 2000,400,800]")
@click.option("--synthetic-image-size", type=int, help="synthetic: image side in pixels  [default: 64]")
@click.option("--synthetic-correlation", type=float, help="synthetic: share of training images whose background agrees with the label  [default: the variant's; 0.95 for default]")
@click.option("--variant", type=click.Choice(VARIANT_NAMES), help=f"synthetic: member of the benchmark family: {variants_help()}  [default: default]")
@click.option("--twin", is_flag=True, help="synthetic: the variant's uncorrelated twin: the same objects, each training place drawn independently of the label.")
def preprocess(
    dataset, out, cf, cagan_weights, device, batch, size, masks_from_boxes, shard_size, strict, overwrite, resume, workers,
    rank, world_size, **source,
):
    """Validate and resize a dataset, precompute its counterfactual images and write
    WebDataset shards with the boxes: OUT/<split>/<split>-NNNNNN.tar + _info.json."""
    from cfrobust.datasets import open_dataset
    from cfrobust.preprocess.cagan.inpaint import CaganSettings
    from cfrobust.preprocess.pipeline import preprocess as run_preprocess
    from cfrobust.shards.remote import location

    out = location(out)  # a Path, or a URL
    methods = comma_list(cf)
    if cagan_weights and "cagan" not in methods:
        raise UserError("--cagan-weights is only used with --cf cagan")
    adapter = open_dataset(dataset, **adapter_options(dataset, source))
    summaries = run_preprocess(
        adapter, out, methods, size, shard_size, strict, overwrite,
        resume=resume, workers=workers, rank=rank, world_size=world_size,
        cagan=CaganSettings(cagan_weights, device, batch) if cagan_weights else None, masks_from_boxes=masks_from_boxes,
    )
    for note in adapter.notes():
        click.echo(f"note: {note}")
    print_summary(summaries, out, rank if world_size > 1 else None)


def adapter_options(dataset: str, given: dict) -> dict:
    """Check which source options apply to `dataset` and turn them into adapter arguments."""
    allowed = SOURCE_OPTIONS[dataset]
    stray = [k for k, v in given.items() if not unset(v) and k not in allowed]
    if stray:
        raise click.UsageError(f"--{stray[0].replace('_', '-')} does not apply to --dataset {dataset}")
    missing = [k for k in REQUIRED.get(dataset, ()) if unset(given.get(k))]
    if missing:
        raise click.UsageError(f"--dataset {dataset} needs --{missing[0].replace('_', '-')}")
    values = {k: given[k] if not unset(given.get(k)) else DEFAULTS.get(k) for k in allowed}
    if dataset == "synthetic":
        return dict(
            seed=values["seed"],
            sizes=synthetic_sizes(str(values["synthetic_sizes"])),
            image_size=values["synthetic_image_size"],
            correlation=values["synthetic_correlation"],
            variant=values["variant"],
            twin=values["twin"],
        )
    if dataset == "coco":
        return {"images": values["images"], "annotations": split_files(values["annotations"])}
    return values


def unset(value) -> bool:
    """An option left out: no value, no repeated value, or a flag not given (by identity: 0 and
    0.0 are values)."""
    return value is None or value == () or value is False


def synthetic_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in comma_list(text))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected TRAIN,VAL,TEST image counts", param_hint="--synthetic-sizes") from None


def split_files(pairs) -> dict[str, Path]:
    """SPLIT=FILE pairs; a split is one plain folder name under --out, given once."""
    files = {}
    for pair in pairs:
        split, sep, path = pair.partition("=")
        if not sep or not split or not Path(path).is_file():
            raise click.BadParameter(f"{pair!r}: expected SPLIT=FILE with an existing file", param_hint="--annotations")
        if split in (".", "..") or Path(split).name != split or "\\" in split:
            raise click.BadParameter(f"{pair!r}: the split {split!r} must be a plain folder name", param_hint="--annotations")
        if split in files:
            raise click.BadParameter(f"{pair!r}: split {split!r} is given twice", param_hint="--annotations")
        files[split] = Path(path)
    return files


def print_summary(summaries, out: Path, rank: int | None = None) -> None:
    """Per split: samples written and skipped. `rank` is set for one of several processes,
    whose slice may well be empty (more processes than records) without anything being wrong."""
    for s in summaries:
        kept = f" ({s.resumed_shards} shards kept from the interrupted run)" if s.resumed_shards else ""
        click.echo(f"{s.split:>8}: {s.written} samples written, {len(s.skipped)} skipped{kept}")
        if s.upscaled:
            click.echo(f"          warning: {s.upscaled} upscaled, their source smaller than --size (the smallest "
                       f"side {s.smallest_side} px); --size {s.smallest_side} or less upscales none")
        for problem in s.skipped[:SHOWN_PROBLEMS]:
            click.echo(f"          skipped {problem['key']} ({problem['source']}): {problem['reason']}")
        if len(s.skipped) > SHOWN_PROBLEMS:
            click.echo(f"          ... and {len(s.skipped) - SHOWN_PROBLEMS} more, listed in {out / s.split / '_info.json'}")
    sizes = sorted({s.size for s in summaries if s.size})
    click.echo(f"shards in {out}" + (f", images stored at {sizes[0]} x {sizes[0]} px" if len(sizes) == 1 else ""))
    if summaries and not any(s.written for s in summaries):
        if rank is not None:
            click.echo(f"rank {rank} wrote no sample: its slice of every split is empty or was skipped")
            return
        raise UserError(f"{out}: no sample was written (every split is empty or every record was skipped)")
