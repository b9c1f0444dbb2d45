"""Preprocessing as a production job: parallel workers, crash and resume, several machines."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cfrobust.datasets import open_dataset
from cfrobust.datasets.synthetic import SyntheticDataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import opencv_single_threaded, preprocess
from cfrobust.shards.reader import EvalShards

SIZES = (40, 10, 10)
FILLS = ["tile", "mean"]


def synthetic():
    return open_dataset("synthetic", seed=5, sizes=SIZES, image_size=16)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def samples(root: Path, split: str) -> dict[str, dict]:
    """Every sample of a split, by key, as its decoded parts (independent of shard layout)."""
    found = {}
    for worker in range(1):
        for batch in EvalShards(root / split, batch_size=1000).iter_worker(worker, 1):
            for i, key in enumerate(batch.keys):
                found[key] = (batch.images[i].numpy().tobytes(), int(batch.labels[i]), batch.boxes[i].tolist())
    return found


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "shards"
    preprocess(synthetic(), out, FILLS, shard_size=7, progress=False)
    return out


def test_any_worker_count_writes_byte_identical_shards(clean_run, tmp_path):
    cv2.setNumThreads(2)
    preprocess(synthetic(), tmp_path / "w3", FILLS, shard_size=7, progress=False, workers=3)
    assert files(tmp_path / "w3") == files(clean_run)
    assert cv2.getNumThreads() == 2  # the caller's OpenCV setting is back


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_workers_inherit_one_opencv_thread_and_never_set_it():
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((2000, 2000), np.uint8), (1000, 1000))  # OpenCV's thread pool is now live
    with opencv_single_threaded(), multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(cv2.getNumThreads) == 1
        assert pool.apply(_shrink_in_worker) == 100
    assert cv2.getNumThreads() == 2


def _sigint_handler() -> str:
    return "ignored" if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else "default"


def test_spawned_workers_write_the_same_shards_with_one_opencv_thread(clean_run, tmp_path, monkeypatch):
    from cfrobust.preprocess import pipeline

    with multiprocessing.get_context("spawn").Pool(1, initializer=pipeline._start_worker, initargs=(True,)) as pool:
        assert pool.apply(cv2.getNumThreads) == 1
        assert pool.apply(_sigint_handler) == "ignored"  # Ctrl-C is the parent's to handle
    real_get_context, pools = multiprocessing.get_context, []

    class RecordingContext:
        def __init__(self, method):
            self.context = real_get_context(method)

        def Pool(self, *args, **kwargs):
            pools.append((self.context.get_start_method(), kwargs.get("initializer"), kwargs.get("initargs")))
            return self.context.Pool(*args, **kwargs)

    monkeypatch.setattr(pipeline.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    monkeypatch.setattr(pipeline.multiprocessing, "get_context", RecordingContext)
    preprocess(synthetic(), tmp_path / "spawned", FILLS, shard_size=7, progress=False, workers=2)
    assert pools == [("spawn", pipeline._start_worker, (True,))] * 3  # one pool per split
    assert files(tmp_path / "spawned") == files(clean_run)


class _BrokenAt13(SyntheticDataset):
    def make_record(self, split, index):
        record = super().make_record(split, index)
        return dataclasses.replace(record, problem="unreadable image") if index == 13 else record


def test_a_strict_failure_stops_the_workers_and_restores_opencv_at_once(tmp_path):
    cv2.setNumThreads(2)
    dataset = _BrokenAt13(seed=5, sizes=SIZES, image_size=16)
    children_before = set(multiprocessing.active_children())
    try:
        preprocess(dataset, tmp_path / "shards", FILLS, shard_size=7, progress=False, workers=3, strict=True)
    except UserError as error:  # checked while the traceback (and its frames) is still alive
        assert "unreadable image" in str(error)
        assert cv2.getNumThreads() == 2
        assert set(multiprocessing.active_children()) <= children_before
    else:
        pytest.fail("a bad record under --strict must stop the run")


def _shrink_in_worker() -> int:
    return int(cv2.resize(np.ones((2000, 2000), np.uint8), (10, 10)).sum())  # a parallel_for_ in the child


SLOW_RUN = """
import sys, time
from cfrobust.datasets.synthetic import SyntheticDataset
from cfrobust.preprocess.pipeline import preprocess

class Slow(SyntheticDataset):
    def make_record(self, split, index):
        time.sleep(0.05)
        return super().make_record(split, index)

preprocess(Slow(seed=5, sizes={sizes}, image_size=16), sys.argv[1], {fills}, shard_size=7, progress=False)
"""


def test_a_run_killed_mid_shard_resumes_to_the_clean_result(clean_run, tmp_path):
    out = tmp_path / "shards"
    code = SLOW_RUN.format(sizes=SIZES, fills=FILLS)
    process = subprocess.Popen([sys.executable, "-c", code, str(out)])
    journal = out / "train" / "_progress.jsonl"
    deadline = time.monotonic() + 60
    # Kill once two shards are journalled and a third is half written.
    while time.monotonic() < deadline:
        lines = journal.read_text().splitlines() if journal.exists() else []
        if len(lines) >= 3 and list((out / "train").glob("*.tmp")):  # the job line, then 2 shards
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "train" / "_info.json").exists()
    with pytest.raises(UserError, match="pass --resume to continue it"):
        preprocess(synthetic(), out, FILLS, shard_size=7, progress=False)
    summaries = preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, resume=True)
    assert summaries[0].resumed_shards >= 2
    assert files(out) == files(clean_run)


class Interrupted(BaseException):
    """Stands for a kill: nothing in the pipeline handles it."""


def test_resume_of_an_unfinished_split_with_other_options_is_refused(clean_run, tmp_path):
    class Dying(type(synthetic())):
        def make_record(self, split, index):
            if split == "train" and index == 20:
                raise Interrupted
            return super().make_record(split, index)

    out = tmp_path / "shards"
    with pytest.raises(Interrupted):
        preprocess(Dying(seed=5, sizes=SIZES, image_size=16), out, FILLS, shard_size=7, progress=False)
    journal = out / "train" / "_progress.jsonl"
    assert len(journal.read_text().splitlines()) == 3  # the job, then 2 shards of 7
    with pytest.raises(UserError, match=rf"^{journal}: made with other options \(cf_methods, size\)"):
        preprocess(open_dataset("synthetic", seed=5, sizes=SIZES, image_size=16), out, ["mean"], size=8,
                   shard_size=7, progress=False, resume=True)
    summaries = preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, resume=True)
    assert summaries[0].resumed_shards == 2
    assert files(out) == files(clean_run)


def test_resume_of_a_finished_run_changes_nothing(clean_run, tmp_path):
    out = tmp_path / "shards"
    preprocess(synthetic(), out, FILLS, shard_size=7, progress=False)
    summaries = preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, resume=True)
    assert [(s.split, s.written, s.resumed_shards) for s in summaries] == [("train", 40, 6), ("val", 10, 2), ("test", 10, 2)]
    assert files(out) == files(clean_run)


def test_resume_of_a_finished_run_with_other_options_is_refused(clean_run, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(clean_run, out)
    manifest = out / "train" / "_info.json"
    for dataset, fills, changed in [(synthetic(), ["mean"], "cf_methods"),
                                    (open_dataset("synthetic", seed=6, sizes=SIZES, image_size=16), FILLS, "source")]:
        with pytest.raises(UserError, match=rf"^{manifest}: made with other options \({changed}\); --resume continues"):
            preprocess(dataset, out, fills, shard_size=7, progress=False, resume=True)
    assert files(out) == files(clean_run)


def test_resume_names_the_same_source_folder_relatively_or_absolutely(clean_run, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()

    def rooted(root: str):  # a source described by a folder, as the file-based datasets are
        source = synthetic()
        source.describe = lambda: {**type(source).describe(source), "root": root}
        return source

    out = tmp_path / "shards"
    preprocess(rooted(str(tmp_path / "data")), out, FILLS, shard_size=7, progress=False)
    monkeypatch.chdir(tmp_path)
    summaries = preprocess(rooted("data"), out, FILLS, shard_size=7, progress=False, resume=True)
    assert [s.resumed_shards for s in summaries] == [6, 2, 2]
    with pytest.raises(UserError, match=r"made with other options \(source\)"):
        preprocess(rooted("elsewhere"), out, FILLS, shard_size=7, progress=False, resume=True)


def test_ranks_may_spell_the_source_folder_differently_and_a_resumed_rank_still_merges(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()

    def rooted(root: str):
        source = synthetic()
        source.describe = lambda: {**type(source).describe(source), "root": root}
        return source

    out = tmp_path / "shards"
    monkeypatch.chdir(tmp_path)
    preprocess(rooted(str(tmp_path / "data")), out, FILLS, shard_size=7, progress=False, rank=0, world_size=2)
    preprocess(rooted("data/"), out, FILLS, shard_size=7, progress=False, rank=1, world_size=2)
    merged = {split: (out / split / "_info.json").read_bytes() for split in ("train", "val", "test")}
    (out / "val" / "_info.json").unlink()  # as if the last rank died between its part and the merge
    preprocess(rooted("data"), out, FILLS, shard_size=7, progress=False, rank=1, world_size=2, resume=True)
    assert {split: (out / split / "_info.json").read_bytes() for split in merged} == merged


def test_a_key_two_ranks_both_wrote_stops_the_merge(tmp_path):
    class SharedKey(type(synthetic())):  # train records 0 and 1 (ranks 0 and 1) are both "dup"
        def make_record(self, split, index):
            record = super().make_record(split, index)
            return dataclasses.replace(record, key="dup") if split == "train" and index < 2 else record

    out = tmp_path / "shards"
    source = SharedKey(seed=5, sizes=SIZES, image_size=16)
    preprocess(source, out, FILLS, shard_size=7, progress=False, rank=0, world_size=2)
    with pytest.raises(UserError, match=r"train: sample dup is in train-r000-000000.tar and in train-r001-000000.tar: "
                                        r"two records of the source share its key"):
        preprocess(source, out, FILLS, shard_size=7, progress=False, rank=1, world_size=2)
    assert not (out / "train" / "_info.json").exists()


def test_resume_redoes_a_shard_whose_file_was_damaged(clean_run, tmp_path):
    out = tmp_path / "shards"
    preprocess(synthetic(), out, FILLS, shard_size=7, progress=False)
    # Pretend the run died after 3 train shards, one of which got damaged afterwards.
    info = json.loads((out / "train" / "_info.json").read_text())
    journal = out / "train" / "_progress.jsonl"
    entries, source = [], synthetic()
    for i, shard in enumerate(info["shards"][:3]):
        records = [source.make_record("train", k) for k in range(7 * i, 7 * i + 7)]
        groups = {}
        for r in records:
            groups[r.group] = groups.get(r.group, 0) + 1
        keys = [r.key for r in records]
        entries.append({"shard": shard, "consumed": 7 * (i + 1), "keys": keys, "groups": groups, "skipped": []})
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    (out / "train" / "_info.json").unlink()
    for shard in info["shards"][3:]:
        (out / "train" / shard["name"]).unlink()
    damaged = out / "train" / info["shards"][1]["name"]
    damaged.write_bytes(damaged.read_bytes()[:-600])
    summaries = preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, resume=True)
    assert summaries[0].resumed_shards == 1  # shard 0 kept; 1 failed its hash, so 1 and 2 are redone
    assert files(out) == files(clean_run)


def test_two_ranks_then_merge_hold_the_same_samples_as_one(clean_run, tmp_path):
    out = tmp_path / "shards"
    for rank in (1, 0):  # the order machines finish in does not matter
        preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, rank=rank, world_size=2)
    for split, count in zip(("train", "val", "test"), SIZES):
        info = json.loads((out / split / "_info.json").read_text())
        clean = json.loads((clean_run / split / "_info.json").read_text())
        assert info["num_samples"] == count
        assert all(s["name"].startswith(f"{split}-r00") for s in info["shards"])
        assert info["group_counts"] == clean["group_counts"]
        assert samples(out, split) == samples(clean_run, split)


def test_rank_outside_the_world_and_resume_with_overwrite_are_refused(tmp_path):
    with pytest.raises(UserError, match="rank 2 is outside 0..1"):
        preprocess(synthetic(), tmp_path, FILLS, rank=2, world_size=2, progress=False)
    with pytest.raises(UserError, match="choose one"):
        preprocess(synthetic(), tmp_path, FILLS, resume=True, overwrite=True, progress=False)


def test_overwrite_of_one_rank_leaves_the_other_ranks_files(tmp_path):
    out = tmp_path / "shards"
    preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, rank=0, world_size=2)
    rank1_before = None
    preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, rank=1, world_size=2)
    rank1_before = {k: v for k, v in files(out).items() if "-r001-" in k or "r001-of" in k}
    preprocess(synthetic(), out, FILLS, shard_size=7, progress=False, rank=0, world_size=2, overwrite=True)
    assert {k: v for k, v in files(out).items() if "-r001-" in k or "r001-of" in k} == rank1_before
    assert (out / "train" / "_info.json").exists()  # re-merged after rank 0 finished again
