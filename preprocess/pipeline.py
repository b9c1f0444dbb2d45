"""`cfrobust preprocess`: records -> validated, resized samples with counterfactuals -> shards.

Bad records are never silently dropped or fixed: each is reported with its key and source,
counted in the summary and in `_info.json`, and `strict=True` turns the first into an error.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import multiprocessing
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.errors import UserError
from cfrobust.files import resolved_paths
from cfrobust.outputs import check_output_folder
from cfrobust.preprocess.cagan.inpaint import CAGAN_SOURCE, CaganFill, CaganSettings, fill_cagan_samples
from cfrobust.preprocess.fills import FILLS, RANDOM_FILLS, record_rng
from cfrobust.preprocess.grabcut import MASKS_FROM_BOXES, grabcut_mask
from cfrobust.preprocess.images import RecordError, binarize, load_mask, load_rgb, mask_box, resize, source_size
from cfrobust.preprocess.progress import SplitProgress
from cfrobust.shards.manifest import write_info
from cfrobust.shards.remote import RemoteOutput, is_url, location
from cfrobust.shards.schema import (
    IMAGE_EXT,
    INFO_NAME,
    MASK_EXT,
    META_EXT,
    cf_ext,
    encode_jpeg,
    encode_meta,
    encode_png,
    part_info_name,
    shard_name,
)
from cfrobust.shards.verify import merge_parts
from cfrobust.shards.writer import ShardWriter

# A sample's slot, taken out before it is written: its source image's smaller side, so that
# the summary can say when --size upscaled the images (a 64-px dataset at the default 256 trains
# on 16 times the pixels it has).
SOURCE_SIDE = "_source_side"
MIN_SIZE, MAX_SIZE = 8, 4096  # --size: smaller images hold no object; larger ones exhaust memory
# --size left out: the adapter's side (256, the official resize) unless the training images are
# smaller by more than a mild upscale (the official ImageNet-9 pipeline takes its 224-px images to
# 256); then their median shorter side, read from the headers of the first SIZE_SAMPLE of them.
SIZE_SAMPLE, MILD_UPSCALE = 64, 1.25
# Job identity keys added since shards were first written: what an older journal or manifest meant.
IDENTITY_ADDED = {"masks_from_boxes": "none", "train_order": "source"}
TRAIN_SPLIT = "train"  # the split the trainer learns from; the only one written in shuffled order
ORDER_SEED = 0  # the training split's written order is fixed: the same shards on every run and machine
BOX_TOLERANCE = 1.0  # pixels a box may overhang the image (annotation rounding) before it is an error


@dataclass
class SplitSummary:
    split: str
    written: int = 0
    skipped: list[dict] = field(default_factory=list)
    resumed_shards: int = 0  # shards kept from an interrupted run (--resume)
    size: int = 0  # the stored image side, in pixels
    upscaled: int = 0  # samples written by this run whose source image was smaller than --size
    smallest_side: int = 0  # the smallest such source side, in pixels (0: none)


@dataclass(frozen=True)
class Job:
    """What one preprocessing process writes: its slice (rank of world_size) of every split."""

    dataset: DatasetSource
    out: Path
    cf_methods: tuple[str, ...]
    size: int
    shard_size: int
    strict: bool
    rank: int = 0
    world_size: int = 1
    cagan: CaganSettings | None = None
    remote: RemoteOutput | None = None  # --out URL: each finished file is uploaded there
    masks_from_boxes: str = "none"  # boxed records without a mask: none, or grabcut (preprocess/grabcut.py)

    def identity(self) -> dict:
        """What fixes the samples written (recorded in manifests and resume journals)."""
        return {"cf_methods": list(self.cf_methods), "size": self.size, "source": self.dataset.describe(),
                "masks_from_boxes": self.masks_from_boxes, "train_order": train_order(self.dataset)}

    def manifest(self, split: str) -> Path:
        name = INFO_NAME if self.world_size == 1 else part_info_name(self.rank, self.world_size)
        return self.out / split / name

    def journal(self, split: str) -> Path:
        suffix = "" if self.world_size == 1 else f".r{self.rank:03d}-of-{self.world_size:03d}"
        return self.out / split / f"_progress{suffix}.jsonl"

    def shard_prefix(self, split: str) -> str:
        """What the names of this process's shards start with (`train-`, `train-r002-`)."""
        return shard_name(split, 0, self.rank, self.world_size)[: -len("000000.tar")]

    def own_files(self, split: str) -> list[Path]:
        """Everything this process writes in a split folder (shards, temporaries, manifests)."""
        folder = self.out / split
        if not folder.is_dir():
            return []
        mine = [p for p in folder.iterdir() if p.name.startswith(self.shard_prefix(split))]
        merged = folder / INFO_NAME  # the split's manifest, stale once any part is rewritten
        return list(dict.fromkeys(mine + [p for p in (self.manifest(split), self.journal(split), merged) if p.exists()]))


def preprocess(
    dataset: DatasetSource,
    out: Path,
    cf_methods: list[str],
    size: int | None = None,
    shard_size: int = 1000,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    cagan: CaganSettings | None = None,
    masks_from_boxes: str = "none",
) -> list[SplitSummary]:
    """Write `out/<split>/` shards for every split of `dataset`; return what was written and skipped.

    `workers` processes build samples in parallel (the output is identical for any count);
    `rank`/`world_size` take every world_size-th record, for several machines on one output.
    `cagan` (the generator's weights, device and batch) is needed when `cf_methods` has "cagan".
    `masks_from_boxes="grabcut"` stores a GrabCut mask for every boxed record that has no mask.
    """
    unknown = [m for m in cf_methods if m not in FILLS and m != "cagan"]
    if unknown:
        raise UserError(f"unknown counterfactual fill {unknown[0]!r}; available: {', '.join(FILLS)}, cagan")
    if "cagan" in cf_methods and cagan is None:
        raise UserError(
            "--cf cagan needs --cagan-weights W.pt (train one with `cfrobust cagan train` "
            "or convert the released model with `cfrobust cagan import`)"
        )
    if masks_from_boxes not in MASKS_FROM_BOXES:
        raise UserError(f"unknown --masks-from-boxes {masks_from_boxes!r}; choose one of {', '.join(MASKS_FROM_BOXES)}")
    if resume and overwrite:
        raise UserError("--resume keeps earlier output and --overwrite deletes it: choose one")
    check_counts(size, shard_size, workers, world_size)
    remote = remote_output(out, world_size)
    if remote is not None:
        out = remote.staging  # built here, uploaded file by file
    check_output_folder(Path(out))
    cf_methods = list(dict.fromkeys(cf_methods))  # --cf tile,tile stores one tile
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1} (world size {world_size})")
    job = Job(
        dataset, Path(out), tuple(cf_methods), size or default_size(dataset), shard_size, strict, rank, world_size,
        cagan if "cagan" in cf_methods else None, remote, masks_from_boxes,
    )
    try:
        fill = CaganFill(job.cagan) if job.cagan else None  # loaded before any output is claimed: bad weights stop early
        for split in dataset.splits:
            claim_output(job, split, overwrite, resume)
        return [write_split(job, split, resume, workers, progress, fill) for split in dataset.splits]
    finally:
        if remote is not None:
            remote.close()


def default_size(dataset: DatasetSource) -> int:
    """--size when it is not given (SIZE_SAMPLE's comment): a 64-px dataset stored at 256 would
    train on 16 times the pixels it has, 16 times slower, and nothing in it would be sharper."""
    sides = [] if dataset.sized_by_default else sorted(training_sides(dataset))
    if not sides:
        return dataset.default_size
    median = sides[len(sides) // 2]
    return dataset.default_size if median * MILD_UPSCALE >= dataset.default_size else max(MIN_SIZE, median)


def training_sides(dataset: DatasetSource) -> list[int]:
    """The shorter side of the first SIZE_SAMPLE readable training images (the first split's
    when none is called train); unreadable ones are left to the run to report."""
    split = "train" if "train" in dataset.splits else next(iter(dataset.splits), None)
    if split is None:
        return []
    sides = []
    for record in itertools.islice(dataset.records(split), 4 * SIZE_SAMPLE):
        with contextlib.suppress(RecordError):
            if not record.problem:
                sides.append(min(source_size(record.image)))
        if len(sides) == SIZE_SAMPLE:
            break
    return sides


def remote_output(out, world_size: int) -> RemoteOutput | None:
    """For a URL --out: where its files are built before they are uploaded (a fresh folder
    under the system's temporary folder, $TMPDIR); None for a local --out."""
    if not is_url(str(out)):
        return None
    if world_size > 1:
        raise UserError(f"--out {out}: several processes write a local or shared folder; a URL takes one "
                        f"(--world-size 1), or upload the merged folder afterwards")
    return RemoteOutput(location(str(out)))


def check_counts(size: int | None, shard_size: int, workers: int, world_size: int) -> None:
    if size is not None and not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size {size}: stored images are {MIN_SIZE} to {MAX_SIZE} pixels a side")
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: a shard holds at least 1 sample")
    if workers < 1:
        raise UserError(f"--workers {workers}: at least 1 process builds the samples")
    if world_size < 1:
        raise UserError(f"--world-size {world_size}: at least 1 process writes the output")


def check_same_job(job: Job, recorded: dict, where: Path) -> None:
    """--resume keeps a split's shards (finished, or journalled so far) only if this run would
    have written the same ones."""
    changed = sorted(key for key, value in job.identity().items()
                     if resolved_paths(recorded.get(key, IDENTITY_ADDED.get(key))) != resolved_paths(value))
    if changed:
        raise UserError(
            f"{where}: made with other options ({', '.join(changed)}); --resume continues the same job: "
            f"pass its options again, or --overwrite to remake the shards"
        )


def claim_output(job: Job, split: str, overwrite: bool, resume: bool) -> None:
    """Refuse to touch earlier output unless asked: --overwrite deletes this process's files,
    --resume keeps them; other processes' files in a shared split folder are never touched."""
    if job.remote is not None:
        claim_remote_output(job, split, overwrite, resume)
        return
    existing = job.own_files(split)
    if existing and overwrite:
        for path in existing:
            path.unlink()
    elif existing and not resume:
        raise UserError(
            f"{job.out / split} already holds output; pass --resume to continue it, --overwrite to replace it, "
            f"or choose another --out"
        )


def claim_remote_output(job: Job, split: str, overwrite: bool, resume: bool) -> None:
    """The same for a URL --out, judged by its manifest and journal: --resume downloads them
    (the shards the journal lists stay remote), --overwrite deletes them."""
    names = [job.manifest(split).name, job.journal(split).name]
    existing = [name for name in names if job.remote.has(f"{split}/{name}")]
    if existing and overwrite:
        for name in existing:
            job.remote.remove(f"{split}/{name}")
    elif existing and not resume:
        raise UserError(
            f"{job.remote.root / split} already holds output; pass --resume to continue it, --overwrite to replace it, "
            f"or choose another --out"
        )
    elif existing:
        for name in existing:
            job.remote.pull(f"{split}/{name}")


def write_split(
    job: Job, split: str, resume: bool, workers: int, show_progress: bool, cagan: CaganFill | None = None
) -> SplitSummary:
    split_dir = job.out / split
    if resume and job.manifest(split).exists():  # finished in the earlier run
        info = json.loads(job.manifest(split).read_text())
        check_same_job(job, info, job.manifest(split))
        merge_when_complete(job, split)
        return SplitSummary(split, info["num_samples"], info["skipped"], len(info["shards"]), job.size)
    split_dir.mkdir(parents=True, exist_ok=True)
    for temporary in split_dir.glob(job.shard_prefix(split) + "*.tmp"):
        temporary.unlink()  # a shard the crash interrupted; it is redone
    present = None if job.remote is None else (lambda shard: job.remote.has(f"{split}/{shard['name']}"))
    done = SplitProgress.load(job.journal(split), job.identity(), present)
    if done.recorded_job is not None:
        check_same_job(job, done.recorded_job, job.journal(split))
    summary = SplitSummary(split, sum(s["num_samples"] for s in done.shards), list(done.skipped), len(done.shards),
                           job.size)
    pending = PendingShard(consumed=done.consumed)
    writer = ShardWriter(
        split_dir, split, job.shard_size, first_index=len(done.shards), rank=job.rank, world_size=job.world_size,
        on_shard=lambda entry: shard_done(job, split, entry, done, pending),
    )
    seen, groups = set(done.keys), Counter(done.groups)
    records = itertools.islice(my_records(job, split), done.consumed, None)
    total = _my_count(job, split)
    bar = tqdm(total=total, initial=done.consumed, desc=split, unit="img",
               disable=None if show_progress else True)  # None: drawn only on a terminal, not into logs
    outcomes = build_samples(records, job, workers)
    if cagan is not None:
        outcomes = fill_cagan_samples(outcomes, cagan, position=done.consumed)
    try:
        for record, outcome in outcomes:
            pending.consumed += 1
            bar.update()
            problem = outcome if isinstance(outcome, str) else ("duplicate key" if record.key in seen else "")
            if problem:
                if job.strict:
                    raise UserError(f"record {record.key} ({record.source}): {problem}")
                pending.skipped.append({"key": record.key, "source": record.source, "reason": problem})
                summary.skipped.append(pending.skipped[-1])
                continue
            count_upscaled(summary, outcome.pop(SOURCE_SIDE), job.size)
            seen.add(record.key)
            groups[record.group] += 1
            pending.keys.append(record.key)
            pending.groups[record.group] += 1
            writer.write(outcome)
            summary.written += 1
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        outcomes.close()  # stops the worker pool now, not when the generator is collected
        bar.close()
    write_manifest(job, split, done.shards, summary, groups)
    job.journal(split).unlink(missing_ok=True)
    if job.remote is not None:
        job.remote.remove(f"{split}/{job.journal(split).name}")
    return summary


def count_upscaled(summary: SplitSummary, source_side: int, size: int) -> None:
    if source_side < size:
        summary.upscaled += 1
        summary.smallest_side = min(summary.smallest_side or source_side, source_side)


def shard_done(job: Job, split: str, entry: dict, done: SplitProgress, pending: "PendingShard") -> None:
    """Journal a finished shard; for a URL --out, upload it, then the journal that lists it."""
    done.add_shard(entry, pending.consumed, *pending.take())
    if job.remote is not None:
        job.remote.publish(job.out / split / entry["name"], keep_local=False)
        job.remote.publish(job.journal(split))


@dataclass
class PendingShard:
    """What the shard in progress holds, journalled when it completes."""

    consumed: int = 0
    keys: list[str] = field(default_factory=list)
    groups: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)

    def take(self):
        taken = (self.keys, self.groups, self.skipped)
        self.keys, self.groups, self.skipped = [], Counter(), []
        return taken


def write_manifest(job: Job, split: str, shards: list[dict], summary: SplitSummary, groups: Counter) -> None:
    info = {
        "split": split,
        "num_samples": summary.written,
        "shards": shards,
        "size": job.size,
        "cf_methods": list(job.cf_methods),
        "masks_from_boxes": job.masks_from_boxes,
        "train_order": train_order(job.dataset),
        "classes": list(job.dataset.classes),
        "groups": sorted(groups),
        "group_counts": dict(sorted(groups.items())),
        "aligned_groups": list(job.dataset.aligned_groups),
        "source": job.dataset.describe(),
        "skipped": summary.skipped,
    }
    if job.world_size == 1:
        write_info(job.out / split, info)
        if job.remote is not None:
            job.remote.publish(job.out / split / INFO_NAME)
        return
    write_info(job.out / split, {**info, "rank": job.rank, "world_size": job.world_size}, name=job.manifest(split).name)
    merge_when_complete(job, split, refresh=True)


def merge_when_complete(job: Job, split: str, refresh: bool = False) -> None:
    """The last process to finish combines the parts into the split's manifest: after writing
    its part (`refresh`), or when --resume finds its part done and no manifest yet."""
    parts = [job.out / split / part_info_name(r, job.world_size) for r in range(job.world_size)]
    if job.world_size > 1 and all(p.exists() for p in parts) and (refresh or not (job.out / split / INFO_NAME).exists()):
        merge_parts(job.out / split)


def my_records(job: Job, split: str) -> Iterator[Record]:
    """This process's records of a split: every world_size-th one of written_order, from its rank."""
    return itertools.islice(written_order(job.dataset, split), job.rank, None, job.world_size)


def train_order(dataset: DatasetSource) -> str:
    """How the training split's records are ordered in its shards: shuffled, or the source's own
    order where it is mixed already (DatasetSource.mixed_order)."""
    return "source" if dataset.mixed_order else "shuffled"


def written_order(dataset: DatasetSource, split: str) -> Iterator[Record]:
    """A split's records in the order its shards hold them.

    Sources often list a split class by class (Waterbirds' metadata.csv follows CUB's class
    folders; a folder dataset, its class folders), and the trainer's shuffle buffer mixes only a
    few hundred neighbouring samples: such a split trained on one-class batches, and on a
    Waterbirds-layout set even ERM on the uncorrelated data learnt nothing. So the training split
    is listed and shuffled here, once, with a fixed seed; the evaluation splits keep the source's
    order. Records the adapter found unusable come first, in the source's order: they are
    reported (or stop --strict) as the source lists them, before any image is read.
    """
    records = dataset.records(split)
    if split != TRAIN_SPLIT or dataset.mixed_order:
        return records
    listed = list(records)
    usable = [record for record in listed if not record.problem]
    shuffled = [usable[i] for i in np.random.default_rng(ORDER_SEED).permutation(len(usable))]
    return iter([record for record in listed if record.problem] + shuffled)


def _my_count(job: Job, split: str) -> int | None:
    count = job.dataset.count(split)
    return None if count is None else len(range(job.rank, count, job.world_size))


def build_samples(records: Iterator[Record], job: Job, workers: int) -> Iterator[tuple[Record, dict | str]]:
    """(record, sample) or (record, problem) for each record, in order, built in `workers`
    processes; order is kept so the shards do not depend on the worker count."""
    task = functools.partial(_sample_or_problem, num_classes=len(job.dataset.classes), size=job.size,
                             cf_methods=job.cf_methods, masks_from_boxes=job.masks_from_boxes)
    if workers <= 1:
        for record in records:
            yield record, task(record)
        return
    forks = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forks else "spawn")
    # Forked workers inherit one OpenCV thread from opencv_single_threaded; spawned ones start
    # fresh, with no parent lock to deadlock on, and set it themselves.
    with opencv_single_threaded(), context.Pool(workers, initializer=_start_worker, initargs=(not forks,)) as pool:
        # Records travel to the workers and back beside their outcome; holding a bounded window
        # keeps memory flat on large datasets.
        window = 64 * workers
        iterator = iter(records)
        while chunk := list(itertools.islice(iterator, window)):
            yield from zip(chunk, pool.imap(task, chunk, chunksize=8))


@contextlib.contextmanager
def opencv_single_threaded() -> Iterator[None]:
    """One OpenCV thread in this process while worker processes are forked from it.

    The workers are the parallelism, so each must run OpenCV on its own thread; they inherit
    the setting. It is set here, before the fork, because calling cv2.setNumThreads in a forked
    child can deadlock on a lock one of the parent's pool threads held at fork time (seen in
    a DataLoader worker); here the parent stops its own pool threads cleanly instead."""
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _start_worker(set_opencv_threads: bool) -> None:
    """Ctrl-C is the parent's to handle (it stops the pool): a worker ignores it rather than
    print its own traceback. A spawned worker sets its one OpenCV thread itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if set_opencv_threads:
        import cv2

        cv2.setNumThreads(1)


def _sample_or_problem(record: Record, num_classes: int, size: int, cf_methods,
                       masks_from_boxes: str = "none") -> dict | str:
    if record.problem:
        return record.problem
    try:
        return make_sample(record, num_classes, size, list(cf_methods), masks_from_boxes)
    except RecordError as exc:
        return str(exc)


def make_sample(record: Record, num_classes: int, size: int, cf_methods: list[str],
                masks_from_boxes: str = "none") -> dict:
    """Validate one record and build its shard sample (raises RecordError when it is bad)."""
    if "." in record.key or "/" in record.key:
        raise RecordError("key contains '.' or '/', which shard file names cannot carry")
    if not 0 <= record.label < num_classes:
        raise RecordError(f"label {record.label} outside 0..{num_classes - 1}")
    image, (width, height) = load_rgb(record.image, min_side=size)
    mask = None if record.mask is None else load_mask(record.mask, width, height)
    boxes = [check_box(box, width, height) for box in source_boxes(record, width, height, mask)]
    scale = np.array([size / width, size / height, size / width, size / height])
    boxes = [tuple(float(v) for v in np.array(box) * scale) for box in boxes]
    image = resize(image, size)
    encoded = encode_jpeg(image)
    sample = {"__key__": record.key, IMAGE_EXT: encoded, SOURCE_SIDE: min(width, height)}
    for method in cf_methods:
        # A record without boxes trains as plain ERM; its counterfactual slot holds the image.
        if not boxes:
            sample[cf_ext(method)] = encoded
        elif method == "cagan":  # filled in batches by the main process (cagan/inpaint.py)
            sample[cf_ext(method)], sample[CAGAN_SOURCE] = None, (image, boxes)
        else:
            rng = record_rng(record.key, method) if method in RANDOM_FILLS else None  # seeding costs ~20 us
            sample[cf_ext(method)] = encode_jpeg(FILLS[method](image, boxes, rng=rng))
    if mask is not None:
        sample[MASK_EXT] = encode_png(binarize(resize(mask, size, nearest=True)))
    elif boxes and masks_from_boxes == "grabcut":
        sample[MASK_EXT] = encode_png(binarize(grabcut_mask(image, boxes)))
    sample[META_EXT] = encode_meta(record.label, boxes, record.group, record.split, record.source, record.attrs)
    return sample


ASPECT_TOLERANCE = 0.02  # a downscaled copy keeps the annotated image's shape up to rounding


def source_boxes(record: Record, width: int, height: int, mask: np.ndarray | None) -> list:
    """The record's boxes in the pixels of its decoded image.

    Boxes given for another image size (`boxes_size`, e.g. annotations of the full-resolution
    original of a downscaled file) are rescaled; a record with a mask and no boxes gets the
    mask's bounding box.
    """
    boxes = list(record.boxes)
    if record.boxes_size is not None and boxes:
        sx, sy = width / record.boxes_size[0], height / record.boxes_size[1]
        if abs(sx / sy - 1) > ASPECT_TOLERANCE:  # not a resized copy: rotated (EXIF) or another image
            raise RecordError(f"the annotation's image is {record.boxes_size[0]}x{record.boxes_size[1]}, the file "
                              f"{width}x{height}: another shape, so its boxes cannot be placed (rotated?)")
        boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]
    if not boxes and mask is not None:
        box = mask_box(mask)
        if box is None:
            raise RecordError("mask is empty (no foreground pixel)")
        boxes = [box]
    return boxes


def check_box(box, width: int, height: int) -> tuple:
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise RecordError(f"box {list(box)} (x0, y0, x1, y1) ends before it starts: a negative width or height")
    if not (x1 > x0 and y1 > y0):
        raise RecordError(f"box {list(box)} has zero area")
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise RecordError(f"box {list(box)} lies outside the {width}x{height} image")
    clipped = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise RecordError(f"box {list(box)} lies outside the {width}x{height} image")
    return clipped
