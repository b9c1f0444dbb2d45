"""Any dataset size on any number of processes and loader workers: where a split has fewer shards
than ranks x workers, the readers share it out by sample, with the guarantees of the shard split
(equal full batches on every rank, each sample at most once per epoch, the same batches for the
same seed and epoch; every eval sample exactly once). Shards are made here, a few samples each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.manifest import read_info
from cfrobust.shards.reader import EvalShards, TrainShards, make_loader, sample_places, shard_order
from test_shards import keys_of
from test_shards import shard_keys as tar_keys  # keys read with tarfile, independently of the reader

SEED = 5


def make_split(folder: Path, train: int, shard_size: int) -> Path:
    """A 32-px built-in dataset with `train` training samples (and 8 val, 8 test) in shards of
    `shard_size`, without counterfactuals; returns its train split."""
    dataset = open_dataset("synthetic", seed=1, sizes=(train, 8, 8), image_size=32)
    preprocess(dataset, folder, [], shard_size=shard_size, progress=False)
    return folder / "train"


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    split = make_split(tmp_path_factory.mktemp("one"), 40, 1000)  # 40 samples in one shard
    assert [s["num_samples"] for s in read_info(split)["shards"]] == [40]
    return split


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory) -> Path:
    split = make_split(tmp_path_factory.mktemp("two"), 32, 20)  # shards of 20 and 12
    assert [s["num_samples"] for s in read_info(split)["shards"]] == [20, 12]
    return split


def epoch_by_worker(split: Path, world: int, workers: int, batch: int, epoch: int, seed: int = SEED):
    """{(rank, worker): batches} of one epoch, each (rank, worker) read through iter_worker, and
    the ranks' datasets."""
    by_worker, datasets = {}, []
    for rank in range(world):
        data = TrainShards(split, batch, [], seed, rank=rank, world_size=world, num_workers=workers)
        data.set_epoch(epoch)
        datasets.append(data)
        for worker in range(workers):
            by_worker[(rank, worker)] = list(data.iter_worker(worker, workers))
    return by_worker, datasets


def expected_shares(split: Path, total: int, used: int, seed: int, epoch: int) -> dict[int, set[str]]:
    """What each global worker keeps by the documented rule: the samples in the order the
    epoch reads them (the shards in shard_order, each in tar order) take their places from
    sample_places; place q < used goes to global worker q mod total, places >= used sit out."""
    names = shard_order([s["name"] for s in read_info(split)["shards"]], seed, epoch)
    keys = [k for name in names for k in tar_keys(split / name)]
    places = sample_places(len(keys), seed, epoch)
    shares: dict[int, set[str]] = {w: set() for w in range(total)}
    for key, place in zip(keys, places):
        if place < used:
            shares[int(place) % total].add(key)
    return shares


# ---------------------------------------------------------------- training: one shard, 1 rank x 2 workers


@pytest.mark.parametrize("epoch", [0, 1])
def test_one_shard_two_workers_read_every_sample_once(one_shard, epoch):
    by_worker, (data,) = epoch_by_worker(one_shard, 1, 2, 4, epoch)
    assert (data.by_sample, data.workers, data.per_worker, len(data)) == (True, 2, 5, 10)  # 40 // (2 x 4) = 5
    assert {w: [len(b) for b in batches] for w, batches in by_worker.items()} == {(0, 0): [4] * 5, (0, 1): [4] * 5}
    seen = [k for batches in by_worker.values() for k in keys_of(batches)]
    assert Counter(seen) == Counter(tar_keys(one_shard / "train-000000.tar"))  # all 40, each once
    shares = expected_shares(one_shard, 2, 40, SEED, epoch)
    assert {w: set(keys_of(b)) for (_, w), b in by_worker.items()} == shares


def test_one_shard_two_workers_drop_only_what_equal_batches_need(one_shard):
    # Batch 3: 40 // (2 x 3) = 6 batches each, 36 samples; the 4 at places 36..39 sit the epoch out.
    for epoch in (0, 1):
        by_worker, (data,) = epoch_by_worker(one_shard, 1, 2, 3, epoch)
        assert len(data) == 12 and [len(b) for b in by_worker.values()] == [6, 6]
        seen = [k for batches in by_worker.values() for k in keys_of(batches)]
        assert len(seen) == len(set(seen)) == 36
        shares = expected_shares(one_shard, 2, 36, SEED, epoch)
        assert {w: set(keys_of(b)) for (_, w), b in by_worker.items()} == shares
        dropped = set(tar_keys(one_shard / "train-000000.tar")) - set(seen)
        assert len(dropped) == 4
        if epoch == 0:
            first_dropped = dropped
    assert dropped != first_dropped  # the samples that sit out change with the epoch


def test_one_shard_through_a_dataloader_with_two_workers(one_shard):
    data = TrainShards(one_shard, 4, [], SEED, num_workers=2)
    data.set_epoch(3)
    batches = list(make_loader(data, data.workers))
    assert len(batches) == len(data) == 10
    by_worker, _ = epoch_by_worker(one_shard, 1, 2, 4, 3)
    # The loader alternates its workers: batch i is batch i // 2 of worker i % 2.
    assert [b.keys for b in batches] == [by_worker[(0, i % 2)][i // 2].keys for i in range(10)]


# ---------------------------------------------------------------- training: two shards, 4 ranks x 2 workers


@pytest.mark.parametrize("batch, used", [(2, 32), (3, 24)])  # 32 // (8 x 2) = 2 batches; 32 // (8 x 3) = 1
def test_two_shards_four_ranks_two_workers_equal_batches_each_sample_at_most_once(two_shards, batch, used):
    for epoch in (0, 1):
        by_worker, datasets = epoch_by_worker(two_shards, 4, 2, batch, epoch)
        per_worker = used // (8 * batch)
        assert [(d.by_sample, d.workers, len(d)) for d in datasets] == [(True, 2, 2 * per_worker)] * 4
        assert {w: [len(b) for b in batches] for w, batches in by_worker.items()} == {
            (rank, worker): [batch] * per_worker for rank in range(4) for worker in range(2)
        }
        seen = [k for batches in by_worker.values() for k in keys_of(batches)]
        assert len(seen) == len(set(seen)) == used  # 32: every sample once; 24: 8 sit out
        assert set(seen) <= set(tar_keys(two_shards / "train-000000.tar") + tar_keys(two_shards / "train-000001.tar"))
        shares = expected_shares(two_shards, 8, used, SEED, epoch)
        assert {rank * 2 + worker: set(keys_of(b)) for (rank, worker), b in by_worker.items()} == shares


def test_the_same_seed_and_epoch_give_identical_batches(two_shards, one_shard):
    for split, world in ((two_shards, 4), (one_shard, 1)):
        first, _ = epoch_by_worker(split, world, 2, 2, epoch=1)
        again, _ = epoch_by_worker(split, world, 2, 2, epoch=1)  # fresh datasets: as after --resume
        assert first.keys() == again.keys()
        for where, batches in first.items():
            assert [b.keys for b in batches] == [b.keys for b in again[where]]
            for mine, theirs in zip(batches, again[where]):
                assert torch.equal(mine.images, theirs.images) and torch.equal(mine.labels, theirs.labels)
        other_epoch, _ = epoch_by_worker(split, world, 2, 2, epoch=2)
        other_seed, _ = epoch_by_worker(split, world, 2, 2, epoch=1, seed=SEED + 1)
        shares = lambda run: {w: set(keys_of(b)) for w, b in run.items()}  # noqa: E731
        assert shares(other_epoch) != shares(first) and shares(other_seed) != shares(first)


def test_enough_shards_keep_the_shard_split(two_shards):
    # 2 shards (20 and 12 samples) for 1 rank x 2 workers, batch 6: each worker reads its own shard
    # and gets 2 batches, the smaller shard's 12 // 6, as many as sharing out by sample gives (32 // 12).
    data = TrainShards(two_shards, 6, [], SEED, num_workers=2)
    assert (data.by_sample, data.per_worker, len(data)) == (False, 2, 4)
    names = shard_order(["train-000000.tar", "train-000001.tar"], SEED, 0)
    for worker in range(2):
        assert set(keys_of(data.iter_worker(worker, 2))) <= set(tar_keys(two_shards / names[worker]))


def test_uneven_shards_that_would_drop_batches_share_the_samples_out(two_shards):
    # Batch 4: by shard each worker would stop at the smaller shard's 12 // 4 = 3 batches, 24 of
    # the 32 samples; by sample each gets 32 // 8 = 4, and every sample is read.
    data = TrainShards(two_shards, 4, [], SEED, num_workers=2)
    assert (data.by_sample, data.per_worker, len(data)) == (True, 4, 8)
    seen = [key for worker in range(2) for key in keys_of(data.iter_worker(worker, 2))]
    assert sorted(seen) == sorted(tar_keys(two_shards / "train-000000.tar") + tar_keys(two_shards / "train-000001.tar"))


# ---------------------------------------------------------------- workers the data cannot feed


def test_workers_the_samples_cannot_feed_are_lowered_with_a_note(one_shard, capsys):
    # 40 samples, batch 16: 3 workers would need 48; 2 get one batch each.
    data = TrainShards(one_shard, 16, [], SEED, num_workers=3)
    assert (data.workers, data.by_sample, len(data)) == (2, True, 2)
    assert capsys.readouterr().err == (
        f"note: {one_shard}: 40 samples cannot fill a batch of 16 for each of 1 process(es) x 3 loader workers; "
        f"using --workers 2\n"
    )
    assert len(list(make_loader(data, data.workers))) == 2
    TrainShards(one_shard, 16, [], SEED, rank=1, world_size=2, num_workers=2)  # 40 // (2 x 16): 1 worker per rank
    assert capsys.readouterr().err == ""  # rank 1 says nothing: rank 0 speaks for all
    assert TrainShards(one_shard, 16, [], SEED, rank=1, world_size=2, num_workers=2).workers == 1
    assert TrainShards(one_shard, 16, [], SEED, num_workers=0).workers == 0  # 0 (read in this process) stays


def test_a_loader_with_other_workers_than_the_stream_is_refused(one_shard):
    data = TrainShards(one_shard, 16, [], SEED, num_workers=3)  # lowered to 2
    with pytest.raises(ValueError, match=r"a loader of 3 worker\(s\) reads a stream made for 2"):
        next(data.iter_worker(0, 3))


def test_fewer_samples_in_the_tars_than_counted_are_named(tmp_path, one_shard):
    split = tmp_path / "train"
    split.mkdir()
    (split / "train-000000.tar").write_bytes((one_shard / "train-000000.tar").read_bytes())
    info = json.loads((one_shard / "_info.json").read_text())
    info["shards"][0]["num_samples"] = 44
    (split / "_info.json").write_text(json.dumps(info))
    data = TrainShards(split, 4, [], SEED, num_workers=2)
    with pytest.raises(UserError, match=rf"^{split}: the shards hold fewer samples than _info.json counts"):
        list(data.iter_worker(1, 2))


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("world, workers", [(1, 2), (4, 2), (3, 5)])
def test_eval_reads_every_sample_exactly_once(one_shard, two_shards, world, workers):
    for split in (one_shard, two_shards):
        seen, per_worker = [], []
        for rank in range(world):
            data = EvalShards(split, batch_size=3, rank=rank, world_size=world)
            for worker in range(workers):
                keys = keys_of(data.iter_worker(worker, workers))
                per_worker.append(len(keys))
                seen += keys
        shards = read_info(split)["shards"]
        everything = [k for s in shards for k in tar_keys(split / s["name"])]
        assert Counter(seen) == Counter(everything)
        if len(shards) < world * workers:  # shared out by position: nobody idles
            assert max(per_worker) - min(per_worker) <= 1


def test_eval_one_shard_through_a_dataloader_with_two_workers(one_shard):
    seen = keys_of(make_loader(EvalShards(one_shard, batch_size=8), num_workers=2))
    everything = tar_keys(one_shard / "train-000000.tar")
    assert seen == everything[0:16:2] + everything[1:16:2] + everything[16:32:2] + everything[17:32:2] \
        + everything[32::2] + everything[33::2]  # every other sample each, in batches of 8, 8, 4


# ---------------------------------------------------------------- the commands, at their defaults


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """300 training images at the default --shard-size 1000: one shard per split."""
    out = tmp_path_factory.mktemp("small") / "shards"
    result = CliRunner().invoke(cli, ["preprocess", "--dataset", "synthetic", "--out", str(out),
                                      "--synthetic-sizes", "300,40,40", "--synthetic-image-size", "32"])
    assert result.exit_code == 0, result.output
    assert [s["num_samples"] for s in read_info(out / "train")["shards"]] == [300]
    return out


def test_train_at_its_defaults_on_one_shard(small_dataset, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--shards", str(small_dataset), "--out", str(run),
                                      "--arch", "simple-cnn", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output  # 2 workers x batch 64 fit 300 samples: nothing lowered
    # By sample: 300 // (2 workers x 64) = 2 batches per worker, 4 steps; 44 samples sit out.
    record = json.loads((run / "metrics.jsonl").read_text())
    assert (record["epoch"], record["step"]) == (1, 4)
    document = json.loads((run / "eval.json").read_text())
    assert document["splits"]["val"]["n"] == document["splits"]["test"]["n"] == 40


def test_cagan_train_at_its_default_workers_on_one_shard(small_dataset, tmp_path):
    out = tmp_path / "cagan.pt"
    result = CliRunner().invoke(cli, ["cagan", "train", "--shards", str(small_dataset), "--out", str(out),
                                      "--steps", "2", "--pretrain-steps", "2", "--cnum", "4", "--batch", "4", "--sample-every", "0",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    state = torch.load(out.with_name("cagan.pt.state"), weights_only=True)
    assert (state["step"], state["batches"]) == (2, 2)  # 2 workers: 300 // (2 x 4) = 37 batches each


def test_torchrun_eight_processes_on_one_shard(tmp_path):
    """8 CPU processes x 2 loader workers (the default) on a split of one shard, batch 4."""
    make_split(tmp_path / "shards", 64, 1000)
    out = tmp_path / "run"
    args = ["--shards", str(tmp_path / "shards"), "--out", str(out), "--arch", "simple-cnn", "--epochs", "1",
            "--batch", "4", "--device", "cpu"]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", "-m", "cfrobust", "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("written to") == 1  # rank 0 reports
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["step"] == 2  # 64 // (16 workers x 4) = 1 batch per worker, 2 per rank
    document = json.loads((out / "eval.json").read_text())
    assert document["splits"]["val"]["n"] == document["splits"]["test"]["n"] == 8  # 8 samples over 8 ranks, once each
