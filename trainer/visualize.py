"""Picture grids of what training sees (the library side of `cfrobust show`): per sample the
original, its boxes, the stored counterfactuals, the factuals and, given a checkpoint, saliency.
"""

# Factual columns come from the trainer's own functions (trainer/factual.py) applied to the shown
# samples as one batch, exactly as Objective does for the boxed samples of a training batch, so
# the picture is what the model is trained on. Image tiles hold the pixels as decoded from the
# shards (small images enlarged by whole-pixel repetition), so they can be compared exactly.

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from cfrobust.distributed import choose_device
from cfrobust.errors import UserError
from cfrobust.shards.manifest import list_splits
from cfrobust.shards.reader import Batch, collate, decode_sample, split_info
from cfrobust.shards.remote import location, with_sha256
from cfrobust.shards.tarstream import iter_tar_samples
from cfrobust.trainer.attributions import grad_cam
from cfrobust.trainer.checkpoint import load_classifier
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.counterfactual import class_logits
from cfrobust.trainer.evaluate import model_inputs
from cfrobust.trainer.factual import FACTUAL_MODES, pasted_region
from cfrobust.trainer.fills import pixel_units
from cfrobust.trainer.models import on_device
from cfrobust.trainer.pixels import box_masks, normalize, using_normalization
from cfrobust.trainer.saliency import input_gradient, target_logit

MIN_TILE = 96  # smaller stored images are enlarged by a whole factor so the picture stays legible
MAX_TILE = 256  # larger ones are shrunk to fit
HEADER = 24  # height of the title row
MODEL_FREE_MODES = ("random", "shuffle", "mrand")  # fgsm/pgd attack a model: only with a checkpoint
SALIENCY_TITLES = ("input grad", "integ. grads", "grad-cam")
IG_STEPS = 32  # integrated-gradients path steps: smooth enough for a picture, cheap on a CPU
IG_BATCH = 128  # path images per forward pass (few large passes, not IG_STEPS small ones)
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, YELLOW, GREEN, RED = (255, 255, 255), (255, 220, 0), (80, 220, 80), (255, 90, 90)


@dataclass
class Grid:
    """The drawn grid (RGB) and where its tiles lie: a header row, then one row per sample."""

    image: np.ndarray
    titles: list[str]
    keys: list[str]  # the sample of each row
    tile: tuple[int, int]  # (height, width) of every tile
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. n was capped)
    header: int = HEADER

    def tile_at(self, row: int, column: int) -> np.ndarray:
        height, width = self.tile
        top = self.header + row * height
        return self.image[top : top + height, column * width : (column + 1) * width]


@dataclass
class ShownModel:
    """A checkpoint's model, ready for predictions and attributions on the shown samples."""

    model: torch.nn.Module
    config: TrainConfig
    classes: list[str]


def render_grid(
    shards,
    split: str = "train",
    count: int = 16,
    seed: int = 0,
    factual_modes: list[str] | None = None,
    checkpoint=None,
    device: str = "auto",
) -> Grid:
    """The grid for `count` seeded random samples of a split. `factual_modes` None: every mode
    that can run (fgsm/pgd only with a checkpoint)."""
    modes = check_modes(factual_modes, checkpoint is not None)
    torch_device = choose_device(device, 0)
    samples, info, notes = choose_samples(shards, split, count, seed)
    shown = load_model(checkpoint, info["classes"], torch_device) if checkpoint else None
    with using_normalization(shown.config.normalize if shown else "imagenet"):  # the run's, for its model
        columns, shape = grid_columns(samples, info, modes, seed, shown, torch_device, notes)
    return Grid(assemble(columns, shape), list(columns), [s["key"] for s in samples], shape, notes)


def grid_columns(samples, info, modes, seed, shown, torch_device, notes) -> tuple[dict, tuple[int, int]]:
    """Column title -> one tile per sample, and the tiles' shape."""
    # The factual columns keep the object region training used: the mask unless the run said box.
    by_mask = shown is None or shown.config.object_region == "mask"
    batch = collate(samples, masks=by_mask).to(torch_device)
    if not bool(batch.box_valid.any()):
        notes.append("no shown sample has a box: the factual columns equal the originals")
    shape = tile_shape(*batch.images.shape[2:])
    predictions = zip(*predict(shown, batch)) if shown is not None else [None] * len(samples)
    columns = {"sample": [label_tile(s, info["classes"], shape, p) for s, p in zip(samples, predictions)]}
    columns["original"] = [to_tile(s["image"], shape) for s in samples]
    columns["boxes"] = [boxes_tile(s, shape) for s in samples]
    for method in info["cf_methods"]:
        columns[f"cf_{method}"] = [to_tile(s["cf"][method], shape) for s in samples]
    for mode, images in factual_images(batch, modes, seed, shown, len(info["classes"])).items():
        columns[f"F {mode}"] = [to_tile(image, shape) for image in images]
    if shown is not None:
        for title, heats in zip(SALIENCY_TITLES, saliency_maps(shown, batch)):
            columns[title] = [heat_tile(s["image"], heat, shape) for s, heat in zip(samples, heats)]
    return columns, shape


def write_png(path, image: np.ndarray) -> Path:
    """Write an RGB image as PNG (whatever the file name says), creating the folder."""
    path = Path(path)
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UserError(f"{path}: the picture could not be encoded as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return path


# --- which samples -------------------------------------------------------------------------


def choose_samples(shards, split: str, count: int, seed: int) -> tuple[list[dict], dict, list[str]]:
    """`count` samples of the split drawn with `seed` (all of them when it holds fewer), in
    manifest order, with the manifest and notes for the user."""
    root = location(shards)  # a folder or a URL
    available = list_splits(root)
    if split not in available:
        raise UserError(f"{root}: no split {split!r} (found: {', '.join(available)})")
    if count < 1:
        raise UserError(f"-n must be at least 1, got {count}")
    info = split_info(root / split)
    total = info["num_samples"]
    if total == 0:
        raise UserError(f"{root / split}: the split holds no samples")
    notes = []
    if count > total:
        notes.append(f"{split} holds {total} samples, fewer than -n {count}: showing all of them")
        count = total
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    return read_samples_at(root / split, info, set(chosen.tolist())), info, notes


def read_samples_at(split_dir: Path, info: dict, indices: set[int]) -> list[dict]:
    """Decode the samples at these positions (manifest order); only the shards holding one are read."""
    samples, first = [], 0
    for shard in info["shards"]:
        mine = {i - first for i in indices if first <= i < first + shard["num_samples"]}
        first += shard["num_samples"]
        if not mine:
            continue
        for position, raw in enumerate(iter_tar_samples(with_sha256(split_dir / shard["name"], shard.get("sha256")))):
            if position in mine:
                samples.append(decode_sample(raw, info["cf_methods"]))  # with its mask, if stored
            if position >= max(mine):
                break
    return samples


def check_modes(modes: list[str] | None, have_model: bool) -> list[str]:
    if modes is None:
        return list(FACTUAL_MODES) if have_model else list(MODEL_FREE_MODES)
    unknown = [m for m in modes if m not in FACTUAL_MODES]
    if unknown:
        raise UserError(f"unknown factual mode {unknown[0]!r}; choose from {', '.join(FACTUAL_MODES)}")
    attacks = [m for m in modes if m not in MODEL_FREE_MODES]
    if attacks and not have_model:
        raise UserError(f"--f {attacks[0]} attacks a model: pass --checkpoint, or choose from {', '.join(MODEL_FREE_MODES)}")
    return list(dict.fromkeys(modes))


# --- what the model does -------------------------------------------------------------------


def load_model(checkpoint, shard_classes: list[str], device: torch.device) -> ShownModel:
    """The checkpoint's weights in its architecture, in eval mode, checked against the shards' classes."""
    model, config, classes = load_classifier(checkpoint)
    if classes != list(shard_classes):  # logit k must be the shards' class k
        raise UserError(f"{checkpoint}: trained on classes {classes}, but the shards have {list(shard_classes)}")
    return ShownModel(on_device(model, device).eval(), TrainConfig.from_dict(config), classes)


def predict(shown: ShownModel, batch: Batch) -> tuple[list[str], list[float]]:
    """Predicted class name and its softmax probability per sample."""
    with torch.no_grad():
        inputs = model_inputs(batch.images, shown.config.eval_side())  # as eval.json scored it
        probs = class_logits(shown.model(inputs), shown.config.cf_loss).float().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    return [shown.classes[i] for i in predicted.tolist()], confidence.tolist()


def saliency_maps(shown: ShownModel, batch: Batch) -> list[np.ndarray]:
    """[N, H, W] maps >= 0 for the true label, in SALIENCY_TITLES order: |input gradient| and
    |integrated gradients| summed over channels, and Grad-CAM less its minimum per image. The
    label, not the prediction, so the maps show what the saliency penalty of training sees; and
    Grad-CAM without the usual ReLU, as the penalty takes it (a young model's map is often
    negative everywhere, which a ReLU would blank)."""
    from captum.attr import IntegratedGradients  # captum imports matplotlib: only when asked for

    model, cf_loss = shown.model, shown.config.cf_loss
    x, y = normalize(batch.images), batch.labels
    with torch.enable_grad():
        inputs = x.clone().requires_grad_(True)
        gradient = input_gradient(class_logits(model(inputs), cf_loss), inputs, y, target_logit)
        integrated = IntegratedGradients(lambda images: class_logits(model(images), cf_loss)).attribute(
            x, baselines=torch.zeros_like(x), target=y, n_steps=IG_STEPS, internal_batch_size=max(len(x), IG_BATCH)
        )
    cam = grad_cam(model, x, y)
    cam = cam[:, 0] - cam.flatten(1).min(dim=1).values[:, None, None]
    maps = [gradient.abs().sum(dim=1), integrated.abs().sum(dim=1), cam]
    return [m.detach().float().cpu().numpy() for m in maps]


def factual_images(batch: Batch, modes: list[str], seed: int, shown: ShownModel | None,
                   num_classes: int) -> dict[str, np.ndarray]:
    """mode -> [N, H, W, 3] uint8: each F mode applied to the boxed samples as one batch, as in
    training (the checkpoint's run's factual options, else the trainer's defaults); samples
    without a box stay as they are (they train as ERM)."""
    x = normalize(batch.images)
    holes = box_masks(batch.boxes, batch.box_valid, x.shape[2], x.shape[3])
    model, config = (shown.model, shown.config) if shown else (None, TrainConfig())
    config = config.with_factual_pairing(num_classes)
    region = pasted_region(holes if batch.masks is None else batch.masks, holes, x, config)
    boxed = batch.box_valid.any(dim=1)
    out = {}
    for index, mode in enumerate(modes):
        generator = torch.Generator(x.device).manual_seed(seed * 1000 + index)
        made = x.clone()
        if bool(boxed.any()):
            made[boxed] = FACTUAL_MODES[mode](x[boxed], region[boxed], batch.labels[boxed], generator, model=model,
                                              config=config, rects=holes[boxed])
        out[mode] = to_uint8(made)
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised [N, 3, H, W] -> uint8 [N, H, W, 3]; an image that came from uint8 comes back exactly."""
    pixels = (pixel_units(x.detach().float()) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


# --- drawing ------------------------------------------------------------------------------


def tile_shape(height: int, width: int) -> tuple[int, int]:
    """Tile size for stored images of this size: as stored, enlarged by a whole factor up to
    MIN_TILE, or shrunk to fit MAX_TILE."""
    side = max(height, width)
    if side < MIN_TILE:
        factor = math.ceil(MIN_TILE / side)
        return height * factor, width * factor
    if side > MAX_TILE:
        scale = MAX_TILE / side
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def to_tile(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Whole-factor enlargement repeats pixels (so tiles compare exactly with the stored images);
    anything else is an area resize."""
    height, width = image.shape[:2]
    if (height, width) == shape:
        return image
    if shape[0] % height == 0 and shape[1] % width == 0 and shape[0] // height == shape[1] // width:
        factor = shape[0] // height
        return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def boxes_tile(sample: dict, shape: tuple[int, int]) -> np.ndarray:
    """The image with the stored mask tinted green (when there is one) and the boxes outlined:
    training removes and keeps the box rectangles, not the mask."""
    tile = to_tile(sample["image"], shape).copy()
    if sample.get("mask") is not None:
        mask = to_tile(sample["mask"].astype(np.uint8), shape) > 0
        tile[mask] = (0.5 * tile[mask] + 0.5 * np.array(GREEN)).astype(np.uint8)
    height, width = sample["image"].shape[:2]
    sy, sx = shape[0] / height, shape[1] / width
    for x0, y0, x1, y1 in sample["boxes"]:
        corner0 = (math.floor(x0 * sx), math.floor(y0 * sy))
        corner1 = (math.ceil(x1 * sx) - 1, math.ceil(y1 * sy) - 1)
        cv2.rectangle(tile, corner0, corner1, YELLOW, 1)
    if not sample["boxes"]:
        write(tile, "no box (ERM)", (3, shape[0] - 5), shape[1] - 6, YELLOW)
    return tile


def heat_tile(image: np.ndarray, heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The map scaled to [0, 1] by its own maximum, coloured (blue low, red high) and blended 50/50
    over the image."""
    top = float(heat.max())
    scaled = heat / top if top > 0 else np.zeros_like(heat)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image, 0.5, colours, 0.5, 0)
    return to_tile(blended, shape)


def label_tile(sample: dict, classes: list[str], shape: tuple[int, int], prediction=None) -> np.ndarray:
    """Dark tile naming the sample, its label and group, and the prediction (green if right)."""
    height, width = shape
    tile = np.full((height, width, 3), 32, np.uint8)
    lines = [(sample["key"], WHITE), (f"y: {classes[sample['label']]}", WHITE), (sample["group"], WHITE)]
    if prediction is not None:
        name, confidence = prediction
        colour = GREEN if name == classes[sample["label"]] else RED
        lines += [(f"pred: {name}", colour), (f"p = {confidence:.2f}", colour)]
    step = max(12, height // (len(lines) + 1))
    for i, (text, colour) in enumerate(lines):
        write(tile, text, (4, min(height - 4, step * (i + 1))), width - 8, colour)
    return tile


def header_row(titles: list[str], width: int) -> np.ndarray:
    row = np.zeros((HEADER, width * len(titles), 3), np.uint8)
    for i, title in enumerate(titles):
        write(row, title, (i * width + 4, HEADER - 8), width - 8, WHITE)
    return row


def assemble(columns: dict[str, list[np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    rows = [np.concatenate(tiles, axis=1) for tiles in zip(*columns.values())]
    return np.concatenate([header_row(list(columns), shape[1])] + rows, axis=0)


def write(canvas: np.ndarray, text: str, origin: tuple[int, int], room: int, colour) -> None:
    """cv2.putText at the largest scale (up to 0.45) that fits `room` pixels; cut if even the
    smallest does not."""
    for scale in (0.45, 0.4, 0.35, 0.3):
        if cv2.getTextSize(text, FONT, scale, 1)[0][0] <= room:
            break
    while len(text) > 1 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > room:
        text = text[:-2] + "~"
    cv2.putText(canvas, text, origin, FONT, scale, colour, 1, cv2.LINE_AA)
