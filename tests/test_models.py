"""Model zoo and initial weights: forward shapes, BiT .npz loading, state dicts, torchvision's cache.

Weights are made by the tests (no network here): an .npz written with the official BiT key names.
"""

from __future__ import annotations

from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfrobust.errors import UserError
from cfrobust.trainer.bit import StdConv2d, bit_s_r50x1, load_bit_npz
from cfrobust.trainer.models import build_model, load_pretrained, resolve_arch

ARCHS = ["simple-cnn", "resnet18", "resnet34", "resnet50", "bit-s-r50x1"]


@pytest.mark.parametrize("num_classes", [3, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_classifies_32_and_64_px(arch, num_classes):
    model = build_model(arch, num_classes).eval()
    with torch.no_grad():
        for size in (32, 64):
            assert model(torch.randn(2, 3, size, size)).shape == (2, num_classes)


def official_bit_r50x1_shapes(head_size: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every key the official `load_from` reads for BiT-S-R50x1, with its TensorFlow (HWIO) shape."""
    shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, 64)}
    c_in = 64
    for block, units in enumerate((3, 4, 6, 3), start=1):
        mid = 64 * 2 ** (block - 1)
        for unit in range(1, units + 1):
            p = f"resnet/block{block}/unit{unit:02d}/"
            shapes.update({
                p + "a/group_norm/gamma": (c_in,), p + "a/group_norm/beta": (c_in,),
                p + "a/standardized_conv2d/kernel": (1, 1, c_in, mid),
                p + "b/group_norm/gamma": (mid,), p + "b/group_norm/beta": (mid,),
                p + "b/standardized_conv2d/kernel": (3, 3, mid, mid),
                p + "c/group_norm/gamma": (mid,), p + "c/group_norm/beta": (mid,),
                p + "c/standardized_conv2d/kernel": (1, 1, mid, 4 * mid),
            })
            if unit == 1:
                shapes[p + "a/proj/standardized_conv2d/kernel"] = (1, 1, c_in, 4 * mid)
            c_in = 4 * mid
    shapes.update({
        "resnet/group_norm/gamma": (2048,), "resnet/group_norm/beta": (2048,),
        "resnet/head/conv2d/kernel": (1, 1, 2048, head_size), "resnet/head/conv2d/bias": (head_size,),
    })
    return shapes


@pytest.fixture(scope="module")
def bit_npz(tmp_path_factory):
    """A full-size BiT-S-R50x1.npz of random float32 arrays (~25M values, ~100 MB) and its arrays."""
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in official_bit_r50x1_shapes().items()}
    path = tmp_path_factory.mktemp("bit") / "BiT-S-R50x1.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_bit_npz_weights_land_transposed_in_their_modules(bit_npz):
    path, arrays = bit_npz
    model = bit_s_r50x1(3)
    info = load_bit_npz(model, path)
    assert info["skipped"] == ["head.conv.weight", "head.conv.bias"]
    assert len(info["loaded"]) == len(arrays) - 2 == len(list(model.parameters())) - 2
    root = arrays["resnet/root_block/standardized_conv2d/kernel"]
    assert model.root.conv.weight.shape == (64, 3, 7, 7)
    assert torch.equal(model.root.conv.weight, torch.from_numpy(root).permute(3, 2, 0, 1))
    kernel_3x3 = arrays["resnet/block4/unit03/b/standardized_conv2d/kernel"]  # HWIO: [h, w, in, out]
    assert model.body.block4.unit03.conv_b.weight[7, 5, 2, 0] == torch.tensor(kernel_3x3[2, 0, 5, 7])
    proj = arrays["resnet/block3/unit01/a/proj/standardized_conv2d/kernel"]
    assert torch.equal(model.body.block3.unit01.proj.weight[:, :, 0, 0], torch.from_numpy(proj[0, 0].T))
    beta = arrays["resnet/block2/unit04/c/group_norm/beta"]
    assert torch.equal(model.body.block2.unit04.norm_c.bias, torch.from_numpy(beta))
    gamma = arrays["resnet/block1/unit02/a/group_norm/gamma"]
    assert torch.equal(model.body.block1.unit02.norm_a.weight, torch.from_numpy(gamma))
    assert torch.equal(model.head.norm.weight, torch.from_numpy(arrays["resnet/group_norm/gamma"]))
    # The fresh head starts at zero as in BiT fine-tuning, so the first logits are all 0.
    assert not model.head.conv.weight.any() and not model.head.conv.bias.any()
    with torch.no_grad():
        assert torch.equal(model.eval()(torch.randn(2, 3, 64, 64)), torch.zeros(2, 3))


def test_bit_npz_keeps_the_head_when_sizes_match(bit_npz):
    path, arrays = bit_npz
    model = build_model("bit-s-r50x1", 1000, pretrained=str(path)).eval()
    head = arrays["resnet/head/conv2d/kernel"]
    assert torch.equal(model.head.conv.weight[:, :, 0, 0], torch.from_numpy(head[0, 0].T))
    assert torch.equal(model.head.conv.bias, torch.from_numpy(arrays["resnet/head/conv2d/bias"]))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all() and logits.abs().sum() > 0


def test_bit_npz_missing_key_is_named(tmp_path):
    # Tiny arrays suffice: every key is checked for presence before any shape is read.
    keys = [k for k in official_bit_r50x1_shapes() if k != "resnet/block2/unit03/b/group_norm/gamma"]
    path = tmp_path / "partial.npz"
    np.savez(path, **{k: np.zeros(1, np.float32) for k in keys})
    with pytest.raises(UserError, match=r"missing key 'resnet/block2/unit03/b/group_norm/gamma' \(not an official"):
        load_bit_npz(bit_s_r50x1(3), path)


def test_npz_is_for_bit_only_and_must_exist(tmp_path):
    with pytest.raises(UserError, match=r"a BiT \.npz file needs --arch bit-s-r50x1, not 'resnet18'"):
        build_model("resnet18", 3, pretrained=str(tmp_path / "BiT-S-R50x1.npz"))
    with pytest.raises(UserError, match=r"nope\.npz: no such file"):
        load_bit_npz(bit_s_r50x1(3), tmp_path / "nope.npz")


def test_std_conv_standardises_each_output_channel_by_hand():
    conv = StdConv2d(1, 3, kernel_size=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2, 3, 4], [2, 2, 2, 6], [5, 5, 5, 5]]).view(3, 1, 2, 2))
    # Means 2.5, 3, 5; population variances 1.25, 3, 0 (eps 1e-10 keeps the constant channel at 0, not NaN).
    expected = torch.stack([
        torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 1.25**0.5,
        torch.tensor([-1.0, -1.0, -1.0, 3.0]) / 3**0.5,
        torch.zeros(4),
    ])
    x = torch.randn(1, 1, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, expected.view(3, 1, 2, 2)), atol=1e-5)
    picks_top_left = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert conv(picks_top_left).flatten().tolist() == pytest.approx([-1.5 / 1.25**0.5, -1 / 3**0.5, 0.0])


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "checkpoint"])
def test_state_dict_loads_body_and_skips_a_head_of_another_size(tmp_path, wrap):
    source = build_model("resnet18", 4)
    state = source.state_dict()
    torch.save({"model": state, "epoch": 3} if wrap else state, tmp_path / "w.pt")
    model = build_model("resnet18", 3)
    info = load_pretrained(model, "resnet18", str(tmp_path / "w.pt"))
    assert info["skipped"] == ["fc.weight", "fc.bias"] and len(info["loaded"]) == len(state) - 2
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, state[name]), name
    assert model.fc.weight.shape == (3, 512)


def test_state_dict_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match=r"missing\.pt: no such file"):
        build_model("simple-cnn", 3, pretrained=str(tmp_path / "missing.pt"))
    torch.save(build_model("simple-cnn", 3).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(UserError, match=r"not weights of this architecture \(missing: conv1\.weight, bn1\.weight"):
        build_model("resnet18", 3, pretrained=str(tmp_path / "cnn.pth"))
    with pytest.raises(UserError, match=r"expected '', 'torchvision', a \.pt/\.pth state dict or a BiT \.npz"):
        build_model("simple-cnn", 3, pretrained="weights.bin")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that refuses every download (no test hangs on it)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def refuse(url, *args, **kwargs):
        raise URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path


def test_torchvision_weights_offline_say_which_file_to_place_where(offline_hub):
    with pytest.raises(UserError) as error:
        build_model("resnet18", 3, pretrained="torchvision")
    message = str(error.value)
    assert "\n" not in message
    assert "no network in tests" in message
    assert f"place resnet18-f37072fd.pth from https://download.pytorch.org/models/resnet18-f37072fd.pth " \
           f"in {offline_hub / 'checkpoints'}/" in message
    (offline_hub / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"torn download")
    with pytest.raises(UserError, match=r"unreadable torchvision resnet18 weights .+: replace .+/resnet18-f37072fd"):
        build_model("resnet18", 3, pretrained="torchvision")


def test_torchvision_weights_come_from_the_cache_with_a_fresh_head(offline_hub):
    imagenet = build_model("resnet18", 1000).state_dict()
    (offline_hub / "checkpoints").mkdir(exist_ok=True)
    torch.save(imagenet, offline_hub / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model("resnet18", 1000, pretrained="torchvision")
    assert torch.equal(model.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    assert torch.equal(model.bn1.running_var, imagenet["bn1.running_var"])
    # Even at 1000 classes the ImageNet head is replaced: torchvision weights are a backbone here.
    assert not torch.equal(model.fc.weight, imagenet["fc.weight"])
    with pytest.raises(UserError, match=r"torchvision is for resnet18, resnet34, resnet50, not 'bit-s-r50x1'"):
        build_model("bit-s-r50x1", 3, pretrained="torchvision")


def test_arch_auto_is_the_net_the_weights_are_for_and_simple_cnn_without_weights(tmp_path):
    assert resolve_arch("auto", "") == "simple-cnn"
    assert resolve_arch("auto", "torchvision") == "resnet50"
    assert resolve_arch("auto", "weights/BiT-S-R50x1.NPZ") == "bit-s-r50x1"  # not read: the suffix says it
    assert resolve_arch("resnet18", "") == "resnet18"  # a named architecture is kept as it is
    for arch in ("simple-cnn", "resnet18", "resnet34"):
        path = tmp_path / f"{arch}.pt"
        torch.save({"model": build_model(arch, 7).state_dict(), "config": {}}, path)  # a checkpoint's layout
        assert resolve_arch("auto", str(path)) == arch
    bare = tmp_path / "resnet50.pth"
    state = build_model("resnet50", 3).state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, bare)  # torchvision's files lack them
    assert resolve_arch("auto", str(bare)) == "resnet50"
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match=r"foreign.pt: its weights fit none of simple-cnn, resnet18, resnet34, "
                                        r"resnet50, bit-s-r50x1; name the architecture with --arch"):
        resolve_arch("auto", str(foreign))
