"""`_info.json`: the per-split manifest that readers trust for shard names and sample counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cfrobust.errors import UserError
from cfrobust.shards.remote import MissingFile, is_url, list_remote_splits, location
from cfrobust.shards.schema import INFO_NAME, SCHEMA


def write_info(split_dir: Path, info: dict, name: str = INFO_NAME) -> None:
    """Write the manifest atomically: readers never see a half-written `_info.json`."""
    info = {"schema": SCHEMA, **info}
    # A per-process temporary name: two preprocessing ranks may merge the same split at once.
    tmp = Path(split_dir) / f"{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, Path(split_dir) / name)


def read_info(split_dir) -> dict:
    """A split's manifest, from a local folder or a remote one (`split_dir` a path or a URL)."""
    path = location(split_dir) / INFO_NAME
    missing = f"{split_dir}: no {INFO_NAME} here; run `cfrobust preprocess` to make shards"
    if not is_url(path) and not path.is_file():
        raise UserError(missing)
    try:
        info = json.loads(path.read_text())
    except MissingFile:
        raise UserError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(info, dict) or info.get("schema") != SCHEMA:
        found = info.get("schema") if isinstance(info, dict) else type(info).__name__
        raise UserError(f"{path}: schema {found!r}, expected {SCHEMA!r}")
    check_fields(path, info)
    return info


# What readers rely on, by type; a hand-edited manifest missing one fails here, in one line.
REQUIRED = {"shards": list, "classes": list, "num_samples": int, "cf_methods": list, "size": int}


def check_fields(path: Path, info: dict) -> None:
    for key, kind in REQUIRED.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise UserError(f"{path}: {key!r} is {info.get(key)!r}, not a {kind.__name__} (a damaged manifest)")
    for shard in info["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and isinstance(shard.get("num_samples"), int)):
            raise UserError(f"{path}: shard entry {shard!r} lacks a name or a sample count (a damaged manifest)")


def list_splits(root) -> list[str]:
    """Names of the split folders under a shard root that hold a manifest, in a stable order."""
    root = location(root)
    if is_url(root):
        return _in_split_order(_remote_splits(root))
    if not root.is_dir():
        raise UserError(f"{root}: a file, not a shard folder" if root.exists() else f"{root}: no such shard folder")
    if (root / INFO_NAME).is_file():
        raise UserError(f"{root} is one split's folder; pass the shard root above it to --shards")
    names = sorted(p.name for p in root.iterdir() if (p / INFO_NAME).is_file())
    if not names:
        raise UserError(f"{root}: no shards here (no <split>/{INFO_NAME}); run `cfrobust preprocess` first")
    return _in_split_order(names)


def _remote_splits(root) -> list[str]:
    if (root / INFO_NAME).is_file():
        raise UserError(f"{root} is one split's folder; pass the shard root above it to --shards")
    names = list_remote_splits(root, INFO_NAME)
    if not names:
        raise UserError(f"{root}: no shards here (no <split>/{INFO_NAME}); run `cfrobust preprocess` first")
    return names


def _in_split_order(names: list[str]) -> list[str]:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(names, key=lambda n: (order.get(n, 3), n))
