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
FACTUAL_PARTNERS = ("auto", "other-class", "any")  # auto, and the rules of trainer/factual.py batch_partner a user may pick
REGULARIZERS = ("none", "bbox_o", "bbox_f1", "gs")
NORMALIZATIONS = ("imagenet", "bit")
OBJECT_REGIONS = ("mask", "box")
REG_MEASURES = ("share", "raw")
SELECT_BY = ("auto", "accuracy", "auroc", "worst_group")
REG_GRADS = ("grad_y", "grad_sum", "grad_logp_y", "grad_logp_sum", "deeplift", "grad_cam")


# The official code's values per dataset. Sources: github.com/zzzace2000/robust_cls_model at
# c2b9a79; file:line after each value (lightning/ = arch/lightning/, data/ = arch/data/). Every run
# there fine-tunes BiT-S-R50x1 from its .npz (train_pl.py:60 --finetune 1; cct.py:29 always): pass
# the file with --pretrained, which no preset sets. The images go through Resize 256 (CCT: shorter
# side 224), a random 224 crop keeping a box in view, a flip, then mean = std = 0.5; evaluation
# resizes to 224. Their ColorJitter() has no ranges, i.e. changes nothing: color_jitter stays off.

# How the official code weighs and builds the method's terms, the same for every dataset.
_OFFICIAL_TERMS = dict(
    reg_measure="raw",  # lightning/base.py:153-155 (bbox_o: the mean of the squared gradient outside)
    cf_loss="logp",  # train_pl.py:56 (--cf default logp)
    f_weight="1",  # lightning/base.py:401 (one CE summed over x and its factuals alike)
    f_partner="other-class",  # inpainting/Baseline.py:170-184 (FactualMixedRandomTileInpainter: y != y')
    f_erode="0",  # inpainting/Baseline.py:184 (X * mask + bg[swap] * (1 - mask): the mask as it is)
    cf_coeff=1.0,  # train_pl.py:57 (--cf_coeff default 1)
)
_WATERBIRDS = dict(
    arch="bit-s-r50x1",  # lightning/waterbird.py:109 (--arch default BiT-S-R50x1)
    optimizer="sgd",  # lightning/waterbird.py:37
    lr=8e-4,  # lightning/waterbird.py:117 (--base_lr)
    momentum=0.9,  # lightning/waterbird.py:39
    weight_decay=1e-4,  # lightning/waterbird.py:39
    epochs=40,  # lightning/waterbird.py:16, 110 (max_epochs)
    batch=32,  # lightning/waterbird.py:111
    eval_batch=256,  # lightning/waterbird.py:113 (--val_batch)
    scheduler="plateau",  # lightning/waterbird.py:42-43 (ReduceLROnPlateau, mode min, on val_loss)
    gamma=0.1,  # lightning/waterbird.py:45 (factor)
    plateau_patience=1,  # lightning/waterbird.py:46 (threshold 1e-4 at :47 is the plateau schedule's own)
    select_by="accuracy",  # lightning/waterbird.py:135 (monitor val_acc1, mode max)
    clip_grad=1.0,  # train_pl.py:186 (gradient_clip_val)
    normalize="bit",  # data/waterbirds_datasets.py:111, data/imagenet_datasets.py:193 (mean = std = 0.5)
    crop=224,  # data/waterbirds_datasets.py:101, 106-107 (Resize 256 x 256, then box-keeping RandomCrop 224)
    crop_scale="",  # data/waterbirds_datasets.py:107 (a plain crop, not a resized one)
    hflip=True,  # data/waterbirds_datasets.py:108
    color_jitter="",  # data/waterbirds_datasets.py:109 (ColorJitter() without ranges: the identity)
    eval_size=224,  # lightning/waterbird.py:81 -> data/imagenet_datasets.py:188, 191 (Resize 224 x 224)
    object_region="mask",  # data/waterbirds_datasets.py:71-76 (the segmentation mask is the object)
    **_OFFICIAL_TERMS,
    reg_anneal="0",  # lightning/waterbird.py:119 (--reg_anneal default 0: no ramp)
)
_IN9 = dict(
    arch="bit-s-r50x1",  # lightning/in9.py:155
    optimizer="sgd",  # lightning/in9.py:44
    lr=0.05,  # lightning/in9.py:163 (--base_lr)
    momentum=0.9,  # lightning/in9.py:46
    weight_decay=1e-4,  # lightning/in9.py:46
    epochs=25,  # lightning/in9.py:20, 156 (max_epochs)
    batch=32,  # lightning/in9.py:157
    eval_batch=256,  # lightning/in9.py:159 (--val_batch)
    scheduler="step",  # lightning/in9.py:49-50 (MultiStepLR, stepped per epoch)
    milestones="6,12,18",  # lightning/in9.py:19
    gamma=0.1,  # lightning/in9.py:50
    select_by="accuracy",  # lightning/in9.py:183 (monitor val_acc1, mode max)
    clip_grad=1.0,  # train_pl.py:186 (gradient_clip_val)
    normalize="bit",  # data/in9_datasets.py:153, data/imagenet_datasets.py:193 (mean = std = 0.5)
    crop=224,  # data/in9_datasets.py:143, 148-149 (Resize 256 x 256, then box-keeping RandomCrop 224)
    crop_scale="",  # data/in9_datasets.py:149 (a plain crop)
    hflip=True,  # data/in9_datasets.py:150
    color_jitter="",  # data/in9_datasets.py:151 (ColorJitter() without ranges: the identity)
    eval_size=224,  # lightning/in9.py:122 -> data/imagenet_datasets.py:188, 191 (Resize 224 x 224)
    object_region="mask",  # lightning/in9.py:153 (--mask seg), data/in9_datasets.py:51-61 (mask from no_fg)
    **_OFFICIAL_TERMS,
    reg_anneal="0",  # lightning/in9.py:165 (--reg_anneal default 0: no ramp)
)
PRESETS = {
    "waterbirds": _WATERBIRDS,
    "in9": _IN9,
    # IN9LLightningModel subclasses the IN-9 model and changes only these (lightning/in9.py:198-201).
    "in9l": {**_IN9, "milestones": "5,10,15", "epochs": 20},  # lightning/in9.py:200, 201
    "cct": dict(
        arch="bit-s-r50x1",  # lightning/cct.py:21 (fixed)
        optimizer="rmsprop",  # lightning/cct.py:43
        lr=0.003,  # lightning/cct.py:107 (--base_lr)
        momentum=0.9,  # lightning/cct.py:45
        weight_decay=0.0,  # lightning/cct.py:43-45 (none given: RMSprop's default 0)
        epochs=50,  # lightning/cct.py:100 (--max_epochs)
        batch=64,  # lightning/cct.py:101
        eval_batch=256,  # lightning/cct.py:103 (--val_batch)
        scheduler="step",  # lightning/cct.py:48 (MultiStepLR, stepped per epoch)
        milestones="15,30,45",  # lightning/cct.py:49
        gamma=0.1,  # lightning/cct.py:49
        select_by="auroc",  # lightning/cct.py:124 (monitor val_auc, mode max; val = cis_val, :79-80)
        clip_grad=1.0,  # train_pl.py:186 (gradient_clip_val)
        normalize="bit",  # data/cct_datasets.py:146, 156 (mean = std = 0.5)
        # data/cct_datasets.py:138, 141-142: the shorter side resized to 224, then a box-keeping
        # 224 x 224 crop, which moves along the longer side only. Shards are square: made with
        # `preprocess --size 224` this crop changes nothing and training sees what evaluation
        # sees; at the default 256 it is the small shifting crop of the other presets.
        crop=224,
        crop_scale="",  # data/cct_datasets.py:142 (a plain crop)
        hflip=True,  # data/cct_datasets.py:143
        color_jitter="",  # data/cct_datasets.py:144 (ColorJitter() without ranges: the identity)
        eval_size=224,  # data/cct_datasets.py:152, 154 (Resize 224 x 224)
        object_region="box",  # data/cct_datasets.py:103-120 (boxes only; CCT has no masks)
        **_OFFICIAL_TERMS,
        reg_anneal="0",  # lightning/cct.py:109 (--reg_anneal default 0: no ramp)
    ),
}
PRESET_NAMES = ("none",) + tuple(PRESETS)

# Options whose default differs from what runs did before the option existed: a config that
# lacks them was made with these values (rectangles, the raw bbox_o, best.pt by accuracy, factuals
# weighing as much as originals, on other-class backgrounds, with the mask as it is).
PREDATED = {"object_region": "box", "reg_measure": "raw", "select_by": "accuracy", "f_weight": "1",
            "f_partner": "other-class", "f_erode": "0"}

# What `cfrobust train` writes in its --out folder (all that --overwrite may replace there).
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.jsonl.tmp", "eval.json", "eval.json.tmp", "checkpoints", "tensorboard"}


def option(default, help: str, choices=None):  # noqa: A002 - mirrors click's name
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    shards: str = option("", "Shard root made by `cfrobust preprocess` (holds train/, val/, ...): a folder, or a URL "
                         "(https://, s3://, gs://, any fsspec protocol, or 'pipe:COMMAND' with {} for the file's path).")
    cache_dir: str = option("", "With a URL --shards: keep each shard here once its sha256 matches the manifest; "
                            "later epochs read the copy ('': stream every epoch).")
    out: str = option("", "Run folder to create: config.json, metrics.jsonl, checkpoints/, eval.json.")
    arch: str = option("auto", "Model architecture. auto: the one --pretrained's weights are for (resnet50 for "
                       "'torchvision', bit-s-r50x1 for a BiT .npz, the net a .pt file's weights fit), and simple-cnn "
                       "from random weights, the one learner here that learns an object's shape from scratch within "
                       "the default epochs (a resnet50 from scratch stayed at chance, README).", ("auto",) + ARCHS)
    pretrained: str = option("", "Initial weights: '' (random), 'torchvision', a state-dict .pt file, or a BiT .npz file.")
    preset: str = option("none", "The paper's hyperparameters for a dataset; explicit options override it.", PRESET_NAMES)
    epochs: int = option(15, "Training epochs.")
    batch: int = option(64, "Batch size per process (global batch = batch x processes).")
    batch_split: int = option(1, "Split each batch into this many chunks (gradient accumulation, one all-reduce).")
    optimizer: str = option("sgd", "Optimizer.", ("sgd", "adam", "rmsprop"))
    lr: float = option(0.02, "Peak learning rate (for the global batch; not rescaled with processes).")
    momentum: float = option(0.9, "SGD/RMSprop momentum.")
    weight_decay: float = option(1e-4, "Weight decay.")
    scheduler: str = option("cosine", "cosine (per step, to 0), step (x gamma at --milestones epochs), plateau (val loss), none.", ("cosine", "step", "plateau", "none"))
    milestones: str = option("", "step scheduler: comma-separated epochs, e.g. 6,12,18.")
    gamma: float = option(0.1, "step/plateau scheduler: decay factor.")
    clip_grad: float = option(
        0.0, "Clip the global gradient norm to this before each step (0: off; the presets clip at 1, as the official code)."
    )
    plateau_patience: int = option(5, "plateau scheduler: epochs without a better validation loss before the rate decays.")
    select_by: str = option(
        "auto",
        "Which validation figure picks best.pt: accuracy, auroc, worst_group (worst-group accuracy), or auto = "
        "worst_group when the validation split's groups carry more than the class (Waterbirds' places, the "
        "built-in data), else accuracy.",
        SELECT_BY,
    )
    eval_batch: int = option(0, "Images per evaluation batch (validation and the final eval; 0: twice --batch).")
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), 32, bf16, or 16 (fp16 with a grad scaler, GPU only; with --reg it needs --reg-impl finite-diff and a gradient score).", ("auto", "32", "bf16", "16"))
    seed: int = option(0, "Seed for initialisation, shard order and augmentation.")
    workers: int = option(2, "DataLoader worker processes per training process.")
    normalize: str = option(
        "imagenet",
        "Input normalisation: imagenet (mean/std of ImageNet, what torchvision weights expect) or bit "
        "(mean = std = 0.5, as the official code and BiT weights).",
        NORMALIZATIONS,
    )
    object_region: str = option(
        "mask",
        "The object for F (what is kept) and Sal (where gradient may be): mask = the sample's segmentation mask, "
        "its boxes' rectangles where the shards have no mask; box = the rectangles always. CF holes are always "
        "the rectangles.",
        OBJECT_REGIONS,
    )
    crop: int = option(
        0, "Random crop of this many pixels that keeps at least one box in view (the official box-aware crop; 0: off)."
    )
    crop_scale: str = option(
        "", "With --crop: a random-resized crop instead, covering MIN,MAX of the image's area (e.g. 0.35,1), resized to --crop."
    )
    hflip: bool = option(False, "Random horizontal flip (boxes and masks mirrored with the image).")
    color_jitter: str = option(
        "", "Colour jitter B,C,S,H (brightness, contrast, saturation, hue), one draw per sample shared by x and x_cf ('': off)."
    )
    eval_size: int = option(0, "Side at which validation and eval see images (0: --crop when set, else as stored).")
    cf: str = option("none", "Counterfactual fill (object removed), read from the shards unless --cf-online.", CF_FILLS)
    cf_online: bool = option(
        False,
        "Compute the --cf fill on the device from the image instead of reading it from the shards "
        "(mean, random, shuffle, tile).",
    )
    cf_loss: str = option(
        "uni",
        "Counterfactual loss: uni = CE to uniform (the background alone says nothing); logp = -log(1 - p_y) "
        "(the official default; with 2 classes it teaches background -> the other class); uni_e = uniform over "
        "classes but y; channels = 2K outputs, class k+K = background of k.",
        CF_LOSSES,
    )
    cf_coeff: float = option(
        0.5,
        "Weight of the counterfactual loss (0.5: at the official 1, two of three seeds of the four-class benchmark "
        "member sat near chance for their first epochs; see README; every --preset uses 1).",
    )
    f: str = option(
        "none",
        "Factual augmentation (object kept, background replaced, label y): random colour+noise, shuffle, "
        "mrand = another class's background, fgsm/pgd = adversarial background.",
        FACTUAL_MODES,
    )
    f_partner: str = option(
        "auto",
        "mrand: whose background an object is pasted on. other-class = an image of another class (the official "
        "rule), which points a factual's background away from its label where backgrounds follow it; any = any "
        "other image of the batch, so that the background says nothing about the label; auto = any with two "
        "classes (where 'another class' names the label outright), other-class with more.",
        FACTUAL_PARTNERS,
    )
    f_erode: str = option(
        "auto",
        "What a factual drops of the object's mask before it keeps the object: blend = the edge pixels whose colour "
        "mixes the object's and its background's (an outline that contrasts with both stays; a sharp mask loses "
        "little), a whole number = that many pixels all round (0: the mask as it is, as the official code and every "
        "--preset), scaled = 1 pixel per 64 of the training image's shorter side; auto = blend where mrand takes any "
        "image's background (--f-partner), else 0. A mask's edge keeps a rim of the image's own background, which "
        "tells the place; boxes are never shrunk.",
    )
    f_eps: float = option(0.6, "fgsm/pgd: L-inf radius of the background perturbation, in normalised units.")
    f_alpha: float = option(0.0, "pgd: step size (0: eps / 4).")
    f_steps: int = option(3, "pgd: attack steps.")
    f_weight: str = option(
        "auto",
        "How a boxed image's factual counts in the CE: a number above 0 = beside the image, with that weight against "
        "the original's (every --preset: 1, the official sum); replace = in place of the image (its CE is the "
        "factual's, so that no image in the CE shows a background that follows the label; the original still trains "
        "CF and Sal); auto = replace when mrand pastes on any image's background, else the number of classes - 1 "
        "(with other-class partners each background then meets each class about equally often in the CE).",
    )
    reg: str = option(
        "none", "Saliency penalty: bbox_o = gradients outside the boxes; bbox_f1, gs as the official code.", REGULARIZERS
    )
    reg_measure: str = option(
        "share",
        "bbox_o's size: share = the saliency energy outside the object as a share of all of it, per image (one "
        "--reg-coeff fits any resolution, normalisation and architecture); raw = the mean of the squared input "
        "gradient outside the object (the official code's; its useful weight varies by orders of magnitude).",
        REG_MEASURES,
    )
    reg_grad: str = option("grad_y", "Saliency score differentiated w.r.t. the input.", REG_GRADS)
    reg_impl: str = option(
        "exact",
        "How the penalty's weight gradient is taken: exact = double backpropagation; finite-diff = the "
        "Hessian-vector product by a finite difference of first-order gradients, (grad s(x + h v) - grad s(x)) / h "
        "with v = dPenalty/dg and the first pass's ReLU pattern held (a second first-order forward/backward of "
        "the batch, no double backward; h makes |h v| = eps |x|, eps 1e-2 in fp32 and fp16, 2e-2 in bf16). Both "
        "passes carry every row as one batch, so BatchNorm's batch statistics are the exact step's; running "
        "statistics are updated once. It serves bbox_o (share and raw), bbox_f1 and gs with the "
        "input-gradient scores (grad_y, grad_sum, grad_logp_y, grad_logp_sum), not deeplift or grad_cam.",
        ("exact", "finite-diff"),
    )
    reg_coeff: float = option(
        0.1,
        "Weight lambda of the saliency penalty (0.1: at 1 the share measure slowed shape learning on the "
        "benchmark family; see README).",
    )
    reg_every: int = option(
        1,
        "Lazy regularisation: take the saliency penalty on one optimizer step in K, at K times its weight, and "
        "skip its cost on the others (as StyleGAN2 does with its R1 penalty; Karras et al. 2020). 1: every step, "
        "the official behaviour. With --reg-impl finite-diff, 2 took Sal alone from 2.1x to 1.6x ERM's time per "
        "image on the simple-cnn at 64 px, but stalled one seed of two on the four-class benchmark member where "
        "every step did not (README, Performance): check it against K = 1 on your data.",
    )
    reg_anneal: str = option(
        "auto",
        "Epochs over which lambda ramps linearly from 0 to --reg-coeff: a whole number (0: no ramp), or auto = "
        "(--epochs + 1) // 4, about a quarter of the run (15 epochs: 4; under 3: none). A penalty at full "
        "weight from the first step held some seeds of the four-class benchmark member near chance (see README); "
        "every --preset uses 0.",
    )
    mixup: float = option(0.0, "Baseline: mixup with Beta(alpha, alpha) (0: off).")
    label_smoothing: float = option(0.0, "Baseline: label smoothing epsilon, in [0, 1).")
    gridmask: bool = option(False, "Baseline: GridMask augmentation.")
    balance_groups: bool = option(
        False,
        "Reference: weight each training image's CE by 1 / its group's share of the training split (the "
        "group-balanced ERM that knows every image's group; groups from the shards; factual rows keep weight 1).",
    )
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

    def eval_side(self) -> int | None:
        """The side validation and eval resize images to: --eval-size, else the training crop (the
        official Resize(224) after training on 224-px crops), else as stored (None)."""
        return self.eval_size or self.crop or None

    def to_dict(self) -> dict:
        return asdict(self)

    def with_factual_pairing(self, num_classes: int) -> "TrainConfig":
        """--f-partner and --f-weight auto as the values they stand for with `num_classes` classes.

        With two classes the official other-class partner gives every factual the background of
        the one other class: a network that tells a pasted image from a real one then reads a
        factual as "the class the place does not say" and fits it without the object (README,
        On data nobody tuned for). So auto pastes on any image's background there, and since the
        originals are then the only CE rows whose background follows the label, the factual
        takes its original's place in the CE. With more classes "not the place's class" still
        leaves several, and other-class partners at weight K - 1 balance the backgrounds.

        --f-erode auto follows the pairing: blend under `any`, where the factuals are the only CE
        rows of a boxed image and a rim of its own background at the mask's edge is the one place
        cue left in them (the 9,600-image hold-out set read it); the mask as it is under
        other-class, as the official code, where the originals show the place whole beside the
        factuals and blend stalled `four-class` (README, Robust by default)."""
        partner = self.f_partner
        if partner == "auto":
            partner = "any" if num_classes == 2 else "other-class"
        weight = self.f_weight
        if weight == "auto":
            weight = "replace" if self.f == "mrand" and partner == "any" else str(max(1, num_classes - 1))
        erosion = self.f_erode
        if erosion == "auto":
            erosion = "blend" if self.f == "mrand" and partner == "any" else "0"
        return replace(self, f_partner=partner, f_weight=weight, f_erode=erosion)

    def f_erode_pixels(self, side: int) -> int:
        """--f-erode in pixels for training images whose shorter side is `side`."""
        if self.f_erode in ("blend", "auto"):
            raise ValueError(f"--f-erode {self.f_erode} is no width: blend drops pixels by colour (trainer/factual.py "
                             "pasted_region), auto stands for blend or 0 once the pairing is known (with_factual_pairing)")
        return max(1, round(side / 64)) if self.f_erode == "scaled" else int(self.f_erode)

    def reg_anneal_epochs(self) -> int:
        """--reg-anneal in epochs: auto is about a quarter of the run, and always fewer than --epochs."""
        return (self.epochs + 1) // 4 if self.reg_anneal == "auto" else int(self.reg_anneal)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """The config a run folder or checkpoint recorded; an option it predates takes the value
        that runs had before the option existed (PREDATED), else its default. A number recorded
        for an option that has since become text (--reg-anneal before auto) reads as its text."""
        textual = {f.name for f in fields(cls) if isinstance(f.default, str)}
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values = {k: str(v) if k in textual and isinstance(v, int) else v for k, v in values.items()}
        return cls(**{**PREDATED, **values})

    def describe(self) -> str:
        """Short name of the method, e.g. `CF(tile, logp, 1) + F(mrand) + Sal(bbox_o, grad_y, λ=10)`;
        the factual names its pairing, weight and mask erosion where they are not the official ones,
        e.g. `F(mrand, any, replace, blend edge)` or `F(mrand, weight 3)`."""
        parts = []
        if self.cf != "none":
            parts.append(f"CF({self.cf}, {self.cf_loss}, {self.cf_coeff:g})")
        if self.f != "none":
            parts.append(f"F({', '.join([self.f, *self._factual_departures()])})")
        if self.reg != "none":
            raw = " raw" if self.reg == "bbox_o" and self.reg_measure == "raw" else ""
            parts.append(f"Sal({self.reg}{raw}, {self.reg_grad}, λ={self.reg_coeff:g})")
        return " + ".join(parts) or "ERM"

    def _factual_departures(self) -> list[str]:
        """--f-partner (mrand only), --f-weight and --f-erode where they differ from the official code's."""
        departures = []
        if self.f == "mrand" and self.f_partner != "other-class":
            departures.append(self.f_partner if self.f_partner != "auto" else "partner auto")
        if self.f_weight != "1":
            departures.append(self.f_weight if self.f_weight == "replace" else f"weight {self.f_weight}")
        if self.f_erode != "0":
            departures.append("blend edge" if self.f_erode == "blend" else f"erode {self.f_erode}")
        return departures
