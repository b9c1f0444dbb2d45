"""Shared fixtures: tiny shards made once per test session from the built-in dataset."""

from __future__ import annotations

import pytest
import torch

from cfrobust.datasets import open_dataset
from cfrobust.preprocess.cagan.inpaint import CaganSettings
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.preprocess.cagan.weights import save_weights
from cfrobust.preprocess.pipeline import preprocess

OFFLINE_FILLS = ["mean", "tile", "random", "shuffle", "telea", "ns", "cagan"]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """32-px built-in dataset, 96/32/32 images in shards of 16, with every offline fill
    (`cagan` from a small untrained generator: the trainer only needs its images)."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_weights(folder / "cagan.pt", Generator(cnum=4), meta={"image_size": 32})
    dataset = open_dataset("synthetic", seed=3, sizes=(96, 32, 32), image_size=32)
    preprocess(dataset, folder / "shards", OFFLINE_FILLS, shard_size=16, progress=False,
               cagan=CaganSettings(folder / "cagan.pt", "cpu", 16))
    return folder / "shards"


@pytest.fixture(autouse=True)
def imagenet_normalization():
    """Every test starts with the default normalisation, whatever an earlier in-process run set."""
    from cfrobust.trainer.pixels import set_normalization

    set_normalization("imagenet")
    yield
    set_normalization("imagenet")
