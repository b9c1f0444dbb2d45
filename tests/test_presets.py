"""The presets hold the official code's values; the plateau schedule, the choice of best.pt by
--select-by, and the evaluation batch behave as documented."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.errors import UserError
from cfrobust.trainer import train as train_module
from cfrobust.trainer.checkpoint import load_checkpoint
from cfrobust.trainer.config import PRESETS, TrainConfig
from cfrobust.trainer.optim import Schedule, make_optimizer
from cfrobust.trainer.train import SELECTION_FIGURES, RunState, close_epoch, train

# Sources: github.com/zzzace2000/robust_cls_model at c2b9a79dd5ccbb8aa8beaa08baaded6ed45d0410;
# lightning/ = arch/lightning/, data/ = arch/data/.
OFFICIAL_WATERBIRDS = {
    "arch": "bit-s-r50x1",  # lightning/waterbird.py:109 --arch default 'BiT-S-R50x1'
    "optimizer": "sgd",  # lightning/waterbird.py:37 torch.optim.SGD
    "lr": 8e-4,  # lightning/waterbird.py:117 --base_lr default 8e-4
    "momentum": 0.9,  # lightning/waterbird.py:39
    "weight_decay": 1e-4,  # lightning/waterbird.py:39
    "epochs": 40,  # lightning/waterbird.py:16 max_epochs = 40
    "batch": 32,  # lightning/waterbird.py:111 --batch default 32
    "eval_batch": 256,  # lightning/waterbird.py:113 --val_batch default 256
    "scheduler": "plateau",  # lightning/waterbird.py:42-43 ReduceLROnPlateau(optim, 'min', ...)
    "gamma": 0.1,  # lightning/waterbird.py:45 factor=0.1
    "plateau_patience": 1,  # lightning/waterbird.py:46 patience=1
    "select_by": "accuracy",  # lightning/waterbird.py:134-135 mode='max', monitor='val_acc1'
    "clip_grad": 1.0,  # train_pl.py:186 gradient_clip_val=1.0
    "normalize": "bit",  # data/waterbirds_datasets.py:111 Normalize((0.5,)*3, (0.5,)*3)
    "crop": 224,  # data/waterbirds_datasets.py:101, 106-107 Resize((256, 256)), RandomCrop((224, 224))
    "crop_scale": "",  # data/waterbirds_datasets.py:107 a plain RandomCrop
    "hflip": True,  # data/waterbirds_datasets.py:108 RandomHorizontalFlip()
    "color_jitter": "",  # data/waterbirds_datasets.py:109 ColorJitter() with no ranges
    "eval_size": 224,  # lightning/waterbird.py:81 -> data/imagenet_datasets.py:188, 191 Resize((224, 224))
    "object_region": "mask",  # data/waterbirds_datasets.py:71-76 sample['masks'] = segmentation
    "reg_measure": "raw",  # lightning/base.py:153-155 bbox_o = ((grad * (1 - mask)) ** 2).mean()
    "cf_loss": "logp",  # train_pl.py:56 parser.add_argument("--cf", default='logp')
    "f_weight": "1",  # lightning/base.py:401 F.cross_entropy(logit[y >= 0], y[y >= 0], reduction='sum')
    "f_partner": "other-class",  # inpainting/Baseline.py:170-171 indicators = (tmp != tmp.T): another class
    "f_erode": "0",  # inpainting/Baseline.py:184 X * mask + bg[swap] * (1 - mask): the mask unshrunk
    "cf_coeff": 1.0,  # train_pl.py:57 parser.add_argument("--cf_coeff", type=float, default=1.)
    "reg_anneal": "0",  # lightning/waterbird.py:119 parser.add_argument("--reg_anneal", type=float, default=0.)
}
OFFICIAL_IN9 = {
    "arch": "bit-s-r50x1",  # lightning/in9.py:155 --arch default 'BiT-S-R50x1'
    "optimizer": "sgd",  # lightning/in9.py:44 torch.optim.SGD
    "lr": 0.05,  # lightning/in9.py:163 --base_lr default 0.05
    "momentum": 0.9,  # lightning/in9.py:46
    "weight_decay": 1e-4,  # lightning/in9.py:46
    "epochs": 25,  # lightning/in9.py:20 max_epochs = 25
    "batch": 32,  # lightning/in9.py:157 --batch default 32
    "eval_batch": 256,  # lightning/in9.py:159 --val_batch default 256
    "scheduler": "step",  # lightning/in9.py:49 MultiStepLR
    "milestones": "6,12,18",  # lightning/in9.py:19 milestones = [6, 12, 18]
    "gamma": 0.1,  # lightning/in9.py:50 gamma=0.1
    "select_by": "accuracy",  # lightning/in9.py:182-183 mode='max', monitor='val_acc1'
    "clip_grad": 1.0,  # train_pl.py:186 gradient_clip_val=1.0
    "normalize": "bit",  # data/in9_datasets.py:153 Normalize((0.5,)*3, (0.5,)*3)
    "crop": 224,  # data/in9_datasets.py:143, 148-149 Resize((256, 256)), RandomCrop((224, 224))
    "crop_scale": "",  # data/in9_datasets.py:149 a plain RandomCrop
    "hflip": True,  # data/in9_datasets.py:150 RandomHorizontalFlip()
    "color_jitter": "",  # data/in9_datasets.py:151 ColorJitter() with no ranges
    "eval_size": 224,  # lightning/in9.py:122 -> data/imagenet_datasets.py:188, 191 Resize((224, 224))
    "object_region": "mask",  # lightning/in9.py:153 --mask default 'seg'; data/in9_datasets.py:51-61
    "reg_measure": "raw",  # lightning/base.py:153-155 bbox_o = ((grad * (1 - mask)) ** 2).mean()
    "cf_loss": "logp",  # train_pl.py:56 parser.add_argument("--cf", default='logp')
    "f_weight": "1",  # lightning/base.py:401 F.cross_entropy(logit[y >= 0], y[y >= 0], reduction='sum')
    "f_partner": "other-class",  # inpainting/Baseline.py:170-171 indicators = (tmp != tmp.T): another class
    "f_erode": "0",  # inpainting/Baseline.py:184 X * mask + bg[swap] * (1 - mask): the mask unshrunk
    "cf_coeff": 1.0,  # train_pl.py:57 parser.add_argument("--cf_coeff", type=float, default=1.)
    "reg_anneal": "0",  # lightning/in9.py:165 parser.add_argument("--reg_anneal", type=float, default=0.)
}
OFFICIAL_IN9L = {
    **OFFICIAL_IN9,  # lightning/in9.py:198 class IN9LLightningModel(IN9LightningModel)
    "milestones": "5,10,15",  # lightning/in9.py:200 milestones = [5, 10, 15]
    "epochs": 20,  # lightning/in9.py:201 max_epochs = 20
}
OFFICIAL_CCT = {
    "arch": "bit-s-r50x1",  # lightning/cct.py:21 KNOWN_MODELS['BiT-S-R50x1']
    "optimizer": "rmsprop",  # lightning/cct.py:43 torch.optim.RMSprop
    "lr": 0.003,  # lightning/cct.py:107 --base_lr default 0.003
    "momentum": 0.9,  # lightning/cct.py:45
    "weight_decay": 0.0,  # lightning/cct.py:43-45 none passed: RMSprop's default 0
    "epochs": 50,  # lightning/cct.py:100 --max_epochs default 50
    "batch": 64,  # lightning/cct.py:101 --batch default 64
    "eval_batch": 256,  # lightning/cct.py:103 --val_batch default 256
    "scheduler": "step",  # lightning/cct.py:48 MultiStepLR
    "milestones": "15,30,45",  # lightning/cct.py:49 milestones=[15, 30, 45]
    "gamma": 0.1,  # lightning/cct.py:49 gamma=0.1
    "select_by": "auroc",  # lightning/cct.py:123-124 mode='max', monitor='val_auc'
    "clip_grad": 1.0,  # train_pl.py:186 gradient_clip_val=1.0
    "normalize": "bit",  # data/cct_datasets.py:146 Normalize((0.5,), (0.5,))
    "crop": 224,  # data/cct_datasets.py:138, 141-142 Resize(224) (shorter side), RandomCrop((224, 224))
    "crop_scale": "",  # data/cct_datasets.py:142 a plain RandomCrop
    "hflip": True,  # data/cct_datasets.py:143 RandomHorizontalFlip()
    "color_jitter": "",  # data/cct_datasets.py:144 ColorJitter() with no ranges
    "eval_size": 224,  # data/cct_datasets.py:152, 154 Resize((224, 224))
    "object_region": "box",  # data/cct_datasets.py:103-120 boxes only
    "reg_measure": "raw",  # lightning/base.py:153-155 bbox_o = ((grad * (1 - mask)) ** 2).mean()
    "cf_loss": "logp",  # train_pl.py:56 parser.add_argument("--cf", default='logp')
    "f_weight": "1",  # lightning/base.py:401 F.cross_entropy(logit[y >= 0], y[y >= 0], reduction='sum')
    "f_partner": "other-class",  # inpainting/Baseline.py:170-171 indicators = (tmp != tmp.T): another class
    "f_erode": "0",  # inpainting/Baseline.py:184 X * mask + bg[swap] * (1 - mask): the mask unshrunk
    "cf_coeff": 1.0,  # train_pl.py:57 parser.add_argument("--cf_coeff", type=float, default=1.)
    "reg_anneal": "0",  # lightning/cct.py:109 parser.add_argument("--reg_anneal", type=float, default=0.)
}


@pytest.mark.parametrize("name, official", [("waterbirds", OFFICIAL_WATERBIRDS), ("in9", OFFICIAL_IN9),
                                            ("in9l", OFFICIAL_IN9L), ("cct", OFFICIAL_CCT)])
def test_each_preset_holds_exactly_the_official_values(name, official):
    assert PRESETS[name] == official
    config = TrainConfig(preset=name).with_preset(explicit=set())
    assert {k: getattr(config, k) for k in official} == official
    assert config.pretrained == ""  # the user passes the BiT .npz: no preset downloads weights


def test_preset_values_have_the_type_of_their_option():
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name, values in PRESETS.items():
        for key, value in values.items():
            assert type(value) is type(defaults[key]), (name, key)


def test_select_by_choices_are_the_selection_figures():
    (option,) = [f for f in fields(TrainConfig) if f.name == "select_by"]
    assert option.metadata["choices"] == ("auto", *SELECTION_FIGURES)  # auto resolves to one of them


def plateau_rates(losses, **options) -> list[float]:
    config = TrainConfig(optimizer="sgd", lr=1.0, scheduler="plateau", **options)
    optimizer = make_optimizer(torch.nn.Linear(2, 2), config)
    schedule = Schedule(optimizer, config, steps_per_epoch=1)
    rates = []
    for loss in losses:
        schedule.after_epoch(loss)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_waterbirds_plateau_decays_after_exactly_two_epochs_without_a_relative_gain_above_1e4():
    # 5e-5 below the best is under the 1e-4 relative threshold: it counts as no progress.
    waterbirds = {k: PRESETS["waterbirds"][k] for k in ("gamma", "plateau_patience")}
    assert plateau_rates([1.0, 0.99995, 0.99995, 0.99995], **waterbirds) == pytest.approx([1.0, 1.0, 0.1, 0.1])
    # 2e-4 below the best each epoch is progress: no decay.
    assert plateau_rates([1.0, 0.9998, 0.9996, 0.9994], **waterbirds) == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_plateau_patience_sets_the_epochs_without_progress():
    assert plateau_rates([1.0] * 4, gamma=0.5, plateau_patience=0) == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert plateau_rates([1.0] * 5, gamma=0.5, plateau_patience=3) == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])


# Three epochs scripted on the selection split; each choice has its own best epoch.
EPOCH_FIGURES = [
    dict(accuracy=0.90, worst_group_accuracy=0.50, auroc=0.70),
    dict(accuracy=0.80, worst_group_accuracy=0.70, auroc=0.95),
    dict(accuracy=0.85, worst_group_accuracy=0.70, auroc=0.60),  # ties epoch 2's worst group
]


def run_scripted_epochs(monkeypatch, epochs, **options):
    """close_epoch over the scripted figures; returns (records, improved flags, state, eval batch sizes)."""
    config = TrainConfig(shards="unused", **options)
    batch_sizes, losses = [], []

    def scripted_evaluate(model, shards, splits, env, batch_size, **kwargs):
        batch_sizes.append(batch_size)
        figures = epochs[len(batch_sizes) - 1]
        return {splits[0]: {"loss": 1.0 - figures["accuracy"], "mean_group_accuracy": 0.0, **figures}}

    monkeypatch.setattr(train_module, "evaluate_splits", scripted_evaluate)
    parts = SimpleNamespace(config=config, env=None, schedule=SimpleNamespace(after_epoch=losses.append))
    state, records, improved = RunState(), [], []
    for epoch in range(1, len(epochs) + 1):
        record, better = close_epoch(None, parts, state, {"epoch": epoch}, "val", num_classes=2)
        records.append(record)
        improved.append(better)
    assert losses == pytest.approx([1.0 - f["accuracy"] for f in epochs])  # the plateau schedule's input
    return records, improved, state, batch_sizes


@pytest.mark.parametrize("select_by, figure, improved, best", [
    ("accuracy", "accuracy", [True, False, False], 1),
    ("worst_group", "worst_group_accuracy", [True, True, False], 2),  # epoch 3 only ties: 2 stays best
    ("auroc", "auroc", [True, True, False], 2),
])
def test_select_by_picks_the_epoch_best_on_its_figure(monkeypatch, select_by, figure, improved, best):
    records, flags, state, _ = run_scripted_epochs(monkeypatch, EPOCH_FIGURES, select_by=select_by)
    assert flags == improved
    assert state.best_epoch == best and state.best_score == EPOCH_FIGURES[best - 1][figure]
    assert [r["val"]["selected_by"] for r in records] == [figure] * 3
    assert [r["val"]["auroc"] for r in records] == [0.70, 0.95, 0.60]


def test_select_by_auroc_falls_back_to_accuracy_where_auroc_is_undefined(monkeypatch):
    single_class = [dict(f, auroc=None) for f in EPOCH_FIGURES]  # a split of one class: AUROC is None
    records, flags, state, _ = run_scripted_epochs(monkeypatch, single_class, select_by="auroc")
    assert flags == [True, False, False] and state.best_epoch == 1 and state.best_score == 0.90
    assert [r["val"]["selected_by"] for r in records] == ["accuracy"] * 3
    assert json.loads(json.dumps(records[0]))["val"]["auroc"] is None  # written as null


@pytest.mark.parametrize("options, size", [(dict(batch=16, select_by="accuracy"), 32),
                                           (dict(batch=16, eval_batch=256, select_by="accuracy"), 256)])
def test_validation_batch_is_eval_batch_else_twice_the_batch(monkeypatch, options, size):
    *_, batch_sizes = run_scripted_epochs(monkeypatch, EPOCH_FIGURES[:1], **options)
    assert batch_sizes == [size]


def tiny(shards, out, **overrides) -> TrainConfig:
    options = dict(shards=str(shards), out=str(out), arch="simple-cnn", epochs=1, batch=32, lr=0.05, workers=0, device="cpu")
    return TrainConfig(**{**options, **overrides})


def test_training_by_worst_group_keeps_the_epoch_with_the_best_worst_group(tiny_shards, tmp_path):
    document = train(tiny(tiny_shards, tmp_path / "run", epochs=3, select_by="worst_group", eval_batch=8))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val"]["selected_by"] for r in records] == ["worst_group_accuracy"] * 3
    worst = [r["val"]["worst_group_accuracy"] for r in records]
    best = worst.index(max(worst)) + 1  # the first epoch reaching the maximum
    assert document["best_epoch"] == best == load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"]
    assert set(records[0]["val"]) == {"accuracy", "loss", "worst_group_accuracy", "mean_group_accuracy", "auroc",
                                      "split", "selected_by"}


def shards_with_val(tiny_shards, tmp_path, groups):
    """A copy of the tiny shards whose val manifest lists `groups` (None: no val split at all)."""
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    if groups is None:
        shutil.rmtree(root / "val")
    else:
        info = json.loads((root / "val" / "_info.json").read_text())
        (root / "val" / "_info.json").write_text(json.dumps({**info, "groups": groups}))
    return root


@pytest.mark.parametrize("groups, message", [
    (["disk/land"], "holds 1 group(s) ('disk/land'); it needs two or more, else use --select-by accuracy"),
    ([], "holds 0 group(s) (none); it needs two or more, else use --select-by accuracy"),
    (None, "has no validation split (val or *val) with samples"),
])
def test_select_by_worst_group_is_refused_without_groups_to_compare(tiny_shards, tmp_path, groups, message):
    root = shards_with_val(tiny_shards, tmp_path, groups)
    result = CliRunner().invoke(cli, ["train", "--shards", str(root), "--out", str(tmp_path / "run"), "--arch",
                                      "simple-cnn", "--workers", "0", "--select-by", "worst_group"])
    assert result.exit_code == 1
    where = f"{root}/val " if groups is not None else f"{root} "
    assert result.output == f"Error: --select-by worst_group: {where}{message}\n"
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.parametrize("option, value, message", [
    ("plateau_patience", -1, "--plateau-patience -1: must be 0 (decay after every epoch without progress) or more epochs"),
    ("eval_batch", -2, "--eval-batch -2: must be 0 (twice --batch) or more images"),
    ("select_by", "loss", "--select-by 'loss': choose one of auto, accuracy, auroc, worst_group"),
    ("reg_measure", "shares", "--reg-measure 'shares': choose one of share, raw"),
    ("object_region", "boxes", "--object-region 'boxes': choose one of mask, box"),
])
def test_bad_selection_and_schedule_options_are_refused_in_one_line(tiny_shards, tmp_path, option, value, message):
    with pytest.raises(UserError) as caught:
        train(tiny(tiny_shards, tmp_path / "run", **{option: value}))
    assert str(caught.value) == message


@pytest.mark.parametrize("pretrained, warned", [([], True), (["--pretrained", "weights.pt"], False)])
def test_a_preset_without_pretrained_weights_is_warned_about(monkeypatch, tmp_path, pretrained, warned):
    configs = []
    monkeypatch.setattr(train_module, "train", lambda config: configs.append(config) or {"splits": {}, "best_epoch": 0})
    result = CliRunner().invoke(cli, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "run"),
                                      "--preset", "waterbirds", *pretrained])
    assert result.exit_code == 0, result.output
    assert configs[0].arch == "bit-s-r50x1"
    warning = ("warning: --preset waterbirds without --pretrained trains bit-s-r50x1 from random weights; "
               "the paper starts from ImageNet weights (--pretrained FILE)\n")
    assert result.stderr == (warning if warned else "")
