"""`_info.json`: the per-split manifest that readers trust for shard names and sample counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cfrobust.errors import UserError
from cfrobust.shards.schema import INFO_NAME, SCHEMA


def write_info(split_dir: Path, info: dict, name: str = INFO_NAME) -> None:
    """Write the manifest atomically: readers never see a half-written `_info.json`."""
    info = {"schema": SCHEMA, **info}
    # A per-process temporary name: two preprocessing ranks may merge the same split at once.
    tmp = Path(split_dir) / f"{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, Path(split_dir) / name)


def read_info(split_dir) -> dict:
    path = Path(split_dir) / INFO_NAME
    if not path.is_file():
        raise UserError(f"{split_dir}: no {INFO_NAME} here; run `cfrobust preprocess` to make shards")
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
    if info.get("schema") != SCHEMA:
        raise UserError(f"{path}: schema {info.get('schema')!r}, expected {SCHEMA!r}")
    return info


def list_splits(root) -> list[str]:
    """Names of the split folders under a shard root that hold a manifest, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such shard folder")
    names = sorted(p.name for p in root.iterdir() if (p / INFO_NAME).is_file())
    if not names:
        raise UserError(f"{root}: no shards here (no <split>/{INFO_NAME}); run `cfrobust preprocess` first")
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(names, key=lambda n: (order.get(n, 3), n))
