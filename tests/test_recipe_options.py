"""Options of the robust-by-default recipe: bbox_o measured as a share of the saliency energy, and
the group-balanced ERM reference (--balance-groups)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cfrobust.shards.reader import Batch
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.factual import mrand
from cfrobust.trainer.objective import Objective, regularizer
from cfrobust.trainer.saliency import input_gradient, outside_box_penalty, outside_share_penalty, target_logit
from cfrobust.trainer.train import balanced_group_weights


def test_share_is_the_energy_outside_over_all_of_it_averaged_over_boxed_samples():
    grads = torch.zeros(3, 3, 4, 4)
    region = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    region[:, :, 1:3, 1:3] = True
    grads[0, 0, 1, 1], grads[0, 1, 0, 0], grads[0, 2, 3, 2] = 5.0, 2.0, 1.0  # 25 inside, 4 + 1 outside
    grads[1, 0, 0, 0] = 3.0  # all outside: share 1
    grads[2, 0, 0, 0] = 7.0  # no box: not counted
    penalty = outside_share_penalty(grads, region, torch.tensor([True, True, False]))
    assert penalty.item() == pytest.approx((5 / 30 + 1.0) / 2)
    assert outside_share_penalty(torch.zeros(1, 3, 4, 4), region[:1], torch.tensor([True])).item() == 0.0


def test_share_does_not_change_with_the_input_scale_or_the_image_size_where_raw_does():
    torch.manual_seed(0)
    weight = torch.randn(1, 3, 8, 8)
    region = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    region[..., 2:6, 3:7] = True
    has_box = torch.tensor([True])
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    base = input_gradient((x * weight).sum(dim=(1, 2, 3))[:, None], x, torch.tensor([0]), target_logit)
    # The same model on inputs scaled by 4 (another normalisation's std): its gradient is 1/4.
    scaled = (4 * x.detach()).requires_grad_(True)
    by_scale = input_gradient((scaled / 4 * weight).sum(dim=(1, 2, 3))[:, None], scaled, torch.tensor([0]), target_logit)
    # The same model on the image at twice the side (it averages 2x2 pixels first): gradient / 4 per pixel.
    big = F.interpolate(x.detach(), scale_factor=2, mode="nearest").requires_grad_(True)
    by_size = input_gradient((F.avg_pool2d(big, 2) * weight).sum(dim=(1, 2, 3))[:, None], big, torch.tensor([0]), target_logit)
    big_region = F.interpolate(region.float(), scale_factor=2, mode="nearest").bool()
    share = outside_share_penalty(base, region, has_box).item()
    assert 0 < share < 1
    assert outside_share_penalty(by_scale, region, has_box).item() == pytest.approx(share, rel=1e-5)
    assert outside_share_penalty(by_size, big_region, has_box).item() == pytest.approx(share, rel=1e-5)
    raw = outside_box_penalty(base, region, has_box).item()
    assert outside_box_penalty(by_scale, region, has_box).item() == pytest.approx(raw / 16, rel=1e-5)
    assert outside_box_penalty(by_size, big_region, has_box).item() == pytest.approx(raw / 16, rel=1e-5)


def test_reg_measure_picks_the_penalty_of_bbox_o_only():
    assert regularizer(TrainConfig(reg="bbox_o")) is outside_share_penalty  # the default
    assert regularizer(TrainConfig(reg="bbox_o", reg_measure="raw")) is outside_box_penalty
    assert regularizer(TrainConfig(reg="bbox_f1")).__name__ == "bbox_f1_penalty"
    assert regularizer(TrainConfig()) is None


def test_balanced_group_weights_give_every_group_the_same_total():
    weights = balanced_group_weights({"group_counts": {"a/x": 90, "a/y": 10, "b/x": 0}})
    assert weights == pytest.approx({"a/x": 100 / 180, "a/y": 5.0})
    assert 90 * weights["a/x"] == pytest.approx(10 * weights["a/y"])


def test_balanced_ce_weighs_each_image_by_its_group():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    batch = Batch(images=torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8), labels=torch.tensor([0, 1, 1]),
                  boxes=torch.zeros(3, 1, 4), box_valid=torch.zeros(3, 1, dtype=torch.bool), groups=["a", "b", "a"],
                  keys=["0", "1", "2"])
    weights = {"a": 0.5, "b": 3.0}
    terms, logits = Objective(TrainConfig(balance_groups=True), group_weights=weights)(model, batch)
    per_image = F.cross_entropy(logits, batch.labels, reduction="none")
    assert terms["ce"].item() == pytest.approx(((0.5 * per_image[0] + 3.0 * per_image[1] + 0.5 * per_image[2]) / 3).item())


def pairing(num_classes: int, **options) -> tuple[str, str]:
    config = TrainConfig(**{"f": "mrand", **options}).with_factual_pairing(num_classes)
    return config.f_partner, config.f_weight


def test_factual_pairing_auto_is_any_in_place_of_the_original_on_two_classes_else_other_class_at_k_minus_one():
    assert pairing(2) == ("any", "replace")
    assert (pairing(3), pairing(4), pairing(1)) == (("other-class", "2"), ("other-class", "3"), ("other-class", "1"))
    assert pairing(2, f_partner="other-class") == ("other-class", "1")  # the official pairing: weight 1 on two classes
    assert pairing(4, f_partner="any") == ("any", "replace")
    assert pairing(2, f_weight="2.5") == ("any", "2.5")
    assert pairing(2, f="random") == ("any", "1")  # replace only where mrand pastes on any image's background
    assert TrainConfig(f="mrand").with_factual_pairing(2).with_factual_pairing(4) == TrainConfig(
        f="mrand", f_partner="any", f_weight="replace", f_erode="blend")  # resolved once, kept: a recorded run reads back as it trained
    assert Objective(TrainConfig(f="mrand"), num_classes=2).replaces_originals
    assert not Objective(TrainConfig(f="mrand"), num_classes=4).replaces_originals
    with pytest.raises(ValueError, match="num_classes"):  # mrand cannot pick a partner without knowing K
        mrand(torch.zeros(2, 3, 4, 4), torch.ones(2, 1, 4, 4, dtype=torch.bool), torch.tensor([0, 1]),
              config=TrainConfig(f="mrand"))


def test_factual_weight_auto_is_classes_minus_one_and_the_ce_weighs_factual_rows_by_it():
    assert Objective(TrainConfig(f="mrand", f_weight="auto"), num_classes=4).factual_weight() == 3.0
    assert Objective(TrainConfig(f="mrand", f_partner="other-class"), num_classes=2).factual_weight() == 1.0  # official
    assert Objective(TrainConfig(f="mrand", f_weight="auto"), num_classes=1).factual_weight() == 1.0
    assert Objective(TrainConfig(f="mrand", f_weight="2.5"), num_classes=4).factual_weight() == 2.5
    # Without num_classes, auto reads K from the logits (cf-loss channels: 2K outputs, K classes).
    assert Objective(TrainConfig(f="mrand", f_weight="auto", cf="tile", cf_loss="channels")).factual_weight(torch.zeros(2, 10)) == 4.0
    objective = Objective(TrainConfig(f="mrand", f_weight="auto"), num_classes=4)
    logits = {"x": torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), "f": torch.tensor([[0.0, 0.0, 3.0, 0.0]])}
    y, has_box = torch.tensor([0, 2]), torch.tensor([False, True])
    x_losses = F.cross_entropy(logits["x"], y, reduction="none")
    f_loss = F.cross_entropy(logits["f"], y[has_box])
    expected = (x_losses.sum() + 3 * f_loss) / (2 + 3)
    assert objective._cross_entropy(logits, y, has_box, None, None).item() == pytest.approx(expected.item())
    batch = Batch(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels=y, boxes=torch.zeros(2, 1, 4),
                  box_valid=has_box[:, None], groups=["a", "b"], keys=["0", "1"])
    assert objective.rows_per_term(batch)["ce"].item() == 2 + 3 * 1  # the CE's denominator, for --batch-split


def test_f_weight_replace_trains_a_boxed_image_by_its_factual_alone_and_an_unboxed_one_by_itself():
    objective = Objective(TrainConfig(f="mrand", f_weight="replace"), num_classes=4)
    logits = {"x": torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]),
              "f": torch.tensor([[0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0]])}
    y, has_box = torch.tensor([0, 2, 3]), torch.tensor([False, True, True])
    expected = (F.cross_entropy(logits["x"][:1], y[:1], reduction="sum")
                + F.cross_entropy(logits["f"], y[1:], reduction="sum")) / 3
    assert objective._cross_entropy(logits, y, has_box, None, None).item() == pytest.approx(expected.item())
    batch = Batch(images=torch.zeros(3, 3, 4, 4, dtype=torch.uint8), labels=y, boxes=torch.zeros(3, 1, 4),
                  box_valid=has_box[:, None], groups=["a", "b", "c"], keys=["0", "1", "2"])
    assert objective.rows_per_term(batch)["ce"].item() == 3  # one CE row per image


def test_train_records_the_pairing_auto_stood_for_and_resumes_by_it(tiny_shards, tmp_path):
    from cfrobust.trainer.train import train

    options = dict(shards=str(tiny_shards), out=str(tmp_path / "run"), arch="simple-cnn", batch=32, workers=0,
                   device="cpu", quiet=True, f="mrand", epochs=1)
    train(TrainConfig(**options))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["f_partner"], recorded["f_weight"]) == ("any", "replace")  # the built-in data has two classes
    train(TrainConfig(**options, resume=True))  # auto again resolves alike: not refused as a change of options
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_run_that_recorded_f_weight_auto_resumes_with_the_pairing_it_trained():
    from cfrobust.trainer.train import changed_options, recorded_options

    before = {**TrainConfig(f="mrand").to_dict(), "f_partner": "other-class", "f_weight": "auto",
              "f_erode": "0"}  # as saved before eb8b046
    checkpoint = {"config": before, "classes": ["a", "b"]}
    official = TrainConfig(f="mrand", f_partner="other-class").with_factual_pairing(2)
    assert (recorded_options(checkpoint)["f_partner"], recorded_options(checkpoint)["f_weight"]) == ("other-class", "1")
    assert changed_options(recorded_options(checkpoint), official) == []
    assert changed_options(recorded_options(checkpoint), TrainConfig(f="mrand").with_factual_pairing(2)) == [
        "f_erode", "f_partner", "f_weight"]  # today's default pairing is another run: refused, and the refusal names it


def test_f_weight_must_be_auto_or_positive(tiny_shards):
    from cfrobust.errors import UserError
    from cfrobust.trainer.train import check_config

    info = json.loads((tiny_shards / "train" / "_info.json").read_text())
    for bad in ("0", "-1", "many"):
        with pytest.raises(UserError, match=f"--f-weight {bad}: must be auto, replace or a number above 0"):
            check_config(TrainConfig(shards=str(tiny_shards), f="mrand", f_weight=bad), info)


def test_f_erode_scaled_is_one_pixel_per_64_of_the_side_and_auto_follows_the_pairing(tiny_shards):
    from cfrobust.errors import UserError
    from cfrobust.trainer.train import check_config

    assert [TrainConfig(f_erode="scaled").f_erode_pixels(side) for side in (16, 64, 96, 128, 224)] == [1, 1, 2, 2, 4]
    assert [TrainConfig(f_erode=n).f_erode_pixels(224) for n in ("0", "3")] == [0, 3]
    # auto: blend where mrand pastes on any image's background (two classes), the mask as it is
    # under other-class partners (more classes, or named) and for the other factual modes.
    assert TrainConfig().f_erode == "auto"
    assert TrainConfig(f="mrand").with_factual_pairing(2).f_erode == "blend"
    assert TrainConfig(f="mrand").with_factual_pairing(4).f_erode == "0"
    assert TrainConfig(f="mrand", f_partner="other-class").with_factual_pairing(2).f_erode == "0"
    assert TrainConfig(f="mrand", f_partner="any").with_factual_pairing(4).f_erode == "blend"
    assert TrainConfig(f="random").with_factual_pairing(2).f_erode == "0"
    assert TrainConfig(f="mrand", f_erode="3").with_factual_pairing(2).f_erode == "3"  # named: kept
    for unresolved in ("auto", "blend"):
        with pytest.raises(ValueError, match=f"--f-erode {unresolved} is no width"):
            TrainConfig(f_erode=unresolved).f_erode_pixels(224)
    info = json.loads((tiny_shards / "train" / "_info.json").read_text())
    for good in ("auto", "blend", "scaled", "2"):
        check_config(TrainConfig(shards=str(tiny_shards), f="mrand", f_erode=good), info)
    for bad in ("-1", "1.5", "some"):
        with pytest.raises(UserError, match=f"--f-erode {bad}: must be auto, blend, scaled or a whole number of pixels"):
            check_config(TrainConfig(shards=str(tiny_shards), f="mrand", f_erode=bad), info)


def test_select_by_auto_is_worst_group_where_groups_carry_more_than_the_class(tiny_shards, tmp_path):
    from cfrobust.trainer.train import resolved_selection

    assert resolved_selection(TrainConfig(shards=str(tiny_shards)), "val") == "worst_group"  # disk/land, ...
    assert resolved_selection(TrainConfig(shards=str(tiny_shards), select_by="auroc"), "val") == "auroc"
    assert resolved_selection(TrainConfig(shards=str(tiny_shards)), None) == "accuracy"
    classes_only = tmp_path / "val"
    classes_only.mkdir()
    info = json.loads((tiny_shards / "val" / "_info.json").read_text())
    (classes_only / "_info.json").write_text(json.dumps({**info, "groups": info["classes"]}))
    assert resolved_selection(TrainConfig(shards=str(tmp_path)), "val") == "accuracy"  # IN-9: groups are classes


def test_a_config_recorded_before_an_option_existed_reads_as_those_runs_trained():
    from cfrobust.trainer.train import changed_options

    old = {k: v for k, v in TrainConfig(reg="bbox_o").to_dict().items()
           if k not in ("object_region", "reg_measure", "select_by", "f_weight", "f_partner", "f_erode")}
    recorded = TrainConfig.from_dict(old)
    assert (recorded.object_region, recorded.reg_measure, recorded.select_by) == ("box", "raw", "accuracy")
    assert (recorded.f_weight, recorded.f_partner, recorded.f_erode) == ("1", "other-class", "0")
    assert recorded.describe() == "Sal(bbox_o raw, grad_y, λ=0.1)"
    assert changed_options(old, TrainConfig(reg="bbox_o")) == ["f_erode", "f_partner", "f_weight", "object_region", "reg_measure",
                                                               "select_by"]
    assert changed_options(old, recorded) == []


def test_the_method_name_spells_out_a_factual_pairing_that_is_not_the_official_one():
    recipe = TrainConfig(cf="tile", f="mrand", reg="bbox_o")
    assert recipe.describe() == "CF(tile, uni, 0.5) + F(mrand, partner auto, weight auto, erode auto) + Sal(bbox_o, grad_y, λ=0.1)"
    assert recipe.with_factual_pairing(2).describe() == "CF(tile, uni, 0.5) + F(mrand, any, replace, blend edge) + Sal(bbox_o, grad_y, λ=0.1)"
    assert recipe.with_factual_pairing(4).describe() == "CF(tile, uni, 0.5) + F(mrand, weight 3) + Sal(bbox_o, grad_y, λ=0.1)"
    official = TrainConfig(f="mrand", f_partner="other-class", f_weight="1").with_factual_pairing(2)
    assert official.describe() == "F(mrand)"
    assert TrainConfig(f="mrand", f_partner="other-class", f_erode="scaled").with_factual_pairing(2).describe() == \
        "F(mrand, erode scaled)"
    # The partner means nothing to other factual modes; their weight still does.
    assert TrainConfig(f="random", f_partner="any", f_weight="2").with_factual_pairing(2).describe() == "F(random, weight 2)"


def test_online_mean_fills_the_imagenet_mean_colour_under_either_normalisation():
    from cfrobust.trainer.fills import online_mean, pixel_units
    from cfrobust.trainer.pixels import using_normalization

    holes = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    for name in ("imagenet", "bit"):
        with using_normalization(name):
            filled = pixel_units(online_mean(torch.zeros(1, 3, 2, 2), holes))
        assert torch.allclose(filled[0, :, 0, 0], torch.tensor([0.485, 0.456, 0.406]), atol=1e-6)
