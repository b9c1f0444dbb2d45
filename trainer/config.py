"""The run configuration: one typed dataclass, exposed as CLI options and saved as config.json.

Field metadata carries each option's help text and choices, so the CLI is generated from this
file and a new option is added in exactly one place. No torch import here (the CLI reads it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

ARCHS = ("simple-cnn", "resnet18", "resnet34", "resnet50", "bit-s-r50x1")
CF_FILLS = ("none", "mean", "random", "shuffle", "tile", "telea", "ns", "cagan")
CF_LOSSES = ("logp", "uni", "uni_e", "channels")
FACTUAL_MODES = ("none", "random", "shuffle", "mrand", "fgsm", "pgd")
REGULARIZERS = ("none", "bbox_o", "bbox_f1", "gs")
REG_GRADS = ("grad_y", "grad_sum", "grad_logp_y", "grad_logp_sum", "deeplift", "grad_cam")


# The official code's hyperparameters per dataset (the paper's appendix and its training scripts).
PRESETS = {
    "waterbirds": dict(optimizer="sgd", lr=8e-4, momentum=0.9, weight_decay=1e-4, epochs=40, batch=32, scheduler="plateau", clip_grad=1.0),
    "in9": dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=25, scheduler="step", milestones="6,12,18", clip_grad=1.0),
    "in9l": dict(optimizer="sgd", lr=0.05, momentum=0.9, epochs=20, scheduler="step", milestones="5,10,15", clip_grad=1.0),
    "cct": dict(optimizer="rmsprop", lr=0.003, epochs=50, batch=64, clip_grad=1.0),
}
PRESET_NAMES = ("none",) + tuple(PRESETS)

# What `cfrobust train` writes in its --out folder (all that --overwrite may replace there).
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.jsonl.tmp", "eval.json", "eval.json.tmp", "checkpoints", "tensorboard"}


def option(default, help: str, choices=None):  # noqa: A002 - mirrors click's name
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    shards: str = option("", "Shard root made by `cfrobust preprocess` (holds train/, val/, ...).")
    out: str = option("", "Run folder to create: config.json, metrics.jsonl, checkpoints/, eval.json.")
    arch: str = option("resnet50", "Model architecture.", ARCHS)
    pretrained: str = option("", "Initial weights: '' (random), 'torchvision', a state-dict .pt file, or a BiT .npz file.")
    preset: str = option("none", "The paper's hyperparameters for a dataset; explicit options override it.", PRESET_NAMES)
    epochs: int = option(10, "Training epochs.")
    batch: int = option(64, "Batch size per process (global batch = batch x processes).")
    batch_split: int = option(1, "Split each batch into this many chunks (gradient accumulation, one all-reduce).")
    optimizer: str = option("sgd", "Optimizer.", ("sgd", "adam", "rmsprop"))
    lr: float = option(0.01, "Peak learning rate (for the global batch; not rescaled with processes).")
    momentum: float = option(0.9, "SGD/RMSprop momentum.")
    weight_decay: float = option(1e-4, "Weight decay.")
    scheduler: str = option("cosine", "cosine (per step, to 0), step (x gamma at --milestones epochs), plateau (val loss), none.", ("cosine", "step", "plateau", "none"))
    milestones: str = option("", "step scheduler: comma-separated epochs, e.g. 6,12,18.")
    gamma: float = option(0.1, "step/plateau scheduler: decay factor.")
    clip_grad: float = option(
        0.0, "Clip the global gradient norm to this before each step (0: off; the presets clip at 1, as the official code)."
    )
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), 32, bf16, or 16 (fp16 with a grad scaler).", ("auto", "32", "bf16", "16"))
    seed: int = option(0, "Seed for initialisation, shard order and augmentation.")
    workers: int = option(2, "DataLoader worker processes per training process.")
    cf: str = option("none", "Counterfactual fill (object removed), read from the shards unless --cf-online.", CF_FILLS)
    cf_online: bool = option(
        False,
        "Compute the --cf fill on the device from the image instead of reading it from the shards "
        "(mean, random, shuffle, tile).",
    )
    cf_loss: str = option(
        "logp",
        "Counterfactual loss: logp = -log(1 - p_y); uni = CE to uniform; uni_e = uniform over classes but y; "
        "channels = 2K outputs, class k+K = background of k.",
        CF_LOSSES,
    )
    cf_coeff: float = option(1.0, "Weight of the counterfactual loss.")
    f: str = option(
        "none",
        "Factual augmentation (object kept, background replaced, label y): random colour+noise, shuffle, "
        "mrand = another class's background, fgsm/pgd = adversarial background.",
        FACTUAL_MODES,
    )
    f_eps: float = option(0.6, "fgsm/pgd: L-inf radius of the background perturbation, in normalised units.")
    f_alpha: float = option(0.0, "pgd: step size (0: eps / 4).")
    f_steps: int = option(3, "pgd: attack steps.")
    reg: str = option(
        "none", "Saliency penalty: bbox_o = gradients outside the boxes; bbox_f1, gs as the official code.", REGULARIZERS
    )
    reg_grad: str = option("grad_y", "Saliency score differentiated w.r.t. the input.", REG_GRADS)
    reg_coeff: float = option(1.0, "Weight lambda of the saliency penalty.")
    reg_anneal: int = option(0, "Epochs over which lambda ramps linearly from 0 to --reg-coeff (0: none).")
    mixup: float = option(0.0, "Baseline: mixup with Beta(alpha, alpha) (0: off).")
    label_smoothing: float = option(0.0, "Baseline: label smoothing epsilon, in [0, 1).")
    gridmask: bool = option(False, "Baseline: GridMask augmentation.")
    data_ratio: float = option(1.0, "Train on this fixed, seeded fraction (0, 1] of the training split.")
    box_fraction: float = option(1.0, "Keep boxes for this seeded fraction [0, 1] of training images; the rest train as ERM.")
    bbox_noise: float = option(0.0, "Shift each training box by this fraction [0, 1] of its largest possible offset (seeded).")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, or cuda:N.")
    save_every: int = option(0, "Also checkpoint every N steps (0: at epoch ends only).")
    tensorboard: bool = option(
        False,
        "Also log scalars to OUT/tensorboard/ (per step: loss terms, lr; per epoch: val figures); "
        "needs `pip install tensorboard`.",
    )
    quiet: bool = option(False, "No progress bar and no per-epoch lines (metrics.jsonl is written all the same).")
    resume: bool = option(False, "Continue the run in --out from checkpoints/last.pt.")
    overwrite: bool = option(False, "Replace an existing run folder (one holding other files, or the shards, is refused).")

    def with_preset(self, explicit: set[str]) -> "TrainConfig":
        """The preset's values for every field the user did not set explicitly."""
        if self.preset not in PRESETS:
            return self
        values = {k: v for k, v in PRESETS[self.preset].items() if k not in explicit}
        return replace(self, **values)

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
