"""The CUDA paths: training under each precision, the terms on the device against the CPU, and
eval on the device. Skipped without a GPU; `bench/gpu_check.sh` runs them on a lent one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cfrobust.cli.main import cli
from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.train import check_fp16_saliency, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RUNS = [
    dict(),
    dict(cf="tile", f="mrand", reg="bbox_o"),
    dict(cf="tile", f="mrand", reg="bbox_o", reg_impl="finite-diff"),
    dict(cf="tile", cf_online=True, f="pgd", f_steps=2),
    dict(f="fgsm", reg="bbox_o", reg_grad="grad_cam"),
    dict(reg="gs", cf="cagan", reg_grad="deeplift"),
]


@pytest.mark.parametrize("precision", ["32", "bf16", "16"])
@pytest.mark.parametrize("options", RUNS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "erm")
def test_training_on_the_gpu_keeps_every_term_finite(tiny_shards, tmp_path, precision, options):
    config = TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), arch="simple-cnn", epochs=1, batch=32,
                         lr=0.05, workers=2, device="cuda", precision=precision, **options)
    if precision == "16" and options.get("reg"):
        try:
            check_fp16_saliency(config)
        except UserError as refusal:
            pytest.skip(str(refusal))
    document = train(config)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2  # 2 loader workers, each 3 shards of 16: one batch of 32
    assert all(math.isfinite(v) for v in record["terms"].values())
    assert set(document["splits"]) == {"val", "test"}


def _batch(device: str) -> Batch:
    generator = torch.Generator().manual_seed(1)
    batch = Batch(
        images=torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator),
        labels=torch.tensor([i % 2 for i in range(8)]),
        boxes=torch.tensor([[[6.0, 4.0, 26.0, 20.0]]] * 8),
        box_valid=torch.ones(8, 1, dtype=torch.bool),
        cf={"tile": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)},
    )
    return batch.to(torch.device(device))


def _model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


@pytest.mark.parametrize("reg, reg_grad", [("bbox_o", "grad_y"), ("bbox_f1", "grad_logp_sum"), ("gs", "grad_sum")])
def test_the_terms_in_fp32_on_the_gpu_equal_those_on_the_cpu(reg, reg_grad):
    # Deterministic terms only (offline CF, no random augmentation): the two devices' RNGs differ.
    # cuDNN without TF32, which would round the convolutions' inputs to 10 bits of mantissa.
    config = TrainConfig(cf="tile", reg=reg, reg_grad=reg_grad, reg_coeff=10.0)
    found = {}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False, deterministic=True):
        for device in ("cpu", "cuda"):
            model = _model().to(device)
            terms, _ = Objective(config, torch.Generator(device).manual_seed(0))(model, _batch(device))
            sum(terms.values()).backward()
            found[device] = ({k: v.item() for k, v in terms.items()}, model[5].weight.grad.cpu())
    for name, value in found["cpu"][0].items():
        assert found["cuda"][0][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    torch.testing.assert_close(found["cuda"][1], found["cpu"][1], rtol=1e-3, atol=1e-6)


def test_eval_on_the_gpu_scores_as_on_the_cpu(tiny_shards, tmp_path):
    config = TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), arch="simple-cnn", epochs=1, batch=32,
                         workers=0, device="cpu")
    train(config)
    scored = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"eval-{device}.json"
        result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"),
                                          "--shards", str(tiny_shards), "--out", str(out), "--device", device])
        assert result.exit_code == 0, result.output
        scored[device] = json.loads(out.read_text())["splits"]
    for split, figures in scored["cpu"].items():
        assert scored["cuda"][split]["accuracy"] == figures["accuracy"], split
        assert scored["cuda"][split]["loss"] == pytest.approx(figures["loss"], rel=1e-4), split
