"""Does a trained model read the label from a pasted object's background? A probe of a checkpoint.

    python bench/factual_probe.py --checkpoint RUN/checkpoints/last.pt --split SHARDS/train
                                  [--samples 2048] [--batch 64] [--seed 0]

It pastes each training image's object (its mask, else its boxes) on the tile-filled background
of another image of the batch, as `--f mrand` does (the object's region as the run had it, not
shrunk by its --f-erode), and prints the model's accuracy when that image is of another class
(what the official rule, `--f-partner other-class`, trains on) and of the same class. A model
that decides by the object scores alike on both. A model that has learned "a pasted object means
the other class's background" scores high on the first and low on the second: it fits the
factual rows without the object. More rows help to read it: the images as they are; each image
with its own box tile-filled and its object put back (the paste's seams on its own background);
and the other-class paste with the mask shrunk by 1 and 2 pixels, and with the mask's blended edge
pixels dropped (`--f-erode blend`). A model that reads the thin rim
of the image's own background that a mask's edge keeps (see `--f-erode`) loses most of its
other-class accuracy there; one that reads the shape should lose little.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from cfrobust.shards.reader import collate, decode_sample, iter_raw_samples, shard_paths, split_info
from cfrobust.trainer.checkpoint import load_classifier
from cfrobust.trainer.factual import batch_partner
from cfrobust.trainer.fills import online_tile, pixel_units
from cfrobust.trainer.pixels import blended_edge, box_masks, erode, normalize, using_normalization

PROBES = ("as they are", "own background, box tiled", "other-class background", "same-class background",
          "other-class, mask eroded 1 px", "other-class, mask eroded 2 px", "other-class, blended edge dropped")


@torch.no_grad()
def probe_batch(model, batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Probe name -> whether each prediction of the batch is right."""
    x = normalize(batch.images)
    rects = box_masks(batch.boxes, batch.box_valid, x.shape[2], x.shape[3])
    region = rects if batch.masks is None else batch.masks
    tiled = online_tile(x, rects)
    inputs = {
        PROBES[0]: x,
        PROBES[1]: torch.where(region, x, tiled),
        PROBES[2]: torch.where(region, x, tiled[batch_partner(batch.labels, generator, "other-class")]),
        PROBES[3]: torch.where(region, x, tiled[batch_partner(batch.labels, generator, "same-class")]),
    }
    other = tiled[batch_partner(batch.labels, generator, "other-class")]
    inputs[PROBES[4]] = torch.where(erode(region, 1), x, other)
    inputs[PROBES[5]] = torch.where(erode(region, 2), x, other)
    inputs[PROBES[6]] = torch.where(region & ~blended_edge(pixel_units(x), region), x, other)
    return {name: model(images).argmax(dim=1) == batch.labels for name, images in inputs.items()}


def boxed_batches(split: Path, samples: int, batch: int, masks: bool):
    """Batches of the split's first `samples` samples that have a box (with their masks if asked)."""
    info = split_info(split)
    paths = shard_paths(split, info, [shard["name"] for shard in info["shards"]])
    decoded = (decode_sample(raw, []) for raw in iter_raw_samples(paths, [], masks=masks))
    boxed = itertools.islice((sample for sample in decoded if sample["boxes"]), samples)
    while chunk := list(itertools.islice(boxed, batch)):
        yield collate(chunk, masks=masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True, help="a split folder of shards, e.g. SHARDS/train")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64, help="the batch partners are drawn from (train's --batch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, config, _ = load_classifier(args.checkpoint)
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    right, seen = dict.fromkeys(PROBES, 0), 0
    with using_normalization(config.get("normalize", "imagenet")):
        for batch in boxed_batches(args.split, args.samples, args.batch, config.get("object_region") == "mask"):
            for name, correct in probe_batch(model, batch, generator).items():
                right[name] += int(correct.sum())
            seen += len(batch)
    print(f"{args.checkpoint} on {seen} boxed images of {args.split} (accuracy):")
    for name in PROBES:
        print(f"  {name:28s} {right[name] / max(seen, 1):.3f}")


if __name__ == "__main__":
    main()
