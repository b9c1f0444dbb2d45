"""Classifiers by name (a small CNN, torchvision ResNets, BiT-S-R50x1) and their initial weights.

`--pretrained` is torchvision's ImageNet weights, a state-dict .pt file or an official BiT .npz.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from cfrobust.errors import UserError
from cfrobust.trainer.pixels import model_memory_format

log = logging.getLogger(__name__)
RESNETS = ("resnet18", "resnet34", "resnet50")


def simple_cnn(num_classes: int) -> nn.Module:
    """Eight conv blocks and global pooling: trains in minutes on 2 CPU cores at 64 px.

    Depth for the receptive field: the label is an object's shape, and a unit must see the
    whole object to tell one shape from another. The former four-block net (about 31 px of
    receptive field at 64 px) stayed below 0.6 worst group on small or noisy objects and on four
    classes even without any spurious correlation; eight blocks (about 75 px, the whole image) reached 0.85 and
    more on each (bench/robustness.py, the ideal row). The extra blocks run at 16 and 8 px, so
    they cost little. Strided convolutions instead of max-pooling: the saliency penalty
    differentiates the network twice, and max-pool's double backward is several times slower
    on CPU.
    """

    def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 16, 2),
        *block(16, 32),
        *block(32, 32, 2),
        *block(32, 64),
        *block(64, 64, 2),
        *block(64, 128),
        *block(128, 128),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def resolve_arch(arch: str, pretrained: str) -> str:
    """--arch auto as the architecture it stands for (any other name as it is): the one that
    --pretrained's weights are for, or simple-cnn without weights.

    From random weights the ResNets learn nothing in the default 15 epochs on a few thousand small
    images (resnet50 stayed at chance even without a spurious correlation, README), while the
    small net learns the object's shape; with ImageNet weights a ResNet is the better learner.
    """
    if arch != "auto":
        return arch
    if not pretrained:
        return "simple-cnn"
    if pretrained == "torchvision":
        return "resnet50"
    suffix = Path(pretrained).suffix.lower()
    if suffix == ".npz":
        return "bit-s-r50x1"
    if suffix not in (".pt", ".pth"):
        return "simple-cnn"  # load_pretrained names the formats it reads
    return arch_of_state_dict(read_state_dict(Path(pretrained)), pretrained)


def arch_of_state_dict(state: dict, source: str) -> str:
    """The architecture whose parameter and buffer names are exactly those of `state`."""
    names = {k for k in state if not k.endswith("num_batches_tracked")}
    for arch in ("simple-cnn", *RESNETS, "bit-s-r50x1"):
        own = {k for k in architecture(arch, 2).state_dict() if not k.endswith("num_batches_tracked")}
        if own == names:
            return arch
    raise UserError(f"--pretrained {source}: its weights fit none of simple-cnn, {', '.join(RESNETS)}, "
                    f"bit-s-r50x1; name the architecture with --arch")


def build_model(arch: str, num_classes: int, pretrained: str = "") -> nn.Module:
    """The `arch` classifier with `num_classes` outputs, initialised as `pretrained` says (see below)."""
    model = architecture(arch, num_classes)
    if pretrained:
        info = load_pretrained(model, arch, pretrained)
        log.info("%s: %d tensors loaded from %s; fresh: %s", arch, len(info["loaded"]), pretrained,
                 ", ".join(info["skipped"]) or "none")
    return model


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model moved to `device`, in the memory layout `normalize` gives its inputs there."""
    return model.to(device, memory_format=model_memory_format(device))


def architecture(arch: str, num_classes: int) -> nn.Module:
    if arch == "simple-cnn":
        return simple_cnn(num_classes)
    if arch in RESNETS:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if arch == "bit-s-r50x1":
        from cfrobust.trainer.bit import bit_s_r50x1

        return bit_s_r50x1(num_classes)
    raise UserError(f"unknown --arch {arch!r}")


def load_pretrained(model: nn.Module, arch: str, pretrained: str) -> dict:
    """Load `pretrained` into `model` in place; returns {"loaded": [...], "skipped": [...]} names.

    '' = keep the random init; 'torchvision' = ImageNet weights of a ResNet with a fresh head;
    a .pt/.pth state dict (or cfrobust checkpoint); an official BiT .npz for bit-s-r50x1.
    """
    if not pretrained:
        return {"loaded": [], "skipped": []}
    if pretrained == "torchvision":
        return load_matching(model, torchvision_state_dict(arch), fresh=("fc.",), source=pretrained)
    suffix = Path(pretrained).suffix.lower()
    if suffix == ".npz":
        if arch != "bit-s-r50x1":
            raise UserError(f"--pretrained {pretrained}: a BiT .npz file needs --arch bit-s-r50x1, not {arch!r}")
        from cfrobust.trainer.bit import load_bit_npz

        return load_bit_npz(model, pretrained)
    if suffix in (".pt", ".pth"):
        return load_matching(model, read_state_dict(Path(pretrained)), source=pretrained)
    raise UserError(f"--pretrained {pretrained!r}: expected '', 'torchvision', a .pt/.pth state dict or a BiT .npz")


def torchvision_state_dict(arch: str) -> dict:
    """torchvision's default ImageNet weights, from the torch hub cache or downloaded into it."""
    if arch not in RESNETS:
        raise UserError(f"--pretrained torchvision is for {', '.join(RESNETS)}, not {arch!r}")
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    file_name = os.path.basename(urlparse(url).path)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        # The same call torchvision makes: reads the cached file, or downloads and hash-checks it.
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except OSError as exc:  # URLError, timeouts and unwritable caches are all OSErrors
        raise UserError(f"cannot download torchvision {arch} weights ({one_line(exc)}): place {file_name} "
                        f"from {url} in {cache_dir}/ (set TORCH_HOME to change the cache)") from None
    except Exception as exc:  # a torn cached file or a failed hash check; torch raises several types
        raise UserError(f"unreadable torchvision {arch} weights ({one_line(exc)}): replace "
                        f"{cache_dir / file_name} with the file from {url}") from None


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def read_state_dict(path: Path) -> dict:
    """A plain state dict, or the "model" entry of a dict holding one (e.g. a cfrobust checkpoint)."""
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        raise UserError(f"--pretrained {path}: not a readable state dict ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pretrained {path}: no state dict (a dict of tensors, or one under \"model\")")
    # Saved from a DistributedDataParallel wrapper: names carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(model: nn.Module, state: dict, fresh: tuple[str, ...] = (), source: str = "") -> dict:
    """Copy every tensor whose name and shape match; names starting with `fresh` keep their init.

    Tensors of another shape (a head of another size) are skipped; names missing on either
    side mean another architecture, which is an error rather than a silent partial load.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(fresh)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        missing_names, unexpected_names = ", ".join(missing[:3]) or "none", ", ".join(unexpected[:3]) or "none"
        raise UserError(f"--pretrained {source}: not weights of this architecture "
                        f"(missing: {missing_names}; unexpected: {unexpected_names})")
    loaded = {k: v for k, v in state.items() if not k.startswith(fresh) and v.shape == own[k].shape}
    model.load_state_dict(loaded, strict=False)
    return {"loaded": list(loaded), "skipped": [k for k in own if k not in loaded]}
