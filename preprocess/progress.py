"""The resume journal of one preprocessing process for one split.

The first line records the job (fills, size, source); after every completed shard a line is
appended (and synced): the shard's manifest entry, how many of the process's records it had
consumed by then, and the keys, groups and skipped records since the previous line. `--resume` keeps the journalled shards whose files still hash right
and continues after the consumed records, so a killed run ends with the same shards as one that
never stopped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cfrobust.shards.writer import sha256_of


@dataclass
class SplitProgress:
    path: Path
    job: dict = field(default_factory=dict)  # this run's job, written as the journal's first line
    recorded_job: dict | None = None  # the job of the run that wrote the journal (None: no journal)
    shards: list[dict] = field(default_factory=list)
    consumed: int = 0  # records of this process (problems included) behind the kept shards
    keys: set[str] = field(default_factory=set)
    groups: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, job: dict, present=None) -> "SplitProgress":
        """The journal's shards up to the first one that is missing or altered on disk (or, with
        `present`, up to the first entry for which `present(shard entry)` is false)."""
        progress = cls(path, job)
        if not path.exists():
            return progress
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by the crash: everything after it is redone
            if "job" in entry:
                progress.recorded_job = entry["job"]
                continue
            shard = path.parent / entry["shard"]["name"]
            if present is not None:
                if not present(entry["shard"]):
                    break
            elif not shard.is_file() or sha256_of(shard) != entry["shard"]["sha256"]:
                break
            progress._absorb(entry)
        return progress

    def add_shard(self, shard: dict, consumed: int, keys: list[str], groups: Counter, skipped: list[dict]) -> None:
        entry = {"shard": shard, "consumed": consumed, "keys": keys, "groups": dict(groups), "skipped": skipped}
        with open(self.path, "a") as journal:
            if journal.tell() == 0:
                journal.write(json.dumps({"job": self.job}) + "\n")
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        self._absorb(entry)

    def _absorb(self, entry: dict) -> None:
        self.shards.append(entry["shard"])
        self.consumed = entry["consumed"]
        self.keys.update(entry["keys"])
        self.groups.update(entry["groups"])
        self.skipped.extend(entry["skipped"])
