"""Train the CAGAN inpainter (DeepFill v1) on shards, to fill object holes in `preprocess --cf cagan`.

    cfrobust cagan train --shards S --out cagan.pt
    torchrun --nproc_per_node=8 -m cfrobust cagan train --shards S --out cagan.pt

The recipe of the official v1 code (JiahuiYu/generative_inpainting, `inpaint_model.py` and
`inpaint.yml`): a rectangular hole per image, here always in the background (holes.py); losses
on both generator stages: spatially discounted L1 in the hole + L1 outside it, each weighted 1.2
(and the coarse stage's terms by 1.2 again); WGAN-GP with a global and a local critic (critics.py),
adversarial weight 0.001, gradient penalty 10 on the hole's pixels, 5 critic updates per
generator update, each on a fresh batch; Adam lr 1e-4, betas (0.5, 0.9) for both players.
`--pretrain-steps` first trains on the L1 terms alone, without the critics.

One step = one generator update (after its critic updates). Under torchrun every process trains
on its own slice of the shards; rank 0 alone writes OUT, OUT.state and the OUT.samples/ grids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cfrobust.distributed import DistEnv, barrier, setup_distributed, teardown_distributed
from cfrobust.errors import UserError
from cfrobust.files import save_torch_atomically
from cfrobust.preprocess.cagan.critics import (
    Critics,
    crop_patches,
    discount_weights,
    gradient_penalty,
    hole_l1,
    hole_masks,
    known_l1,
    weighted_mean,
)
from cfrobust.preprocess.cagan.holes import local_patch_origin, sample_holes
from cfrobust.preprocess.cagan.network import Generator
from cfrobust.shards.reader import EvalShards, TrainShards, make_loader, split_info
from cfrobust.shards.remote import RemoteOutput, is_url, location

# Loss weights of the official inpaint.yml (v1); fixed, as they are in the paper's runs.
COARSE_L1_ALPHA = 1.2  # extra weight of the coarse stage's L1 terms
L1_LOSS_ALPHA = 1.2  # spatially discounted L1 in the hole
AE_LOSS_ALPHA = 1.2  # L1 outside the hole
GAN_LOSS_ALPHA = 0.001  # adversarial term of the generator
GLOBAL_WGAN_LOSS_ALPHA = 1.0  # global critic's share of it (the local critic's is 1)
WGAN_GP_LAMBDA = 10.0  # gradient penalty
BETAS = (0.5, 0.9)
PROGRESS_EVERY = 10  # steps between progress-bar updates (each reads values off the device)
PREVIEW_IMAGES = 8  # rows of the sample grids


@dataclass
class CaganConfig:
    """`cfrobust cagan train` options (the CLI documents each one)."""

    shards: str
    out: str
    split: str = "train"
    steps: int = 100_000
    batch: int = 16
    lr: float = 1e-4
    cnum: int = 32
    critic_steps: int = 5
    pretrain_steps: int = 0
    gamma: float = 0.99
    sample_every: int = 1000
    save_every: int = 1000
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    precision: str = "auto"
    init: str = ""
    cache_dir: str = ""  # with a URL --shards: where each shard is kept once its sha256 matches

    def to_dict(self) -> dict:
        return asdict(self)


# May differ between a run and its --resume; everything else must match to continue exactly.
RESUMABLE = {"out", "steps", "sample_every", "save_every", "resume", "device", "init", "cache_dir"}


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def samples_dir(out: Path) -> Path:
    return out.with_suffix(".samples")


@dataclass
class Progress:
    step: int = 0  # generator updates done
    batches: int = 0  # batches this process has read (the data stream's position)


class Models:
    """The two players, their optimizers, and the modules to call in training (DDP-wrapped when
    distributed). `generator` and `critics` are always the bare modules."""

    def __init__(self, config: CaganConfig, size: tuple[int, int], env: DistEnv):
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.generator = Generator(cnum=config.cnum).to(env.device)
        self.critics = Critics(*size).to(env.device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=BETAS)
        self.opt_d = torch.optim.Adam(self.critics.parameters(), lr=config.lr, betas=BETAS)
        self.train_g, self.train_d = self.generator, self.critics
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_g = DistributedDataParallel(self.generator, device_ids=ids)
            self.train_d = DistributedDataParallel(self.critics, device_ids=ids)

    def state(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "critics": self.critics.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load(self, saved: dict) -> None:
        self.generator.load_state_dict(saved["generator"])
        self.critics.load_state_dict(saved["critics"])
        self.opt_g.load_state_dict(saved["opt_g"])
        self.opt_d.load_state_dict(saved["opt_d"])


@dataclass
class Holes:
    """A batch ready for a training step: images in [-1, 1] and their holes."""

    images: torch.Tensor  # [N, 3, H, W]
    mask: torch.Tensor  # [N, 1, H, W], 1 in the hole
    weights: torch.Tensor  # [N, 1, H, W], spatial discount inside the hole, 0 outside
    origins: torch.Tensor  # [N, 2], (x, y) of each local-critic patch
    kept: torch.Tensor  # [N], 1 for images with a hole (0: the object left no room for one)
    alphas: torch.Tensor  # [2, N, 1, 1, 1], interpolation weights for the local and global penalty


def make_holes(batch, config: CaganConfig, patch: tuple[int, int], rng: np.random.Generator, device) -> Holes:
    """Sample background holes for a shard batch (uint8 images, boxes) and move it to the device."""
    count, _, height, width = batch.images.shape
    holes, kept = sample_holes(batch.boxes.numpy(), batch.box_valid.numpy(), height, width, rng)
    origins = local_patch_origin(holes, *patch, height, width)
    alphas = rng.random((2, count, 1, 1, 1), dtype=np.float32)
    holes_t = torch.from_numpy(holes).to(device)
    mask = hole_masks(holes_t, height, width)
    longest = int(np.max(np.maximum(holes[:, 2] - holes[:, 0], holes[:, 3] - holes[:, 1]), initial=0))
    # The loader's pixels are channels-last in memory; the inpainter's layers expect the default.
    images = batch.images.to(device, non_blocking=True).to(torch.float32, memory_format=torch.contiguous_format)
    images = images / 127.5 - 1.0
    return Holes(
        images=images,
        mask=mask,
        weights=discount_weights(mask, config.gamma, max_distance=longest),
        origins=torch.from_numpy(origins).to(device),
        kept=torch.from_numpy(kept.astype(np.float32)).to(device),
        alphas=torch.from_numpy(alphas).to(device),
    )


class BatchStream:
    """Endless training batches, epoch after epoch; starts `consumed` batches in, so a resumed run
    reads exactly the batches the interrupted one would have read next."""

    def __init__(self, data: TrainShards, workers: int, consumed: int, pin_memory: bool):
        self.data = data
        self.loader = make_loader(data, workers, pin_memory=pin_memory)
        self.epoch, skip = divmod(consumed, len(data))
        self._start(skip)

    def _start(self, skip: int) -> None:
        self.data.set_epoch(self.epoch)
        self.iterator = iter(self.loader)
        for _ in range(skip):
            next(self.iterator)

    def next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self._start(0)
            return next(self.iterator)


class Trainer:
    """One training step at a time: critic updates on fresh batches, then a generator update."""

    def __init__(self, config: CaganConfig, models: Models, stream: BatchStream, env: DistEnv, progress: Progress):
        self.config, self.models, self.stream, self.env, self.progress = config, models, stream, env, progress
        self.patch = models.critics.patch_size
        use_bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

    def autocast(self):
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled)

    def next_holes(self, step: int, index: int) -> Holes:
        batch = self.stream.next()
        self.progress.batches += 1
        # Hole randomness is a function of (seed, rank, step, index): nothing to save for --resume.
        rng = np.random.default_rng([self.config.seed, self.env.rank, step, index])
        return make_holes(batch, self.config, self.patch, rng, self.env.device)

    def step(self) -> dict[str, torch.Tensor]:
        step, config = self.progress.step, self.config
        adversarial = step >= config.pretrain_steps
        terms = {}
        if adversarial:
            for index in range(config.critic_steps):
                terms.update(self.critic_step(self.next_holes(step, index)))
        terms.update(self.generator_step(self.next_holes(step, config.critic_steps), adversarial))
        self.progress.step += 1
        return terms

    def critic_step(self, h: Holes) -> dict[str, torch.Tensor]:
        models = self.models
        with torch.no_grad(), self.autocast():
            _, refined = models.generator(h.images, h.mask)
        fake = refined.float() * h.mask + h.images * (1 - h.mask)
        real_p, fake_p = crop_patches(h.images, h.origins, self.patch), crop_patches(fake, h.origins, self.patch)
        mask_p = crop_patches(h.mask, h.origins, self.patch)
        mixed_p = (real_p + h.alphas[0] * (fake_p - real_p)).requires_grad_(True)
        mixed = (h.images + h.alphas[1] * (fake - h.images)).requires_grad_(True)
        with self.autocast():  # one critic call for real, fake and interpolates (one DDP forward)
            local, whole = models.train_d(torch.cat([real_p, fake_p, mixed_p]), torch.cat([h.images, fake, mixed]))
        real_l, fake_l, mixed_l = local.float().chunk(3)
        real_g, fake_g, mixed_g = whole.float().chunk(3)
        wasserstein = weighted_mean(fake_l - real_l, h.kept) + weighted_mean(fake_g - real_g, h.kept)
        penalty = weighted_mean(gradient_penalty(mixed_l, mixed_p, mask_p), h.kept) + weighted_mean(
            gradient_penalty(mixed_g, mixed, h.mask), h.kept
        )
        models.opt_d.zero_grad(set_to_none=True)
        (wasserstein + WGAN_GP_LAMBDA * penalty).backward()
        models.opt_d.step()
        return {"d": wasserstein.detach(), "gp": penalty.detach()}

    def generator_step(self, h: Holes, adversarial: bool) -> dict[str, torch.Tensor]:
        models = self.models
        with self.autocast():
            coarse, refined = models.train_g(h.images, h.mask)
        coarse, refined = coarse.float(), refined.float()
        l1 = COARSE_L1_ALPHA * hole_l1(coarse, h.images, h.weights, h.mask) + hole_l1(refined, h.images, h.weights, h.mask)
        ae = COARSE_L1_ALPHA * known_l1(coarse, h.images, h.mask) + known_l1(refined, h.images, h.mask)
        loss = L1_LOSS_ALPHA * l1 + AE_LOSS_ALPHA * ae
        terms = {"l1": l1.detach(), "ae": ae.detach()}
        if adversarial:
            fake = refined * h.mask + h.images * (1 - h.mask)
            # The bare critics, frozen: their gradients are not wanted, nor a DDP all-reduce of them.
            models.critics.requires_grad_(False)
            with self.autocast():
                local, whole = models.critics(crop_patches(fake, h.origins, self.patch), fake)
            models.critics.requires_grad_(True)
            gan = -weighted_mean(local, h.kept) - GLOBAL_WGAN_LOSS_ALPHA * weighted_mean(whole, h.kept)
            loss = loss + GAN_LOSS_ALPHA * gan
            terms["g"] = gan.detach()
        models.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        models.opt_g.step()
        return terms


def train_cagan(config: CaganConfig) -> Progress:
    """Run the whole job (one process, or one rank under torchrun); returns where it ended."""
    env = setup_distributed(config.device)
    try:
        return train_in(env, config)
    finally:
        teardown_distributed()


def train_in(env: DistEnv, config: CaganConfig) -> Progress:
    check_options(config)
    split_dir = location(config.shards, config.cache_dir or None) / config.split  # a folder or a URL
    size = image_size(split_dir)
    remote = remote_out(config)
    out = remote.local(location(config.out).name) if remote else Path(config.out)
    try:
        return train_to(env, config, split_dir, size, out, remote)
    except UserError as exc:
        if remote is None:
            raise
        raise UserError(str(exc).replace(str(remote.staging), str(remote.root))) from None  # name the URL
    finally:
        if remote is not None:
            remote.close()


def remote_out(config: CaganConfig) -> RemoteOutput | None:
    """For a URL --out: a staging folder holding what the URL already has of this job (weights,
    training state), so that --resume and the checks against overwriting work as for a file."""
    if not is_url(config.out):
        return None
    remote = RemoteOutput(location(config.out).parent)
    name = location(config.out).name
    for relative in (name, state_path(Path(name)).name):
        remote.pull(relative)
    return remote


def train_to(env: DistEnv, config: CaganConfig, split_dir, size, out: Path, remote: RemoteOutput | None) -> Progress:
    """The training loop, writing to `out` (uploading each finished file when --out is a URL)."""
    publish = remote.publish if remote is not None and env.is_main else (lambda path: None)
    saved = resume_point(out, config, env)
    models = Models(config, size, env)
    progress = Progress()
    if saved is not None:
        models.load(saved)
        progress = Progress(saved["step"], saved["batches"])
        torch.set_rng_state(saved["rng"]["torch"])
    elif config.init:
        load_init(models.generator, config)
    data = TrainShards(split_dir, config.batch, [], config.seed, env.rank, env.world_size, config.workers)
    stream = BatchStream(data, data.workers, progress.batches, pin_memory=env.device.type == "cuda")  # --workers, or fewer
    trainer = Trainer(config, models, stream, env, progress)
    preview = preview_holes(split_dir, config, models.critics.patch_size, env) if env.is_main and config.sample_every else None
    bar = tqdm(total=config.steps, initial=progress.step, unit="step", desc="cagan", disable=None if env.is_main else True,
               dynamic_ncols=True)
    while progress.step < config.steps:
        terms = trainer.step()
        bar.update(1)
        step = progress.step
        if env.is_main and (step % PROGRESS_EVERY == 0 or step == config.steps):
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in terms.items()})
        if env.is_main and preview is not None and step % config.sample_every == 0:
            write_samples(samples_dir(out) / f"step-{step:06d}.png", models.generator, preview, trainer)
            publish(samples_dir(out) / f"step-{step:06d}.png")
        if env.is_main and config.save_every and step % config.save_every == 0 and step < config.steps:
            save_state(out, models, progress, config, env)
            publish(state_path(out))
    bar.close()
    if env.is_main:
        save_state(out, models, progress, config, env)
        publish(state_path(out))
        write_weights(out, models.generator, config, size, progress, env)
        publish(out)
    barrier(env)
    return progress


def check_options(config: CaganConfig) -> None:
    if config.steps < 0 or config.pretrain_steps < 0 or config.sample_every < 0 or config.save_every < 0:
        raise UserError("--steps, --pretrain-steps, --sample-every and --save-every must not be negative")
    if config.batch < 1 or config.critic_steps < 1 or config.cnum < 1:
        raise UserError("--batch, --critic-steps and --cnum must be at least 1")
    if not 0 < config.gamma <= 1:
        raise UserError(f"--gamma must lie in (0, 1], got {config.gamma}")
    if config.precision not in ("auto", "32", "bf16"):
        raise UserError(f"--precision must be auto, 32 or bf16, got {config.precision!r}")


def image_size(split_dir: Path) -> tuple[int, int]:
    """The stored image size of a split, checked against what the generator accepts."""
    info = split_info(split_dir)
    size = info.get("size")
    if not isinstance(size, int) or size <= 0:
        raise UserError(f"{split_dir}: the manifest gives no image size; re-run `cfrobust preprocess`")
    if size % 8:
        raise UserError(
            f"{split_dir}: images are stored at {size}x{size}, but CAGAN needs a multiple of 8; "
            f"re-run `cfrobust preprocess --size {-(-size // 8) * 8}`"
        )
    return size, size


def resume_point(out: Path, config: CaganConfig, env: DistEnv) -> dict | None:
    """The saved training state to continue from, or None for a fresh run (also with --resume and
    nothing saved yet, so `torchrun --max-restarts` may always pass --resume). Only rank 0 checks
    for earlier output: the other ranks may already see what rank 0 has just written."""
    path = state_path(out)
    if config.resume and path.is_file():
        saved = load_state(path)
        changed = sorted(k for k, v in saved["config"].items() if k not in RESUMABLE and config.to_dict().get(k) != v)
        if changed:
            raise UserError(f"{path}: the run was made with other options ({', '.join(changed)}); resume with the same ones")
        if saved["world_size"] != env.world_size:
            raise UserError(f"{path}: the run used {saved['world_size']} process(es), not {env.world_size}; resume with as many")
        return saved
    if env.is_main:
        if config.resume and out.exists():
            raise UserError(f"{out} exists but {path.name} does not: there is no training state to resume")
        for existing in (out, path):
            if existing.exists():
                raise UserError(f"{existing} already exists; pass --resume to continue that training, or choose another --out")
    return None


def load_state(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: not a readable CAGAN training state ({type(exc).__name__}: {reason})") from None
    if not isinstance(saved, dict) or {"generator", "critics", "config", "step"} - set(saved):
        raise UserError(f"{path}: not a CAGAN training state")
    return saved


def save_state(out: Path, models: Models, progress: Progress, config: CaganConfig, env: DistEnv) -> None:
    """Everything --resume needs, written to a temporary name and renamed (never a torn file)."""
    state = {
        **models.state(),
        "step": progress.step,
        "batches": progress.batches,
        "config": config.to_dict(),
        "world_size": env.world_size,
        "rng": {"torch": torch.get_rng_state()},
    }
    save_torch_atomically(state, state_path(out))


def write_weights(out: Path, generator: Generator, config: CaganConfig, size, progress: Progress, env: DistEnv) -> None:
    from cfrobust.preprocess.cagan.weights import save_weights

    meta = {
        "source": "cfrobust cagan train",
        "shards": str(config.shards),
        "split": config.split,
        "steps": progress.step,
        "cnum": config.cnum,
        "image_size": size[0],
        "batch": config.batch,
        "processes": env.world_size,
        "seed": config.seed,
        "pretrain_steps": config.pretrain_steps,
        "critic_steps": config.critic_steps,
        "gamma": config.gamma,
        "init": config.init,
    }
    save_weights(out, generator, meta=meta)  # atomic: a temporary name, then a rename


def load_init(generator: Generator, config: CaganConfig) -> None:
    """Start from other weights: a cfrobust .pt (`cagan train`/`cagan import`) or a released
    TensorFlow checkpoint (a folder with a `checkpoint` file, or a checkpoint prefix)."""
    path = Path(config.init)
    if not path.is_file() or path.suffix in (".index", ".meta") or ".data-" in path.name:
        from cfrobust.preprocess.cagan.tf_checkpoint import read_tf_checkpoint
        from cfrobust.preprocess.cagan.weights import generator_state_from_tf

        cnum, state = generator_state_from_tf(read_tf_checkpoint(path))
    elif path.is_file():
        from cfrobust.preprocess.cagan.weights import load_generator

        loaded = load_generator(path, device="cpu")
        cnum, state = loaded.cnum, loaded.state_dict()
    if cnum != config.cnum:
        raise UserError(f"--init {path} holds a generator with cnum {cnum}; pass --cnum {cnum} to fine-tune it")
    generator.load_state_dict(state)


def preview_holes(split_dir: Path, config: CaganConfig, patch, env: DistEnv) -> Holes:
    """A fixed batch with fixed holes for the sample grids: the first images of the validation
    split when there is one, else of the training split."""
    val = split_dir.parent / "val"
    source = val if split_dir.name == "train" and (val / "_info.json").is_file() else split_dir
    batch = next(iter(EvalShards(source, PREVIEW_IMAGES)))
    return make_holes(batch, config, patch, np.random.default_rng([config.seed, 2**31]), env.device)


@torch.no_grad()
def write_samples(path: Path, generator: Generator, h: Holes, trainer: Trainer) -> None:
    """One row per preview image: input with the hole (white) | coarse | refined | original."""
    was_training = generator.training
    generator.eval()
    with trainer.autocast():
        coarse, refined = generator(h.images, h.mask)
    generator.train(was_training)
    paste = lambda x: x.float() * h.mask + h.images * (1 - h.mask)  # noqa: E731
    columns = [h.images * (1 - h.mask) + h.mask, paste(coarse), paste(refined), h.images]
    grid = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)  # [3, N*H, 4*W]
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels[:, :, ::-1])):
        raise UserError(f"{path}: could not write the sample grid")

