"""The run configuration: one typed dataclass, exposed as CLI options and saved as config.json.

Field metadata carries each option's help text and choices, so the CLI is generated from this
file and a new option is added in exactly one place. No torch import here (the CLI reads it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

ARCHS = ("simple-cnn", "resnet18", "resnet50")
CF_FILLS = ("none", "mean", "random", "shuffle", "tile", "telea", "ns")
CF_LOSSES = ("logp",)
FACTUAL_MODES = ("none", "mrand")
REGULARIZERS = ("none", "bbox_o")
REG_GRADS = ("grad_y",)


def option(default, help: str, choices=None):  # noqa: A002 - mirrors click's name
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    shards: str = option("", "Shard root made by `cfrobust preprocess` (holds train/, val/, ...).")
    out: str = option("", "Run folder to create: config.json, metrics.jsonl, checkpoints/, eval.json.")
    arch: str = option("resnet50", "Model architecture (random init).", ARCHS)
    epochs: int = option(10, "Training epochs.")
    batch: int = option(64, "Batch size per process (global batch = batch x processes).")
    lr: float = option(0.01, "Peak learning rate (SGD, momentum 0.9, cosine decay to 0).")
    weight_decay: float = option(1e-4, "SGD weight decay.")
    seed: int = option(0, "Seed for initialisation, shard order and augmentation.")
    workers: int = option(2, "DataLoader worker processes per training process.")
    cf: str = option("none", "Counterfactual fill (object removed), read from the shards unless --cf-online.", CF_FILLS)
    cf_online: bool = option(
        False,
        "Compute the --cf fill on the device from the image instead of reading it from the shards "
        "(mean, random, shuffle, tile).",
    )
    cf_loss: str = option("logp", "Counterfactual loss: logp = -log(1 - p_y(x_cf)).", CF_LOSSES)
    cf_coeff: float = option(1.0, "Weight of the counterfactual loss.")
    f: str = option("none", "Factual augmentation: mrand = object on another class's background.", FACTUAL_MODES)
    reg: str = option("none", "Saliency penalty: bbox_o = input gradients outside the boxes.", REGULARIZERS)
    reg_grad: str = option("grad_y", "Saliency score: grad_y = target logit.", REG_GRADS)
    reg_coeff: float = option(1.0, "Weight lambda of the saliency penalty.")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, or cuda:N.")
    overwrite: bool = option(False, "Replace an existing run folder.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        """Short name of the method, e.g. `CF(tile, logp, 1) + F(mrand) + Sal(bbox_o, grad_y, λ=10)`."""
        parts = []
        if self.cf != "none":
            parts.append(f"CF({self.cf}, {self.cf_loss}, {self.cf_coeff:g})")
        if self.f != "none":
            parts.append(f"F({self.f})")
        if self.reg != "none":
            parts.append(f"Sal({self.reg}, {self.reg_grad}, λ={self.reg_coeff:g})")
        return " + ".join(parts) or "ERM"
