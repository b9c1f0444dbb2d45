"""Shared fixtures: tiny shards made once per test session from the built-in dataset."""

from __future__ import annotations

import pytest

from cfrobust.datasets import open_dataset
from cfrobust.preprocess.pipeline import preprocess


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """32-px built-in dataset, 96/32/32 images in shards of 16, with every offline fill."""
    root = tmp_path_factory.mktemp("tiny") / "shards"
    dataset = open_dataset("synthetic", seed=3, sizes=(96, 32, 32), image_size=32)
    preprocess(dataset, root, ["mean", "tile", "random", "shuffle", "telea", "ns"], shard_size=16, progress=False)
    return root
