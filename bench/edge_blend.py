"""How much of the masks' edges `--f-erode blend` (the default) drops, on a split of shards.

    python bench/edge_blend.py SHARDS/train [SHARDS2/train ...] [--samples 512]

For the first `--samples` boxed samples of each split, as the trainer reads them (decoded from
the shards, masks included), it counts the masks' edge pixels (those with a neighbour outside
the mask), the share of them that blend drops, and how many images lose any. A sharp mask drawn
with a contrasting outline loses next to none; a mask whose edge mixes the object with its own
background (antialiasing, blur, JPEG, a threshold) loses much of its edge: that rim would tell
the factual's label by the image's own place.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from cfrobust.trainer.pixels import blended_edge, mask_edge


def load_probe():
    """bench/factual_probe.py, whose boxed_batches reads a split's boxed samples with masks."""
    spec = importlib.util.spec_from_file_location("factual_probe", Path(__file__).with_name("factual_probe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def edge_counts(pixels: torch.Tensor, masks: torch.Tensor) -> tuple[int, int, int]:
    """(edge pixels, of them dropped by blend, images that lose any) of one batch; pixels in [0, 1]."""
    edge = mask_edge(masks)
    dropped = blended_edge(pixels, masks)
    return int(edge.sum()), int(dropped.sum()), int(dropped.flatten(1).any(dim=1).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("splits", type=Path, nargs="+", help="split folders of shards, e.g. SHARDS/train")
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args()
    probe = load_probe()
    for split in args.splits:
        edges = dropped = touched = images = 0
        for batch in probe.boxed_batches(split, args.samples, 64, masks=True):
            counts = edge_counts(batch.images.float() / 255, batch.masks)
            edges, dropped, touched = edges + counts[0], dropped + counts[1], touched + counts[2]
            images += len(batch)
        share = dropped / max(edges, 1)
        print(f"{split}: {images} boxed images, {edges} edge pixels, blend drops {dropped} ({share:.1%}); "
              f"{touched} images lose any")


if __name__ == "__main__":
    main()
