"""bench/factual_probe.py: which backgrounds the probe pastes an object on, checked with a model
that reads nothing but the background."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from cfrobust.shards.reader import Batch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "factual_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("factual_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CornerReader(nn.Module):
    """Class 1 where the top-left pixel is bright, else class 0: a pure background reader."""

    def forward(self, x):
        corner = x[:, 0, 0, 0]
        return torch.stack([-corner, corner], dim=1)


def test_a_background_reader_is_right_on_its_own_and_same_class_backgrounds_and_wrong_on_the_others():
    probe = load_probe()
    labels = torch.tensor([0, 0, 1, 1])
    images = torch.where(labels[:, None, None, None] == 1, 230, 20).expand(4, 3, 12, 12).to(torch.uint8).clone()
    images[:, :, 4:8, 4:8] = 128  # the object, alike in every class
    masks = torch.zeros(4, 1, 12, 12, dtype=torch.bool)
    masks[:, :, 4:8, 4:8] = True
    batch = Batch(images=images, labels=labels, boxes=torch.tensor([[[3.0, 3.0, 9.0, 9.0]]] * 4),
                  box_valid=torch.ones(4, 1, dtype=torch.bool), masks=masks)
    right = probe.probe_batch(CornerReader(), batch, torch.Generator().manual_seed(0))
    assert list(right) == list(probe.PROBES)
    accuracy = {name: correct.float().mean().item() for name, correct in right.items()}
    assert accuracy == {
        "as they are": 1.0,
        "own background, box tiled": 1.0,
        "other-class background": 0.0,
        "same-class background": 1.0,
        "other-class, mask eroded 1 px": 0.0,
        "other-class, mask eroded 2 px": 0.0,
        "other-class, blended edge dropped": 0.0,
    }


def test_edge_blend_counts_the_edge_pixels_blend_drops():
    spec = importlib.util.spec_from_file_location("edge_blend", SCRIPT.with_name("edge_blend.py"))
    edge_blend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edge_blend)
    background, fill = torch.tensor([0.2, 0.6, 0.2]), torch.tensor([0.9, 0.1, 0.1])
    pixels = background.view(1, 3, 1, 1).repeat(2, 1, 12, 12)
    pixels[:, :, 3:9, 3:9] = fill.view(3, 1, 1)
    pixels[0, :, 3, 3:9] = (0.5 * fill + 0.5 * background).view(3, 1)  # image 0: its top edge a blend
    masks = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
    masks[..., 3:9, 3:9] = True
    assert edge_blend.edge_counts(pixels, masks) == (2 * 20, 6, 1)  # a 6x6 square's edge: 20 pixels
