"""The training loop, the same for one process and for torchrun on many GPUs and nodes.

    cfrobust train --shards S --out RUN --arch resnet50 --cf tile --f mrand --reg bbox_o
    torchrun --nproc_per_node=8 -m cfrobust train --shards S --out RUN ...
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 -m cfrobust train --shards S --out RUN ...

Under torchrun every process trains on its own slice of the shards with `--batch` images per
step (global batch = batch x processes), gradients are averaged by DDP, and rank 0 alone writes
the run folder. The best weights (by validation accuracy) are scored on every non-train split
into RUN/eval.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from cfrobust.errors import UserError
from cfrobust.outputs import check_output_folder, check_replaceable, remove_folder
from cfrobust.shards.experiments import DataExperiment
from cfrobust.shards.manifest import list_splits, read_info
from cfrobust.shards.reader import TrainShards, make_loader, split_info
from cfrobust.shards.remote import is_url, location
from cfrobust.trainer.augment import Augmentation
from cfrobust.trainer.checkpoint import load_checkpoint, save_checkpoint
from cfrobust.trainer.config import PREDATED, RUN_FILES, TrainConfig
from cfrobust.trainer.counterfactual import output_size
from cfrobust.distributed import DistEnv, gather_objects, setup_distributed, sync_buffers, teardown_distributed
from cfrobust.trainer.evaluate import eval_document, evaluate_splits, write_json
from cfrobust.trainer.fills import ONLINE_FILLS
from cfrobust.trainer.models import build_model, on_device, resolve_arch
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.optim import Schedule, make_optimizer
from cfrobust.trainer.pixels import set_normalization, using_normalization
from cfrobust.trainer.saliency import SALIENCY_SCORES
from cfrobust.trainer.train_log import VAL_FIGURES, EpochMeter, TrainLog, chance_note, check_log_options


AUTO_ARCH_NOTE = ("note: --arch auto without --pretrained trains simple-cnn from random weights (small images, minutes "
                  "on a CPU); the paper fine-tunes ImageNet weights: --pretrained torchvision (resnet50) or "
                  "--pretrained BiT-S-R50x1.npz")


def train(config: TrainConfig) -> dict:
    """Run the whole job; returns the eval document (identical on every rank)."""
    env = setup_distributed(config.device)
    try:
        with using_normalization(config.normalize):
            document, _model = train_in(env, config)
        return document
    finally:
        teardown_distributed()


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint so a killed run continues exactly."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps so far
    batches_done: int = 0  # batches of the current, unfinished epoch
    best_score: float = -math.inf
    best_epoch: int = 0
    metrics: list = field(default_factory=list)  # one record per completed epoch


def train_in(env: DistEnv, config: TrainConfig):
    """Train inside an initialised process group; returns (eval document, best model)."""
    splits, info = training_manifest(config)  # checks the options first
    auto_from_scratch = config.arch == "auto" and not config.pretrained
    # Saved resolved: eval rebuilds the net, and config.json says which pairing trained.
    config = replace(config, arch=chosen_arch(config)).with_factual_pairing(len(info["classes"]))
    set_normalization(config.normalize)  # train() restores the caller's afterwards
    if config.precision == "16" and env.device.type != "cuda":
        raise UserError("--precision 16 needs a CUDA device; use bf16 or 32 on the CPU")
    out = Path(config.out)
    checkpoint = resume_point(out, config, check_existing=env.is_main)
    check_ranks_agree(out, checkpoint is not None, env)
    if env.is_main:
        prepare_run_folder(out, config, resuming=checkpoint is not None)
    model, data, parts = build_training(config, info, env)
    state, best_weights = restore(checkpoint, model, parts) if checkpoint is not None else (RunState(), None)
    select_on = selection_split_of(shard_root(config))
    loader = make_loader(data, data.workers, pin_memory=env.device.type == "cuda")  # --workers, or fewer for small data

    def save_mid_epoch() -> None:  # --save-every: rank 0 records where the epoch stands
        saved = checkpoint_state(model, parts, info, state)  # every rank: it gathers their RNG states
        if env.is_main:
            save_checkpoint(out / "checkpoints" / "last.pt", saved)

    with TrainLog(out, config, env.is_main, resumed_at=state.step if checkpoint is not None else None) as log:
        # (A resumed run's recorded net may be another: the note is for simple-cnn only.)
        if auto_from_scratch and config.arch == "simple-cnn" and env.is_main and not config.quiet:
            print(AUTO_ARCH_NOTE, file=sys.stderr)  # after every check: a bad option stays a one-line error
        for epoch in range(state.epoch, config.epochs):
            data.set_epoch(epoch)
            parts.objective.set_epoch(epoch)
            stats = train_one_epoch(parts, loader, state, epoch, log, save_mid_epoch)
            sync_buffers(model, env)  # BatchNorm statistics drift apart per rank; keep rank 0's
            record = {"epoch": epoch + 1, "step": state.step, **stats}
            record, improved = close_epoch(model, parts, state, record, select_on, len(info["classes"]))
            if improved:
                best_weights = copy.deepcopy(model.state_dict())
            saved = checkpoint_state(model, parts, info, state)
            if env.is_main:
                save_epoch(out, state, saved, is_best=improved)
            log.epoch_done(record)
            note = chance_note(state.metrics, len(info["classes"]), config.epochs)
            if note and env.is_main:
                print(note, file=sys.stderr)  # also under --quiet: the run is likely to end at chance
    model.load_state_dict(best_weights)
    results = evaluate_splits(model, shard_root(config), [s for s in splits if s != "train"], env,
                              config.eval_batch or 2 * config.batch, num_classes=len(info["classes"]),
                              image_size=config.eval_side())
    document = eval_document(out / "checkpoints" / "best.pt", config.to_dict(), results, shard_root(config))
    document["best_epoch"] = state.best_epoch
    if env.is_main:
        write_json(out / "eval.json", document)
    return document, model


def chosen_arch(config: TrainConfig) -> str:
    """The net --arch names; auto resumes as the run it continues recorded (one made before auto
    existed may hold the former default, resnet50), else resolve_arch's choice."""
    recorded = Path(config.out) / "config.json"
    if config.arch == "auto" and config.resume and recorded.is_file():
        try:
            return str(json.loads(recorded.read_text())["arch"])
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable record: resume_point names what is wrong with the run
    return resolve_arch(config.arch, config.pretrained)


def build_training(config: TrainConfig, info: dict, env: DistEnv) -> tuple[torch.nn.Module, TrainShards, "TrainingParts"]:
    """The model (unwrapped), this rank's training stream and the parts of a step, fresh."""
    model, ddp_model = make_model(config, len(info["classes"]), env)
    data = TrainShards(
        shard_root(config) / "train",
        config.batch,
        [config.cf] if config.cf != "none" and not config.cf_online else [],
        config.seed,
        env.rank,
        env.world_size,
        config.workers,
        experiment=DataExperiment(config.seed, config.data_ratio, config.box_fraction, config.bbox_noise),
        masks=reads_masks(config),
    )
    optimizer = make_optimizer(model, config)
    # Augmentation randomness differs per rank (each sees other images) but is seeded.
    generator = torch.Generator(env.device).manual_seed(config.seed * 1000 + env.rank)
    objective = Objective(config, generator, balanced_group_weights(info) if config.balance_groups else None,
                          num_classes=len(info["classes"]))
    parts = TrainingParts(ddp_model, objective, optimizer, Schedule(optimizer, config, len(data)),
                          Precision(config.precision, env.device), generator, env, config, Augmentation.from_config(config))
    return model, data, parts


def close_epoch(model, parts: "TrainingParts", state: RunState, record: dict, select_on: str | None,
                num_classes: int) -> tuple[dict, bool]:
    """Score the epoch on the selection split, move the epoch schedule and the run state on;
    returns the epoch's record for metrics.jsonl and whether it is the best so far."""
    config, epoch = parts.config, record["epoch"]
    if select_on:
        val = evaluate_splits(model, shard_root(config), [select_on], parts.env, config.eval_batch or 2 * config.batch,
                              num_classes=num_classes, image_size=config.eval_side())
        record["val"] = validation_record(val[select_on], select_on, resolved_selection(config, select_on))
    parts.schedule.after_epoch(record["val"]["loss"] if select_on else None)
    score = record["val"][record["val"]["selected_by"]] if select_on else epoch  # without val: the last epoch
    improved = score > state.best_score  # a tie keeps the earlier epoch
    if improved:
        state.best_score, state.best_epoch = score, epoch
    state.epoch, state.batches_done = epoch, 0
    state.metrics.append(record)
    return record, improved


# --select-by -> the selection split's figure (evaluate's name) that ranks epochs for best.pt.
SELECTION_FIGURES = {"accuracy": "accuracy", "auroc": "auroc", "worst_group": "worst_group_accuracy"}


def validation_record(figures: dict, split: str, select_by: str) -> dict:
    """metrics.jsonl's "val": the split's figures, its AUROC (null where undefined; kept out of
    VAL_FIGURES, whose values go to TensorBoard as numbers) and the figure that ranked the epoch."""
    record = {k: figures[k] for k in VAL_FIGURES}
    record.update(auroc=figures["auroc"], split=split, selected_by=selection_figure(figures, select_by))
    return record


def selection_figure(figures: dict, select_by: str) -> str:
    """The figure that ranks the epoch. AUROC is undefined (None) on a split that holds a single
    class (two classes: no positives or no negatives); that depends on the labels alone, so it holds
    for every epoch of the run, which is then ranked by accuracy throughout."""
    name = SELECTION_FIGURES[select_by]
    return "accuracy" if figures[name] is None else name


@dataclass
class TrainingParts:
    """What one optimizer step needs, passed around as one thing."""

    model: torch.nn.Module  # DDP-wrapped when distributed
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: "Precision"
    generator: torch.Generator
    env: DistEnv
    config: TrainConfig
    augmentation: Augmentation = field(default_factory=Augmentation)  # none unless configured


def balanced_group_weights(info: dict) -> dict[str, float]:
    """Per training group, N / (G n_g): every group weighs the same in all, and an image 1 on average."""
    counts = {g: n for g, n in info.get("group_counts", {}).items() if n > 0}
    total = sum(counts.values())
    return {g: total / (len(counts) * n) for g, n in counts.items()}


def reads_masks(config: TrainConfig) -> bool:
    """Whether training needs the samples' masks: only F and Sal use the object region."""
    return config.object_region == "mask" and (config.f != "none" or config.reg != "none")



class Precision:
    """Autocast and, for fp16, a gradient scaler. `auto`: bf16 on GPU, fp32 on CPU. Training
    refuses fp16 on the CPU (`train_in`), but the loss scaling works the same on either
    device, so the CPU tests check it."""

    def __init__(self, option: str, device: torch.device):
        kind = ("bf16" if device.type == "cuda" else "32") if option == "auto" else option
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(kind)
        self.scaler = torch.amp.GradScaler(device.type) if kind == "16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer, clip_norm: float = 0.0) -> None:
        """The optimizer step, after clipping the gradients' global norm to `clip_norm` (if > 0;
        under fp16 on the unscaled gradients)."""
        if clip_norm > 0:
            if self.scaler:
                self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


def train_one_epoch(parts: TrainingParts, loader, state: RunState, epoch: int, log: TrainLog, save_checkpoint_now) -> dict:
    """One pass over the epoch's batches; returns the epoch's figures for metrics.jsonl."""
    env, config = parts.env, parts.config
    parts.model.train()
    meter = EpochMeter(env.device)
    skip = state.batches_done  # batches this epoch already did before an interruption
    log.start_epoch(epoch, len(loader), skip, config.batch * env.world_size)
    for index, batch in enumerate(loader):
        if index < skip:
            continue  # the stream is deterministic: these batches were trained on before the crash
        lr = current_lr(parts)  # the rate this step uses (the schedule moves it after the step)
        batch = parts.augmentation(batch.to(env.device, non_blocking=True), epoch)
        parts.objective.set_step(state.step)
        terms, logits, batch = optimizer_step(parts, batch)
        state.step += 1
        state.batches_done = index + 1
        meter.add(terms, logits, batch.labels)
        log.after_step(state.step, terms, lr, len(batch) * env.world_size, meter)
        if config.save_every and state.step % config.save_every == 0:
            save_checkpoint_now()
    log.end_epoch(meter)
    return meter.summary(current_lr(parts), env.world_size)


def current_lr(parts: TrainingParts) -> float:
    return parts.optimizer.param_groups[0]["lr"]


def optimizer_step(parts: TrainingParts, batch):
    """One optimizer step over the batch, cut into --batch-split chunks whose gradients add up;
    DDP all-reduces only on the last chunk. Returns the detached terms and logits of x."""
    chunks = batch.chunks(parts.config.batch_split)
    loss_weights, log_weights = chunk_weights(parts, chunks)
    parts.optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    all_logits = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not parts.env.distributed else parts.model.no_sync()
        with sync:
            with parts.precision.autocast():
                terms, logits = parts.objective(parts.model, chunk)
            parts.precision.backward(sum(value * loss_weights[i].get(name, 1) for name, value in terms.items()))
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() * log_weights[i].get(name, 1)
        all_logits.append(logits)
    parts.precision.step(parts.optimizer, parts.config.clip_grad)
    parts.schedule.after_step()
    return totals, torch.cat(all_logits), batch


def chunk_weights(parts: TrainingParts, chunks: list) -> tuple[list[dict], list[dict]]:
    """Per chunk, each term's weight in the loss and in this rank's log ({}: all 1). In the loss
    a term weighs its rows' share of the step's rows of that term, over every rank under DDP
    (whose gradient average divides by the world size again), so each term is the mean over
    the global batch however the boxed samples fall between chunks and ranks: a chunk or rank
    without boxes would otherwise pull CF and Sal toward 0. The log keeps this rank's means.
    One small all-reduce per step, and only when a term counts boxed samples."""
    objective, env = parts.objective, parts.env
    across_ranks = env.distributed and objective.counts_boxes
    if len(chunks) == 1 and not across_ranks:
        return [{}], [{}]
    rows = [objective.rows_per_term(chunk) for chunk in chunks]
    names = list(rows[0])
    local = torch.stack([sum(r[name] for r in rows) for name in names]).float()
    step = local.clone()
    if across_ranks:
        torch.distributed.all_reduce(step)
    step = step.clamp(min=1) / (env.world_size if across_ranks else 1)
    local = local.clamp(min=1)

    def shares(totals: torch.Tensor) -> list[dict]:
        return [{name: r[name] / totals[i] for i, name in enumerate(names)} for r in rows]

    return shares(step), shares(local)


def training_manifest(config: TrainConfig) -> tuple[list[str], dict]:
    """The split names under --shards and the train split's manifest, checked against the config."""
    splits = list_splits(shard_root(config))
    if "train" not in splits:
        raise UserError(f"{config.shards}: no train/ split to train on")
    info = split_info(shard_root(config) / "train")
    check_config(config, info)
    return splits, info


def shard_root(config: TrainConfig):
    """--shards as a location: a local folder, or a URL read through --cache-dir when given."""
    return location(config.shards, config.cache_dir or None)


def selection_split(splits: list[str]) -> str | None:
    """The split that picks best.pt (by --select-by) and feeds the plateau schedule: `val`, else
    the first `*val` split (CCT's cis_val), else none, and the last epoch is best whatever
    --select-by says (the caller passes only the splits that hold samples)."""
    if "val" in splits:
        return "val"
    return next((s for s in splits if s.endswith("val")), None)


def selection_split_of(shards) -> str | None:
    """The selection split among the shard root's splits that hold samples."""
    return selection_split([s for s in list_splits(shards) if read_info(location(shards) / s)["num_samples"] > 0])


def resolved_selection(config: TrainConfig, select_on: str | None) -> str:
    """--select-by auto: worst_group when the selection split's groups say more than its classes
    (a spurious attribute such as the place, as in Waterbirds), else accuracy."""
    if config.select_by != "auto":
        return config.select_by
    if select_on is None:
        return "accuracy"
    info = read_info(shard_root(config) / select_on)
    groups = set(info.get("groups", []))
    return "worst_group" if len(groups) >= 2 and groups - set(info.get("classes", [])) else "accuracy"


def check_worst_group_selection(shards: str) -> None:
    """--select-by worst_group needs a selection split of two or more groups (its manifest lists
    the groups it holds): with one group, worst-group accuracy is plain accuracy."""
    split = selection_split_of(shards)
    if split is None:
        raise UserError(f"--select-by worst_group: {shards} has no validation split (val or *val) with samples")
    groups = read_info(location(shards) / split).get("groups", [])
    if len(groups) < 2:
        named = ", ".join(map(repr, groups)) or "none"
        raise UserError(f"--select-by worst_group: {shards}/{split} holds {len(groups)} group(s) ({named}); "
                        f"it needs two or more, else use --select-by accuracy")


def make_model(config: TrainConfig, num_classes: int, env: DistEnv):
    """The model, and the module to call in training (DDP-wrapped when distributed)."""
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    outputs = output_size(num_classes, config.cf_loss)
    model = on_device(build_model(config.arch, outputs, config.pretrained), env.device)
    if not env.distributed:
        return model, model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=device_ids)


def save_epoch(out: Path, state: RunState, checkpoint: dict, is_best: bool) -> None:
    """Checkpoint, best copy, and metrics.jsonl rewritten from the state (so a resumed run's log
    holds each epoch exactly once, whenever the crash came)."""
    save_checkpoint(out / "checkpoints" / "last.pt", checkpoint)
    if is_best:  # copied under a temporary name, then renamed: best.pt is never half-written
        shutil.copyfile(out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt.tmp")
        (out / "checkpoints" / "best.pt.tmp").replace(out / "checkpoints" / "best.pt")
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in state.metrics))
    tmp.replace(out / "metrics.jsonl")


def check_config(config: TrainConfig, info: dict) -> None:
    check_log_options(config)
    if len(info["classes"]) < 2:  # CE is 0 and the CF losses infinite or NaN with one class
        raise UserError(f"{config.shards}/train: {len(info['classes'])} class ({', '.join(info['classes'])}); "
                        f"a classifier needs at least 2")
    if config.resume and config.overwrite:  # with no checkpoint yet, --overwrite would delete the folder
        raise UserError("--resume keeps the run in --out and --overwrite deletes it: choose one")
    if config.cf_online and config.cf != "none" and config.cf not in ONLINE_FILLS:
        raise UserError(
            f"--cf {config.cf} is offline only: drop --cf-online and read it from shards made with "
            f"`cfrobust preprocess --cf {config.cf}` (online fills: {', '.join(ONLINE_FILLS)})"
        )
    if config.cf != "none" and not config.cf_online and config.cf not in info["cf_methods"]:
        have = ", ".join(info["cf_methods"]) or "none"
        raise UserError(
            f"{config.shards}/train: the shards carry no {config.cf!r} counterfactual (they have: {have}); "
            f"re-run `cfrobust preprocess --cf {config.cf}`"
        )
    for field_ in fields(TrainConfig):  # click checks choices on the command line; Python callers too
        choices = field_.metadata.get("choices")
        if choices and getattr(config, field_.name) not in choices:
            raise UserError(f"--{field_.name.replace('_', '-')} {getattr(config, field_.name)!r}: "
                            f"choose one of {', '.join(choices)}")
    for name, ok, rule in OPTION_RULES:
        value = getattr(config, name)
        if not ok(value):
            shown = value if isinstance(value, str) else f"{value:g}"
            raise UserError(f"--{name.replace('_', '-')} {shown}: {rule}")
    if config.reg != "none" and 0 < config.epochs <= config.reg_anneal_epochs():
        raise UserError(f"--reg-anneal {config.reg_anneal} with --epochs {config.epochs}: the saliency weight would "
                        f"never reach --reg-coeff; anneal over fewer epochs than the run has")
    if config.select_by == "worst_group":
        check_worst_group_selection(shard_root(config))
    if config.batch_split > config.batch:
        raise UserError(f"--batch-split {config.batch_split} cuts a batch of {config.batch} into more chunks than images")
    check_augmentation(config, info)
    if config.balance_groups and len(balanced_group_weights(info)) < 2:
        raise UserError(f"--balance-groups: {config.shards}/train records fewer than 2 groups to balance")
    if config.balance_groups and config.mixup > 0:
        raise UserError("--balance-groups weighs each image's own CE; mixup mixes two images: choose one")
    if config.precision == "16":
        check_fp16_saliency(config)


def check_fp16_saliency(config: TrainConfig) -> None:
    """fp16 takes the penalties whose weight gradient the loss scaler brings back finite and
    close to fp32's exact one (tests/test_precision_sal.py): a gradient score's (its input
    gradient is scaled against underflow, trainer/hvp.py) by finite differences. By double
    backpropagation the fp16 gradient overflowed at every loss scale for most penalty and score
    pairs (in a BatchNorm weight's gradient on the test model)."""
    if config.reg == "none":
        return
    if config.reg_grad not in SALIENCY_SCORES:
        raise UserError(f"--precision 16 with --reg-grad {config.reg_grad}: the attribution map is not scaled "
                        f"against fp16 underflow; use --precision bf16 or 32, or a gradient score")
    if config.reg_impl == "exact":
        raise UserError("--precision 16 with --reg and --reg-impl exact: the double backward overflows fp16 at "
                        "every loss scale; use --reg-impl finite-diff, or --precision bf16 or 32")


def check_augmentation(config: TrainConfig, info: dict) -> None:
    stored = info.get("size")
    if config.crop < 0 or config.eval_size < 0:
        raise UserError(f"--crop {config.crop} / --eval-size {config.eval_size}: sides must be 0 (off) or positive pixels")
    if stored and config.crop > stored and not config.crop_scale:
        raise UserError(f"--crop {config.crop}: the shards store {stored}-px images; crop at most {stored} "
                        f"(or resize with --crop-scale)")
    if config.crop_scale and not config.crop:
        raise UserError("--crop-scale sets the area of a random-resized crop: give its output side with --crop")
    augmentation = Augmentation.from_config(config)  # parses --crop-scale and --color-jitter
    if augmentation.scale and not 0 < augmentation.scale[0] <= augmentation.scale[1] <= 1:
        raise UserError(f"--crop-scale {config.crop_scale}: need 0 < MIN <= MAX <= 1 (shares of the image's area)")
    if config.bbox_noise > 0 and reads_masks(config):
        raise UserError("--bbox-noise moves the boxes but not the masks: add --object-region box to study box noise")


# (option, test, what it must be): checked before any work, named with the value in the message.
OPTION_RULES = [
    ("epochs", lambda v: v >= 1, "must be at least 1"),
    ("batch", lambda v: v >= 1, "must be at least 1"),
    ("batch_split", lambda v: v >= 1, "must be at least 1"),
    ("workers", lambda v: v >= 0, "must be 0 (load in this process) or more"),
    ("lr", lambda v: v > 0, "a learning rate must be positive"),
    ("momentum", lambda v: v >= 0, "must be 0 or more"),
    ("weight_decay", lambda v: v >= 0, "must be 0 or more"),
    ("gamma", lambda v: v > 0, "a decay factor must be positive"),
    ("plateau_patience", lambda v: v >= 0, "must be 0 (decay after every epoch without progress) or more epochs"),
    ("eval_batch", lambda v: v >= 0, "must be 0 (twice --batch) or more images"),
    ("clip_grad", lambda v: v >= 0, "a gradient norm cannot be negative (0 turns clipping off)"),
    ("cf_coeff", lambda v: v >= 0, "a loss weight must be 0 or more"),
    ("reg_coeff", lambda v: v >= 0, "a loss weight must be 0 or more"),
    ("reg_every", lambda v: v >= 1, "must be at least 1 (1: the penalty on every step)"),
    ("reg_anneal", lambda v: str(v) == "auto" or str(v).isdigit(), "must be auto or a whole number of epochs (0: no ramp)"),
    ("f_eps", lambda v: v >= 0, "an attack radius must be 0 or more"),
    ("f_alpha", lambda v: v >= 0, "must be 0 (eps / 4) or a positive step"),
    ("f_steps", lambda v: v >= 1, "an attack takes at least 1 step"),
    ("f_erode", lambda v: v in ("auto", "blend", "scaled") or v.isdigit(),
     "must be auto, blend, scaled or a whole number of pixels (0: the mask as it is)"),
    ("f_weight", lambda v: v in ("auto", "replace") or positive_number(v), "must be auto, replace or a number above 0"),
    ("mixup", lambda v: v >= 0, "must be 0 (off) or a positive Beta alpha"),
    ("label_smoothing", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    ("data_ratio", lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    ("box_fraction", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    ("bbox_noise", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    ("save_every", lambda v: v >= 0, "must be 0 (epoch ends only) or more steps"),
]


def positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def resume_point(out: Path, config: TrainConfig, check_existing: bool = True) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run (also with --resume and no
    checkpoint yet, so `torchrun --max-restarts` can always pass --resume). Only rank 0 checks
    for an earlier run: the others may already see the folder rank 0 just made."""
    check_output_folder(out)
    last = out / "checkpoints" / "last.pt"
    if config.resume and last.is_file():
        return last
    if not check_existing or not out.exists() or config.resume or is_failed_start(out):
        return None
    if config.overwrite:
        check_replaceable(out, RUN_FILES, [] if is_url(config.shards) else [Path(config.shards)])
    elif foreign := sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES):
        raise UserError(f"{out} holds {foreign[0]!r}, which is not part of a run; choose another --out")
    elif any(out.iterdir()):
        raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another --out")
    return None


def check_ranks_agree(out: Path, resuming: bool, env: DistEnv) -> None:
    """Every rank resumes, or none: a rank on a node that cannot see the checkpoint would start
    afresh and wait forever for the others. The same error on every rank, so all stop."""
    seen = gather_objects(resuming, env)
    if len(set(seen)) > 1:
        blind = ", ".join(str(rank) for rank, found in enumerate(seen) if not found)
        raise UserError(f"{out / 'checkpoints' / 'last.pt'}: rank(s) {blind} cannot see it; --out must be on a "
                        f"filesystem that every node sees")


def is_failed_start(out: Path) -> bool:
    """A run folder that holds only the config (and the opened TensorBoard log) of a run that
    stopped before its first checkpoint (a bad shard, a bad option): starting again there loses
    nothing."""
    names = {p.name for p in out.iterdir()}
    checkpoints = out / "checkpoints"
    return (bool(names) and names <= {"config.json", "checkpoints", "tensorboard"}
            and not (checkpoints.is_dir() and any(checkpoints.iterdir())))


def prepare_run_folder(out: Path, config: TrainConfig, resuming: bool) -> None:
    if not resuming and out.exists() and config.overwrite:
        remove_folder(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))


def checkpoint_state(model, parts: TrainingParts, info: dict, state: RunState) -> dict:
    """The checkpoint of the run as it stands. Call it on every rank: each rank's augmentation
    generator differs and the checkpoint keeps them all, with the stream's shape."""
    return {
        "model": model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.schedule.state_dict(),
        "scaler": parts.precision.scaler.state_dict() if parts.precision.scaler else {},
        "epoch": state.epoch,
        "step": state.step,
        "state": asdict(state),
        "config": parts.config.to_dict(),
        "classes": list(info["classes"]),
        "rng": {"torch": torch.get_rng_state(), "augment": gather_objects(parts.generator.get_state(), parts.env)},
        "stream": stream_shape(parts),
    }


def stream_shape(parts: TrainingParts) -> dict:
    """What fixes the batches of an epoch: a resumed run must read the same stream to skip the
    batches already done and keep the schedule's length."""
    return {"world_size": parts.env.world_size, "workers": max(1, parts.config.workers)}  # 0 reads as 1 does


def restore(path: Path, model, parts: TrainingParts) -> tuple[RunState, dict]:
    """Load a checkpoint into the run; returns its state and the best weights so far."""
    saved = load_checkpoint(path, map_location="cpu")
    changed = changed_options(recorded_options(saved), parts.config)
    if changed:
        raise UserError(f"{path}: the run was made with other options ({', '.join(changed)}); resume with the same ones")
    state = RunState(**saved["state"])
    if state.epoch < parts.config.epochs:  # a finished run reads no more batches
        check_same_stream(path, saved.get("stream"), stream_shape(parts))
    model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.schedule.load_state_dict(saved["scheduler"])
    if parts.precision.scaler and saved["scaler"]:
        parts.precision.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"]["torch"])
    augment = saved["rng"]["augment"]  # one state per rank (a single one before they were gathered)
    parts.generator.set_state(augment[parts.env.rank] if isinstance(augment, list) else augment)
    best_path = path.with_name("best.pt")
    best = load_checkpoint(best_path)["model"] if best_path.is_file() else copy.deepcopy(model.state_dict())
    return state, best


def recorded_options(checkpoint: dict) -> dict:
    """A checkpoint's options with --f-partner, --f-weight and --f-erode auto as they resolve for its classes:
    runs made before the pairing was resolved at the start recorded "auto" (then K - 1 under
    other-class partners), which compares equal to what a resumption resolves it to."""
    recorded = TrainConfig.from_dict(checkpoint["config"])
    return recorded.with_factual_pairing(len(checkpoint["classes"])).to_dict()


def changed_options(saved: dict, config: TrainConfig) -> list[str]:
    """The options, beyond RESUMABLE, whose value differs from the checkpoint's. An option that
    a checkpoint predates counts as saved with its default, or with what runs did before it
    existed where that differs (PREDATED: a run made before --object-region used rectangles)."""
    now, defaults = config.to_dict(), {**TrainConfig().to_dict(), **PREDATED}
    return sorted(k for k in now.keys() | saved.keys() if k not in RESUMABLE and now.get(k) != saved.get(k, defaults.get(k)))


def check_same_stream(path: Path, saved: dict | None, now: dict) -> None:
    if saved is not None and saved != now:
        raise UserError(
            f"{path}: the run read its shards as {saved['world_size']} process(es) x {saved['workers']} loader worker(s); "
            f"resume it with the same (now {now['world_size']} x {now['workers']}): the batches of an epoch depend on both"
        )


# Options that may differ between a run and its resumption: where and how it reports and loads.
# (--workers is further held to the stream shape of an unfinished run: check_same_stream.)
RESUMABLE = {"resume", "overwrite", "cache_dir", "workers", "device", "save_every", "tensorboard", "quiet"}

