"""Stream shards into batches: an exact-count reader for training and a read-once one for eval.

Training: each epoch the shard list is shuffled with a seed shared by all ranks and keyed by the
epoch, then dealt out by global worker id (rank * workers + worker). A split with fewer shards
than ranks x workers (a small dataset, or many GPUs), or whose shards would leave a worker
without a full batch, is split by sample instead: every worker reads all the shards and keeps
its share of the epoch's seeded sample order (sample_places). Either way every
worker yields the same number of full batches, computed up front from the manifest, so no rank
runs out early and DDP never waits on a peer at the end of an epoch.
Evaluation: every sample goes to exactly one (rank, worker), by shard or by position likewise.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
import tarfile
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cfrobust.errors import UserError
from cfrobust.shards.experiments import DataExperiment
from cfrobust.shards.manifest import read_info
from cfrobust.shards.remote import is_url, location, with_sha256
from cfrobust.shards.tarstream import iter_tar_samples
from cfrobust.shards.schema import (
    IMAGE_EXT, INFO_NAME, MASK_EXT, META_EXT, boxes_to_mask, cf_ext, decode_gray, decode_rgb, required_exts,
)


@dataclass
class Batch:
    """A batch as the trainer sees it: uint8 images (normalised later, on the device)."""

    images: torch.Tensor  # [B, 3, H, W] uint8, channels-last in memory, as decoded (see stack_images)
    labels: torch.Tensor  # [B] int64
    boxes: torch.Tensor  # [B, K, 4] float32, (x0, y0, x1, y1) in pixels; padding rows are 0
    box_valid: torch.Tensor  # [B, K] bool
    cf: dict[str, torch.Tensor] = field(default_factory=dict)  # method -> [B, 3, H, W] uint8, as images
    groups: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    # [B, 1, H, W] bool object region when the reader was asked for masks: the sample's mask, its
    # boxes' rectangles where it has none, nothing where it has no box.
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), slice(None))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader(pin_memory=True) calls this), so that the copies to the
        GPU with non_blocking=True really overlap."""
        return self._map(lambda t: t.pin_memory(), slice(None))

    def chunks(self, count: int) -> list["Batch"]:
        """The batch cut into `count` nearly equal parts (gradient accumulation)."""
        bounds = [round(i * len(self) / count) for i in range(count + 1)]
        return [self._map(lambda t: t, slice(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]

    def _map(self, move, rows: slice) -> "Batch":
        return Batch(
            images=move(self.images[rows]),
            labels=move(self.labels[rows]),
            boxes=move(self.boxes[rows]),
            box_valid=move(self.box_valid[rows]),
            cf={m: move(t[rows]) for m, t in self.cf.items()},
            groups=self.groups[rows],
            keys=self.keys[rows],
            masks=None if self.masks is None else move(self.masks[rows]),
        )


def split_info(split_dir) -> dict:
    """The manifest, checked against the shards it names (in a local folder: a remote shard that
    is missing is named when it is read, rather than asked after one by one up front)."""
    info = read_info(split_dir)
    if is_url(split_dir):
        return info
    for shard in info["shards"]:
        if not (Path(split_dir) / shard["name"]).is_file():
            raise UserError(f"{split_dir}: shard {shard['name']} listed in the manifest is missing")
    return info


def shard_paths(split_dir, info: dict, names: list[str]) -> list:
    """Where the named shards of a split are: paths, or URLs that carry the manifest's sha256
    (what a --cache-dir copy is checked against)."""
    digests = {s["name"]: s.get("sha256") for s in info["shards"]}
    return [with_sha256(split_dir / name, digests.get(name)) for name in names]


def shard_order(names: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: identical on every rank because it depends on (seed, epoch) only."""
    order = np.random.default_rng([seed, epoch]).permutation(len(names))
    return [names[i] for i in order]


def shards_for_worker(names: list[str], global_worker: int, total_workers: int) -> list[str]:
    return names[global_worker::total_workers]


def batches_per_worker(shard_counts: list[int], total_workers: int, batch_size: int) -> int:
    """Full batches every worker can yield whatever shards it is dealt.

    A worker gets at least floor(S / T) shards; in the worst case those are the smallest ones.
    """
    fewest = len(shard_counts) // total_workers
    return sum(sorted(shard_counts)[:fewest]) // batch_size


def sample_places(count: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order when a split is shared out by sample: places[p] is where the p-th
    sample read this epoch stands in it. Identical on every rank and worker (a pure function of
    seed and epoch), and a stream of its own, apart from shard_order's."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(1,))).permutation(count)


def batches_per_worker_by_sample(num_samples: int, total_workers: int, batch_size: int) -> int:
    """Full batches every worker yields when the samples are shared out one by one: each worker
    gets floor(N / T) or one more, so floor(N / (T x batch)) batches each."""
    return num_samples // (total_workers * batch_size)


# Sharing out by shard must keep at least this share of the batches that sharing out by sample
# gives. Few or uneven shards leave each worker only its smallest shards' worth: Waterbirds' 2,400
# training images in shards of 1000, 1000 and 400, read by 2 workers, gave 768 images an epoch.
MIN_SHARD_SPLIT_SHARE = 0.9


def by_sample(num_shards: int, shard_batches: int, sample_batches: int, total_workers: int) -> bool:
    """Whether to share a split out by sample rather than by shard: when it has fewer shards than
    workers, or when the shards would give each worker fewer than MIN_SHARD_SPLIT_SHARE of its
    batches by sample (none at all, in the worst case). Otherwise by shard, which is cheaper: no
    worker then reads samples that it does not keep."""
    return num_shards < total_workers or shard_batches < MIN_SHARD_SPLIT_SHARE * sample_batches


def feedable_workers(num_samples: int, world_size: int, workers: int, batch_size: int) -> int:
    """The most loader workers per rank, up to `workers`, that each get a full batch, sharing the
    samples out one by one (0 where even one worker per rank gets none)."""
    while workers > 0 and batches_per_worker_by_sample(num_samples, world_size * workers, batch_size) == 0:
        workers -= 1
    return workers


def shard_keys(path: Path) -> list[str]:
    """The sample keys of a shard, from its member names alone (the payloads are skipped)."""
    if is_url(path):
        return sorted({sample["__key__"] for sample in iter_tar_samples(path, wanted_exts=())})
    with tarfile.open(path) as archive:
        return sorted({name.split(".", 1)[0] for name in archive.getnames()})


def iter_samples(paths: Iterable[Path], cf_methods: list[str]) -> Iterator[dict]:
    """Decoded samples from tar files: image, counterfactuals, label, boxes, group, key."""
    for raw in iter_raw_samples(paths, cf_methods):
        yield decode_sample(raw, cf_methods)


def iter_raw_samples(paths: Iterable[Path], cf_methods: list[str], masks: bool = False) -> Iterator[dict]:
    """Undecoded samples (bytes by part) carrying only the parts `cf_methods` need, and the
    masks if asked; the others (unused fills, masks) are skipped unread."""
    wanted = set(required_exts(cf_methods)) | ({MASK_EXT} if masks else set())
    for path in paths:
        yield from iter_tar_samples(path, wanted)


def decode_many(raws: list[dict], cf_methods: list[str], num_classes: int | None = None) -> list[dict]:
    """decode_sample of each, in order. In the main process (--workers 0, eval) the batch is
    cut into parts that helper threads decode beside the calling thread: OpenCV releases the
    GIL while it decodes, and the training step's threads are idle while the loader runs. A
    DataLoader worker decodes serially: the workers are already the parallelism."""
    pool, threads = _decoder_pool()
    if pool is None or len(raws) < 2 * threads:
        return _decode_all(raws, cf_methods, num_classes)
    size = math.ceil(len(raws) / threads)
    helped = [pool.submit(_decode_all, raws[i:i + size], cf_methods, num_classes) for i in range(size, len(raws), size)]
    try:
        mine = _decode_all(raws[:size], cf_methods, num_classes)
    finally:
        futures.wait(helped)  # even on an error, no helper is left mid-decode (a fork may follow)
    return mine + [sample for future in helped for sample in future.result()]


def _decode_all(raws: list[dict], cf_methods: list[str], num_classes: int | None) -> list[dict]:
    return [decode_sample(raw, cf_methods, num_classes) for raw in raws]


def _decoder_pool() -> tuple[futures.ThreadPoolExecutor | None, int]:
    """The helper threads of this process and how many threads decode in all (helpers + caller)."""
    threads = min(4, torch.get_num_threads())
    if get_worker_info() is not None or threads < 2:
        return None, 1
    return _helper_threads(os.getpid(), threads - 1), threads  # keyed by pid: threads do not survive a fork


@functools.lru_cache(maxsize=None)
def _helper_threads(pid: int, count: int) -> futures.ThreadPoolExecutor:
    return futures.ThreadPoolExecutor(count, thread_name_prefix="cfrobust-decode")


def decode_sample(raw: dict, cf_methods: list[str], num_classes: int | None = None) -> dict:
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    for ext in required_exts(cf_methods):
        if ext not in raw:
            why = ("a damaged shard? `cfrobust shards verify` checks every sample" if ext in (IMAGE_EXT, META_EXT)
                   else "were the shards made with this --cf?")
            raise UserError(f"{where} has no {ext!r} part ({why})")
    try:
        meta = json.loads(raw[META_EXT])
        sample = {
            "key": raw["__key__"],
            "image": decode_rgb(raw[IMAGE_EXT]),
            "cf": {m: decode_rgb(raw[cf_ext(m)]) for m in cf_methods},
            "label": meta["label"],
            "boxes": meta["boxes"],
            "group": meta["group"],
        }
        if MASK_EXT in raw:  # only there when the reader asked for masks
            sample["mask"] = decode_gray(raw[MASK_EXT]) > 127
    except (ValueError, KeyError, TypeError) as exc:  # damaged JSON or image data
        raise UserError(f"{where}: {type(exc).__name__}: {exc}; `cfrobust shards verify` checks every sample") from None
    if num_classes is not None and not (isinstance(sample["label"], int) and 0 <= sample["label"] < num_classes):
        raise UserError(f"{where}: label {sample['label']!r} is not one of the split's {num_classes} classes")
    return sample


def collate(samples: list[dict], masks: bool = False) -> Batch:
    boxes, valid = padded_boxes([s["boxes"] for s in samples])
    return Batch(
        images=stack_images([s["image"] for s in samples]),
        labels=torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        boxes=boxes,
        box_valid=valid,
        cf={m: stack_images([s["cf"][m] for s in samples]) for m in samples[0]["cf"]},
        groups=[s["group"] for s in samples],
        keys=[s["key"] for s in samples],
        masks=object_regions(samples) if masks else None,
    )


def object_regions(samples: list[dict]) -> torch.Tensor:
    """[B, 1, H, W] bool: each sample's mask, or its boxes' rectangles where it has no mask; empty
    for a sample without boxes (none in the shards, or dropped by --box-fraction: plain ERM)."""
    height, width = samples[0]["image"].shape[:2]
    regions = np.zeros((len(samples), 1, height, width), bool)
    for region, sample in zip(regions, samples):
        if sample["boxes"]:
            mask = sample.get("mask")
            region[0] = mask if mask is not None else boxes_to_mask(sample["boxes"], width, height)
    return torch.from_numpy(regions)


def stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 arrays -> [B, 3, H, W], a view of the pixels as decoded (channels-last in
    memory). The loader does not transpose: `normalize` lays the batch out for the model as it
    converts it to float anyway (in one pass on the CPU, and not at all for a channels-last
    model on the GPU), which saves a copy of every image on the loader's side."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def padded_boxes(box_lists: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K, 4] float32 boxes (K = most boxes of any sample, at least 1; padding rows 0) and
    the [B, K] mask of the real ones, built in numpy: per-sample tensor writes cost more."""
    lengths = np.fromiter(map(len, box_lists), dtype=np.int64, count=len(box_lists))
    valid = np.arange(max(1, int(lengths.max(initial=0)))) < lengths[:, None]
    boxes = np.zeros(valid.shape + (4,), np.float32)
    boxes[valid] = np.array([box for boxes_of_one in box_lists for box in boxes_of_one], np.float32).reshape(-1, 4)
    return torch.from_numpy(boxes), torch.from_numpy(valid)


SHUFFLE_BUFFER = 512
SHUFFLE_START = 64


def shuffle_ramp_batches(batch_size: int, num_workers: int) -> int:
    """Batches a loader yields before every worker's shuffle buffer is full (the ramp reads two
    samples per sample yielded, so benchmarks time the steps after it)."""
    return math.ceil((SHUFFLE_BUFFER - SHUFFLE_START) / batch_size) * max(1, num_workers)


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: np.random.Generator,
              initial: int = SHUFFLE_START) -> Iterator[dict]:
    """Buffer shuffle that starts yielding after `initial` samples and grows the buffer to
    `buffer_size` (two reads per yield), so an epoch's first batch is not held back by
    reading the whole buffer."""
    buffer: list[dict] = []
    samples = iter(samples)
    for sample in samples:
        buffer.append(sample)
        if len(buffer) < buffer_size:
            buffer.extend(itertools.islice(samples, 1))
        if len(buffer) >= min(initial, buffer_size):
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainShards(IterableDataset):
    """Per-rank training stream: exactly `len(self)` full batches per epoch on every rank.

    Build its DataLoader with `self.workers` processes: `num_workers`, lowered with a one-line
    note where the split cannot give each of them a full batch.
    """

    def __init__(
        self,
        split_dir,
        batch_size: int,
        cf_methods: list[str],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        experiment: DataExperiment | None = None,
        masks: bool = False,
    ):
        self.split_dir = location(split_dir)
        self.masks = masks  # read KEY.mask.png and give batches their object regions
        self.info = split_info(split_dir)
        self.batch_size = batch_size
        self.cf_methods = list(cf_methods)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.experiment = experiment if experiment is not None and experiment.active else None
        self.epoch = 0
        if not self.info["shards"]:
            raise UserError(f"{split_dir}: the split holds no samples to train on")
        counts = [s["num_samples"] for s in self.info["shards"]]
        if self.experiment is not None and self.experiment.data_ratio < 1:
            paths = shard_paths(self.split_dir, self.info, [s["name"] for s in self.info["shards"]])
            counts = [sum(map(self.experiment.keeps, shard_keys(path))) for path in paths]
        self.num_samples = sum(counts)
        self.workers = self._feedable(num_workers)  # DataLoader workers (0: the training process reads)
        self.loader_workers = max(1, self.workers)  # the streams per rank
        total_workers = world_size * self.loader_workers
        shard_batches = batches_per_worker(counts, total_workers, batch_size)
        sample_batches = batches_per_worker_by_sample(self.num_samples, total_workers, batch_size)
        self.by_sample = by_sample(len(counts), shard_batches, sample_batches, total_workers)
        self.per_worker = sample_batches if self.by_sample else shard_batches

    def _feedable(self, num_workers: int) -> int:
        """`num_workers`, or fewer where the samples cannot fill a batch for each of them."""
        fed = feedable_workers(self.num_samples, self.world_size, max(1, num_workers), self.batch_size)
        if fed == 0:
            fewer = " or run fewer processes" if self.world_size > 1 else ""
            raise UserError(f"{self.split_dir}: {self.num_samples} samples are too few for batch {self.batch_size} "
                            f"on {self.world_size} process(es); lower --batch{fewer}")
        if fed >= num_workers:
            return num_workers
        if self.rank == 0:
            print(f"note: {self.split_dir}: {self.num_samples} samples cannot fill a batch of {self.batch_size} for "
                  f"each of {self.world_size} process(es) x {num_workers} loader workers; using --workers {fed}",
                  file=sys.stderr)
        return fed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_worker * self.loader_workers

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_identity()
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """The batches of one loader worker of this rank (callable directly, for tests)."""
        if max(1, num_workers) != self.loader_workers:
            raise ValueError(f"a loader of {num_workers} worker(s) reads a stream made for {self.workers}: "
                             f"build it with TrainShards.workers")
        total = self.world_size * num_workers
        global_worker = self.rank * num_workers + worker
        names = shard_order([s["name"] for s in self.info["shards"]], self.seed, self.epoch)
        if self.by_sample:
            raws = self._share_of(global_worker, total, shard_paths(self.split_dir, self.info, names))
        else:
            mine = shards_for_worker(names, global_worker, total)
            raws = self._raw_stream(shard_paths(self.split_dir, self.info, mine))
        rng = np.random.default_rng([self.seed, self.epoch, global_worker])
        # Shuffling undecoded samples keeps the buffer small (JPEG bytes, not pixels); the
        # decode happens per batch, so the order is the same as shuffling decoded samples.
        raws = _shuffled(raws, self.shuffle_buffer, rng)
        for _ in range(self.per_worker):
            raw_batch = list(itertools.islice(raws, self.batch_size))
            if len(raw_batch) < self.batch_size:  # the manifest promised more than the tars hold
                raise UserError(f"{self.split_dir}: the shards hold fewer samples than {INFO_NAME} counts; "
                                f"`cfrobust shards verify` finds the damage")
            yield collate(self._decoded(raw_batch), self.masks)

    def _share_of(self, global_worker: int, total: int, paths: list[Path]) -> Iterator[dict]:
        """One worker's share when the split is shared out by sample: every worker reads all the
        shards, and keeps the samples at places global_worker, + total, + 2 total, ... of the
        epoch's sample order (sample_places), up to the last place that fills everyone's equal
        batches. The others (fewer than total x batch) sit this epoch out: which ones changes
        with the epoch."""
        places = sample_places(self.num_samples, self.seed, self.epoch)
        used = self.per_worker * self.batch_size * total
        read = 0
        for raw in self._raw_stream(paths):
            if read == self.num_samples:
                raise UserError(f"{self.split_dir}: the shards hold more samples than {INFO_NAME} counts; "
                                f"`cfrobust shards verify` finds the damage")
            place = places[read]
            read += 1
            if place < used and place % total == global_worker:
                yield raw
        if read < self.num_samples:
            raise UserError(f"{self.split_dir}: the shards hold fewer samples than {INFO_NAME} counts; "
                            f"`cfrobust shards verify` finds the damage")

    def _raw_stream(self, paths: list[Path]) -> Iterator[dict]:
        raws = iter_raw_samples(paths, self.cf_methods, self.masks)
        if self.experiment is None:
            return raws
        return (raw for raw in raws if self.experiment.keeps(raw["__key__"]))

    def _decoded(self, raws: list[dict]) -> list[dict]:
        samples = decode_many(raws, self.cf_methods, len(self.info["classes"]))
        return samples if self.experiment is None else [self.experiment.apply(s) for s in samples]


class EvalShards(IterableDataset):
    """Every sample of a split exactly once across all ranks and workers, each in manifest order."""

    def __init__(self, split_dir, batch_size: int, rank: int = 0, world_size: int = 1):
        self.split_dir = location(split_dir)
        self.info = split_info(split_dir)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_identity()
        return self.iter_worker(worker, num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[Batch]:
        """The batches of one loader worker of this rank: its shards, or, where the split has fewer
        shards than ranks x workers, every (ranks x workers)-th sample of them all from its own."""
        names = [s["name"] for s in self.info["shards"]]
        global_worker, total = self.rank * num_workers + worker, self.world_size * num_workers
        if len(names) >= total:
            raws = self._counted_samples(shards_for_worker(names, global_worker, total))
        else:  # read to the end all the same: the counts of the shards are checked there
            raws = itertools.islice(self._counted_samples(names), global_worker, None, total)
        while chunk := list(itertools.islice(raws, self.batch_size)):
            yield collate(decode_many(chunk, [], len(self.info["classes"])))

    def _counted_samples(self, names: list[str]) -> Iterator[dict]:
        """The raw samples of these shards, each shard held to its count in the manifest: a
        truncated shard would otherwise score a part of the split as if it were all of it."""
        promised = {s["name"]: s["num_samples"] for s in self.info["shards"]}
        for name in names:
            read = 0
            for raw in iter_raw_samples(shard_paths(self.split_dir, self.info, [name]), []):
                read += 1
                yield raw
            if read != promised[name]:
                raise UserError(f"{self.split_dir / name}: holds {read} samples where {INFO_NAME} counts {promised[name]}; "
                                f"`cfrobust shards verify` finds the damage")


def make_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches are built inside the workers, so the loader itself does no collation."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )


def _quiet_worker(_worker_id: int) -> None:
    # One thread per loader worker: the workers already run in parallel with the main process.
    # OpenCV's thread count is left alone: the workers only call imdecode, which runs on the
    # calling thread, and cv2.setNumThreads in a forked child can deadlock on a lock that a
    # pool thread of the parent held at fork time (seen: a training run hung at its first batch).
    torch.set_num_threads(1)
