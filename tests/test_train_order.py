"""The training split is written in a seeded shuffled order: a source that lists its records class by
class (Waterbirds' metadata.csv, a folder dataset) must not give the trainer one-class batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfrobust.datasets.record import Record
from cfrobust.datasets.synthetic import SyntheticDataset
from cfrobust.errors import UserError
from cfrobust.preprocess import pipeline
from cfrobust.preprocess.pipeline import ORDER_SEED, preprocess, written_order
from cfrobust.shards.reader import EvalShards, TrainShards

SIZES = (40, 10, 10)


class ClassSorted(SyntheticDataset):
    """The synthetic records listed class by class (its labels alternate by index: evens are class 0)."""

    def __init__(self, **options):
        super().__init__(seed=5, sizes=SIZES, image_size=16, **options)
        self.mixed_order = False

    def records(self, split):
        for index in sorted(range(self.sizes[split]), key=lambda i: (i % 2, i)):
            yield self.make_record(split, index)


class Interrupted(BaseException):
    """Stands for a kill: nothing in the pipeline handles it."""


def stored_keys(split_dir: Path) -> list[str]:
    """Keys in the order the shards hold them (the manifest's shard order, each read through)."""
    return [key for batch in EvalShards(split_dir, batch_size=1000).iter_worker(0, 1) for key in batch.keys]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_training_split_is_stored_in_the_seeded_shuffle_and_the_others_as_listed(tmp_path):
    source = ClassSorted()
    listed = [record.key for record in source.records("train")]
    assert listed[:3] == ["train_0000000", "train_0000002", "train_0000004"]  # class 0 first
    preprocess(source, tmp_path, ["tile"], shard_size=7, progress=False)
    expected = [listed[i] for i in np.random.default_rng(ORDER_SEED).permutation(40)]
    assert stored_keys(tmp_path / "train") == expected
    assert stored_keys(tmp_path / "val") == [record.key for record in source.records("val")]
    # The first batch of 8 the trainer reads from the stream now holds both classes.
    first = next(TrainShards(tmp_path / "train", 8, ["tile"], seed=0, shuffle_buffer=1).iter_worker(0, 1))
    assert set(first.labels.tolist()) == {0, 1}
    assert '"train_order": "shuffled"' in (tmp_path / "train" / "_info.json").read_text()


def test_a_mixed_source_keeps_its_order(tmp_path):
    source = SyntheticDataset(seed=5, sizes=SIZES, image_size=16)
    assert [r.key for r in written_order(source, "train")] == [r.key for r in source.records("train")]


def test_unusable_records_come_first_in_the_listed_order():
    class WithProblems(ClassSorted):
        def make_record(self, split, index):
            record = super().make_record(split, index)
            record.problem = "unreadable" if index in (7, 2) else ""
            return record

    keys = [(r.key, r.problem) for r in written_order(WithProblems(), "train")]
    assert keys[:2] == [("train_0000002", "unreadable"), ("train_0000007", "unreadable")]
    assert sorted(keys[2:]) == [(f"train_{i:07d}", "") for i in range(40) if i not in (2, 7)]


def kill_after(monkeypatch, count: int) -> None:
    """make_sample raises Interrupted once `count` training samples are built (until undone)."""
    built = []
    make_sample = pipeline.make_sample

    def dying(record: Record, *args, **kwargs):
        if record.split == "train" and len(built) == count:
            raise Interrupted
        built.append(record.key)
        return make_sample(record, *args, **kwargs)

    monkeypatch.setattr(pipeline, "make_sample", dying)


def test_a_killed_run_resumes_to_the_same_shuffled_shards(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    preprocess(ClassSorted(), clean, ["tile"], shard_size=7, progress=False)
    out = tmp_path / "resumed"
    kill_after(monkeypatch, 20)
    with pytest.raises(Interrupted):
        preprocess(ClassSorted(), out, ["tile"], shard_size=7, progress=False)
    monkeypatch.undo()
    summaries = preprocess(ClassSorted(), out, ["tile"], shard_size=7, progress=False, resume=True)
    assert summaries[0].resumed_shards == 2  # 20 built: two shards of 7 were finished
    assert files(out) == files(clean)


def test_a_journal_written_in_the_source_order_is_not_resumed_shuffled(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    kill_after(monkeypatch, 20)
    with pytest.raises(Interrupted):
        preprocess(ClassSorted(), out, ["tile"], shard_size=7, progress=False)
    monkeypatch.undo()
    journal = out / "train" / "_progress.jsonl"
    job, *shards = journal.read_text().splitlines()
    assert '"train_order": "shuffled"' in job
    # A journal from before the shuffle names no order: it was written in the source's.
    journal.write_text("\n".join([job.replace(', "train_order": "shuffled"', ""), *shards]) + "\n")
    with pytest.raises(UserError, match=r"made with other options \(train_order\)"):
        preprocess(ClassSorted(), out, ["tile"], shard_size=7, progress=False, resume=True)
