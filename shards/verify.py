"""Check shard folders against their manifests, and merge the partial manifests of a run split
over several processes into one `_info.json`. Problems come back as one-line strings."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from cfrobust.errors import UserError
from cfrobust.files import resolved_paths
from cfrobust.shards.manifest import list_splits, read_info, write_info
from cfrobust.shards.remote import MissingFile, is_url, location, open_shard
from cfrobust.shards.schema import INFO_NAME, META_EXT, SCHEMA, part_info_name, required_exts
from cfrobust.shards.tarstream import iter_tar_samples

META_FIELDS = ("label", "boxes", "group")
SAMPLE_PROBLEMS_SHOWN = 5  # per shard: a shard made with other --cf would otherwise print one line per sample
PART_NAME = re.compile(r"_info\.r(\d+)-of-(\d+)\.json")
AGREED_FIELDS = ("split", "size", "cf_methods", "classes", "aligned_groups", "source", "masks_from_boxes",
                 "train_order")
PART_FIELDS = ("split", "num_samples", "shards", "size", "cf_methods", "classes", "groups", "group_counts",
               "aligned_groups", "source", "skipped")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


# ---------------------------------------------------------------- finding split folders


def verify_dirs(path) -> list[Path]:
    """The split folders `verify` checks: PATH itself when it holds a manifest, else its splits."""
    path = location(path)
    if (path / INFO_NAME).is_file():
        return [path]
    if not is_url(path) and part_files(path):
        raise UserError(f"{path}: only partial manifests here; run `cfrobust shards merge {path}` first")
    return [path / name for name in list_splits(path)]


def unlisted_splits(path) -> list[str]:
    """Problems for the folders under a shard root that hold shards or partial manifests but no
    manifest (an interrupted or unmerged preprocess): every other command skips such a split."""
    path = location(path)
    if is_url(path) or (path / INFO_NAME).is_file() or not path.is_dir():
        return []  # a remote root is not listed: its splits are what their manifests say
    problems = []
    for folder in sorted((p for p in path.iterdir() if p.is_dir() and not (p / INFO_NAME).is_file()), key=split_order):
        if part_files(folder):
            problems.append(f"{folder.name}: partial manifests but no {INFO_NAME}; run `cfrobust shards merge {path}` "
                            f"once every process has finished")
        elif any(folder.glob("*.tar")):
            problems.append(f"{folder.name}: shards but no {INFO_NAME} (an interrupted preprocess? run it again with --resume)")
    return problems


def merge_dirs(path) -> list[Path]:
    """The split folders `merge` combines: PATH itself when it holds partial manifests, else its splits."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such shard folder")
    if part_files(path):
        return [path]
    found = sorted((p for p in path.iterdir() if p.is_dir() and part_files(p)), key=split_order)
    if not found:
        raise UserError(f"{path}: no partial manifests (_info.rNNN-of-NNN.json) here or in its split folders")
    return found


def split_order(folder: Path) -> tuple[int, str]:
    """train, val, test, then the rest by name: the order `list_splits` reports them in."""
    return {"train": 0, "val": 1, "test": 2}.get(folder.name, 3), folder.name


# ---------------------------------------------------------------- verify


def verify_split(split_dir, progress: bool = False) -> list[str]:
    """Every problem with one split folder's shards, one line each (empty when all is well)."""
    split_dir = location(split_dir)
    info = read_info(split_dir)
    entries = manifest_entries(split_dir, info)
    problems = []
    listed = sum(entry["num_samples"] for entry in entries)
    if info.get("num_samples") != listed:
        problems.append(f"{split_dir.name}/{INFO_NAME}: num_samples {info.get('num_samples')}, "
                        f"but its shards add up to {listed}")
    seen: dict[str, str] = {}  # sample key -> shard holding it, to catch keys written twice
    for entry in tqdm(entries, desc=split_dir.name, unit="shard", disable=not progress, leave=False):
        problems += check_shard(split_dir, entry, info.get("cf_methods", []), seen)
    return problems


def manifest_entries(split_dir: Path, info: dict) -> list[dict]:
    """The manifest's shard list, refused when an entry lacks a field (nothing to check against)."""
    entries = info.get("shards")
    if not isinstance(entries, list):
        raise UserError(f"{split_dir / INFO_NAME}: unreadable manifest (no shard list)")
    for i, entry in enumerate(entries):
        missing = [k for k in ("name", "num_samples", "sha256") if not isinstance(entry, dict) or k not in entry]
        if missing:
            lacks = ", ".join(missing)
            raise UserError(f"{split_dir / INFO_NAME}: unreadable manifest (shard entry {i} lacks {lacks})")
    return entries


def check_shard(split_dir: Path, entry: dict, cf_methods: list[str], seen: dict[str, str]) -> list[str]:
    """Problems with one shard: presence, tar structure, hash, sample count and samples."""
    where = f"{split_dir.name}/{entry['name']}"
    path = split_dir / entry["name"]
    if not is_url(path) and not path.is_file():
        return [f"{where}: listed in {INFO_NAME} but missing"]
    try:
        samples, sha256 = read_shard(path)
    except MissingFile:
        return [f"{where}: listed in {INFO_NAME} but missing ({path})"]
    except _BrokenTar as exc:
        return [f"{where}: {exc}"]  # a broken file also fails its hash; the cause is what helps
    except OSError as exc:
        return [f"{where}: unreadable ({exc.strerror or exc})"]
    problems = []
    if sha256 != entry["sha256"]:
        problems.append(f"{where}: sha256 mismatch (manifest {entry['sha256'][:12]}..., file {sha256[:12]}...)")
    if len(samples) != entry["num_samples"]:
        problems.append(f"{where}: holds {len(samples)} samples, manifest says {entry['num_samples']}")
    sample_problems = [
        p for key, parts in samples for p in sample_problems_of(key, parts, cf_methods, seen, entry["name"])
    ]
    problems += [f"{where}: {p}" for p in sample_problems[:SAMPLE_PROBLEMS_SHOWN]]
    if len(sample_problems) > SAMPLE_PROBLEMS_SHOWN:
        problems.append(f"{where}: ... and {len(sample_problems) - SAMPLE_PROBLEMS_SHOWN} more sample problems")
    return problems


def sample_problems_of(key: str, parts: dict, cf_methods: list[str], seen: dict[str, str], shard: str) -> list[str]:
    """What is wrong with one sample: a key seen before, missing parts, a bad json part."""
    problems = []
    if key in seen:
        problems.append(f"sample {key} also in {seen[key]}")
    seen.setdefault(key, shard)
    problems += [f"sample {key} has {ext} twice" for ext in parts.get("__twice__", [])]
    missing = [ext for ext in required_exts(cf_methods) if ext not in parts]
    if missing:
        problems.append(f"sample {key} lacks {', '.join(missing)}")
    if META_EXT in parts:
        problems += meta_problems(key, parts[META_EXT])
    return problems


def meta_problems(key: str, data: bytes) -> list[str]:
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return [f"sample {key} has unreadable json"]
    if not isinstance(meta, dict):
        return [f"sample {key} has unreadable json (not an object)"]
    missing = [f for f in META_FIELDS if f not in meta]
    return [f"sample {key} json lacks {', '.join(missing)}"] if missing else []


def stray_files(split_dir) -> list[str]:
    """Leftovers that do not make a split wrong: temporary files of an interrupted run and
    tar files the manifest does not list (readers only open what it lists)."""
    split_dir = location(split_dir)
    if is_url(split_dir):
        return []  # nothing to list remotely: readers only open what the manifest names anyway
    listed = {entry.get("name") for entry in read_info(split_dir).get("shards", []) if isinstance(entry, dict)}
    warnings = []
    for path in sorted(split_dir.iterdir()):
        if path.name.endswith(".tmp"):
            warnings.append(f"{split_dir.name}/{path.name}: temporary file left by an interrupted run")
        elif path.name.endswith(".tar") and path.name not in listed:
            warnings.append(f"{split_dir.name}/{path.name}: not listed in {INFO_NAME}")
    return warnings


# ---------------------------------------------------------------- reading a tar strictly


class _BrokenTar(Exception):
    """The shard is not a complete tar archive; the message says how."""


class _HashingReader:
    """Reads a file front to back once, hashing every byte, so checking costs a single pass."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def read(self, size: int) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        self.offset += len(data)
        return data

    def hexdigest_of_rest(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def read_shard(path: Path) -> tuple[list[tuple[str, dict]], str]:
    """[(key, {ext: json bytes or True})] in tar order, and the file's sha256.

    Members are grouped into samples the way WebDataset does: consecutive members sharing the
    name before the first dot of their file name form one sample.
    """
    samples: list[tuple[str, dict]] = []
    with open_shard(path) as file:
        reader = _HashingReader(file)
        for name, data in tar_members(reader):
            folder, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue  # WebDataset skips members without an extension too
            key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            parts = samples[-1][1]
            if ext in parts:
                parts.setdefault("__twice__", []).append(ext)
            parts[ext] = data if ext == META_EXT else True
        return samples, reader.hexdigest_of_rest()


def tar_members(reader: _HashingReader) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, raising _BrokenTar on a truncated or corrupt archive.

    Python's tarfile takes a short file or a bad header after the first member for the end of
    the archive and stops quietly, so blocks are walked here up to the end-of-archive marker.
    """
    long_name = None
    while True:
        start = reader.offset
        header = reader.read(_BLOCK)
        if len(header) < _BLOCK:
            raise _BrokenTar("truncated tar (ends before the end-of-archive marker)")
        if header == _ZERO_BLOCK:
            if reader.read(_BLOCK) != _ZERO_BLOCK:
                raise _BrokenTar("truncated tar (end-of-archive marker cut short)")
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise _BrokenTar(f"corrupt tar (bad header at byte {start}: {exc})") from None
        name = long_name or info.name
        data = reader.read(info.size + -info.size % _BLOCK)[: info.size]
        if len(data) < info.size:
            raise _BrokenTar(f"truncated tar (ends inside {name})")
        long_name = None
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            long_name = pax_path(data)
        elif info.isreg():
            yield name, data


def pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("LEN key=value\\n" records), if any."""
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        length = data[position:space] if space > position else b""
        # A record must reach past its own length field, or the loop would never end.
        if not length.isdigit() or position + int(length) <= space:
            raise _BrokenTar("corrupt tar (unreadable pax header)")
        end = position + int(length)
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        position = end
    return None


# ---------------------------------------------------------------- merge


def part_files(split_dir) -> dict[tuple[int, int], Path]:
    """Partial manifests in a folder, by (rank, world_size)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return {}
    found = {}
    for path in split_dir.iterdir():
        match = PART_NAME.fullmatch(path.name)
        if match:
            rank, world_size = int(match[1]), int(match[2])
            # Only names part_info_name would write count, so a hand-made look-alike is ignored.
            if rank < world_size and part_info_name(rank, world_size) == path.name:
                found[rank, world_size] = path
    return found


def merge_parts(split_dir) -> dict | None:
    """Combine a folder's partial manifests into `_info.json`; return it (None without parts).

    Deterministic and leaves the parts in place, so calling it again rewrites the same file.
    """
    split_dir = Path(split_dir)
    parts = part_files(split_dir)
    if not parts:
        return None
    world_size = single_world_size(split_dir, parts)
    missing = [r for r in range(world_size) if (r, world_size) not in parts]
    if missing:
        names = ", ".join(part_info_name(r, world_size) for r in missing)
        raise UserError(f"{split_dir}: rank(s) {', '.join(map(str, missing))} of {world_size} have not "
                        f"written their partial manifest ({names}); wait for them or rerun them")
    infos = [read_part(parts[r, world_size], r, world_size) for r in range(world_size)]
    check_parts_agree(split_dir, infos)
    merged = combine_parts(infos)
    check_shards_present(split_dir, merged["shards"])
    check_keys_unique(split_dir, merged["shards"])
    write_info(split_dir, merged)
    return {"schema": SCHEMA, **merged}


def check_keys_unique(split_dir: Path, shards: list[dict]) -> None:
    """Each process skips a key it wrote before, but cannot know another's: two records of the
    source that share a key (`a.jpg` and `a.png`) may land on two ranks. Reads member names only."""
    seen: dict[str, str] = {}
    for shard in shards:
        for sample in iter_tar_samples(split_dir / shard["name"], wanted_exts=()):
            key = sample["__key__"]
            if key in seen:
                raise UserError(f"{split_dir}: sample {key} is in {seen[key]} and in {shard['name']}: two records of the "
                                f"source share its key (one process would have skipped the second); rename one and rerun")
            seen[key] = shard["name"]


def single_world_size(split_dir: Path, parts: dict) -> int:
    sizes = sorted({world_size for _, world_size in parts})
    if len(sizes) > 1:
        raise UserError(f"{split_dir}: partial manifests of runs with {' and '.join(map(str, sizes))} processes; "
                        f"remove the stale ones")
    return sizes[0]


def read_part(path: Path, rank: int, world_size: int) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable partial manifest ({exc})") from None
    if not isinstance(info, dict) or info.get("schema") != SCHEMA:
        raise UserError(f"{path}: not a partial manifest of schema {SCHEMA!r}")
    if (info.get("rank"), info.get("world_size")) != (rank, world_size):
        raise UserError(f"{path}: says rank {info.get('rank')} of {info.get('world_size')}, "
                        f"its name rank {rank} of {world_size}")
    missing = [f for f in PART_FIELDS if f not in info]
    if missing:
        raise UserError(f"{path}: partial manifest lacks {', '.join(missing)}")
    return info


def check_parts_agree(split_dir: Path, infos: list[dict]) -> None:
    """Parts of one split must describe the same data; a mix of runs would be silently wrong."""
    for field in AGREED_FIELDS:
        for rank, info in enumerate(infos[1:], start=1):
            if resolved_paths(info.get(field)) != resolved_paths(infos[0].get(field)):  # one dataset, however spelt
                raise UserError(f"{split_dir}: partial manifests disagree on {field}: "
                                f"{infos[0].get(field)!r} (rank 0) vs {info.get(field)!r} (rank {rank})")


def combine_parts(infos: list[dict]) -> dict:
    """The merged manifest: shards and skipped records in rank order, counts summed."""
    group_counts: dict[str, int] = {}
    for info in infos:
        for group, count in info["group_counts"].items():
            group_counts[group] = group_counts.get(group, 0) + count
    merged = {k: v for k, v in infos[0].items() if k not in ("schema", "rank", "world_size")}
    merged.update(
        num_samples=sum(info["num_samples"] for info in infos),
        shards=[shard for info in infos for shard in info["shards"]],
        groups=sorted({group for info in infos for group in info["groups"]}),
        group_counts=dict(sorted(group_counts.items())),
        skipped=[record for info in infos for record in info["skipped"]],
    )
    return merged


def check_shards_present(split_dir: Path, shards: list[dict]) -> None:
    missing = [s["name"] for s in shards if not (split_dir / s["name"]).is_file()]
    if missing:
        raise UserError(f"{split_dir}: shard {missing[0]} listed in a partial manifest is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
