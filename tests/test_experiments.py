"""The paper's data experiments: data ratio, box fraction and box noise, all seeded by key."""

from __future__ import annotations

import numpy as np
import pytest

from cfrobust.shards.experiments import DataExperiment, unit_hash
from cfrobust.shards.reader import TrainShards, shard_keys


def sample(key: str, boxes, size=(20, 30)):
    return {"key": key, "boxes": boxes, "image": np.zeros((*size, 3), np.uint8)}


def test_unit_hash_is_stable_and_spread():
    assert unit_hash(0, "data", "k1") == unit_hash(0, "data", "k1")
    values = [unit_hash(3, "data", f"key{i}") for i in range(4000)]
    assert 0 <= min(values) and max(values) < 1
    assert np.mean(values) == pytest.approx(0.5, abs=0.02)


def test_data_ratio_keeps_that_share_of_keys_whatever_the_epoch():
    experiment = DataExperiment(seed=1, data_ratio=0.3)
    kept = [experiment.keeps(f"img{i}") for i in range(4000)]
    assert np.mean(kept) == pytest.approx(0.3, abs=0.03)
    assert kept == [experiment.keeps(f"img{i}") for i in range(4000)]
    assert np.mean([DataExperiment(seed=2, data_ratio=0.3).keeps(f"img{i}") == k for i, k in enumerate(kept)]) < 0.7


def test_box_fraction_turns_the_rest_into_plain_erm():
    experiment = DataExperiment(seed=0, box_fraction=0.25)
    out = [experiment.apply(sample(f"k{i}", [[1, 1, 5, 5]])) for i in range(4000)]
    with_boxes = [o for o in out if o["boxes"]]
    assert len(with_boxes) / 4000 == pytest.approx(0.25, abs=0.03)
    assert all(o["boxes"] == [[1, 1, 5, 5]] for o in with_boxes)


def test_box_noise_moves_each_box_by_its_share_of_the_room_and_keeps_its_size():
    box = [4.0, 2.0, 10.0, 8.0]  # in a 30-wide, 20-high image: room 4 left, 20 right, 2 up, 12 down
    for noise in (0.5, 1.0):
        experiment = DataExperiment(seed=0, bbox_noise=noise)
        for i in range(50):
            x0, y0, x1, y1 = experiment.apply(sample(f"k{i}", [box]))["boxes"][0]
            assert (x1 - x0, y1 - y0) == (6.0, 6.0)
            assert x0 - 4 in (pytest.approx(-4 * noise), pytest.approx(20 * noise))
            assert y0 - 2 in (pytest.approx(-2 * noise), pytest.approx(12 * noise))
            assert 0 <= x0 and x1 <= 30 and 0 <= y0 and y1 <= 20
    moved = {tuple(DataExperiment(seed=0, bbox_noise=1.0).apply(sample(f"k{i}", [box]))["boxes"][0]) for i in range(50)}
    assert len(moved) == 4  # all four corners of the room are reached


def test_train_stream_yields_only_the_kept_subset(tiny_shards):
    experiment = DataExperiment(seed=7, data_ratio=0.5, box_fraction=0.0)
    data = TrainShards(tiny_shards / "train", 8, [], seed=7, experiment=experiment)
    batches = list(data.iter_worker(0, 1))
    all_keys = [k for shard in sorted((tiny_shards / "train").glob("*.tar")) for k in shard_keys(shard)]
    kept = sum(map(experiment.keeps, all_keys))
    assert len(all_keys) == 96 and 30 < kept < 66
    assert len(batches) == len(data) == kept // 8  # exact: the subset is counted, never cycled
    keys = [k for b in batches for k in b.keys]
    assert all(experiment.keeps(k) for k in keys) and len(set(keys)) == len(keys)
    assert not any(b.box_valid.any() for b in batches)  # box_fraction 0: every image trains as ERM
