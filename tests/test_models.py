"""Tests of covidscan.models: backbones, weights, heads, train modes, BPNN, Grad-CAM target."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from pydantic import ValidationError
from torch import nn
from torchvision.models import WeightsEnum

from covidscan.errors import ConfigError, WeightsNotFoundError
from covidscan.models import (
    BPNN,
    ModelConfig,
    build_backbone,
    build_model,
    count_parameters,
    gradcam_target_layer,
    torchvision_checkpoint_path,
    weights as weights_module,
)

SMALL = 64
CORAL = "weights/mobilenet_v2_imagenet_coral_dequant.pth"
LITE0 = "weights/tf_efficientnet_lite0_imagenet.pth"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No downloads, and empty private torch.hub / Hugging Face caches."""
    monkeypatch.setenv("COVIDSCAN_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def small(**kwargs) -> nn.Module:
    settings = {"backbone": "timm:resnet18", "weights": "none", "head": "linear", "input_size": SMALL}
    return build_model({**settings, **kwargs})


def batch(n: int = 2, size: int = SMALL, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("head", ["paper_a", "paper_b", "linear"])
def test_heads_give_two_logits_and_features_split_the_forward(head):
    model = small(head=head).eval()
    x = batch()
    feats = model.features(x)
    assert feats.shape == (2, 512, 2, 2)
    logits = model(x)
    assert logits.shape == (2, 2)
    assert torch.equal(model.head_forward(feats), logits)


def test_paper_a_head_is_in_published_order_with_dropout_last():
    model = small(head="paper_a")
    head = model.head
    published = [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.Dropout]
    assert [type(m) for m in head] == published
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (512, 256, 2)
    assert head.dropout.p == 0.3
    custom = small(head="paper_a", hidden=[64], dropout=0.5).head
    assert (custom.fc1.out_features, custom.dropout.p) == (64, 0.5)
    # Dropout acts on the logits in training mode only.
    model.train()
    torch.manual_seed(0)
    assert (model(batch(16)) == 0).any()
    model.eval()
    assert not (model(batch(16)) == 0).any()


@pytest.mark.parametrize(("pooling", "width"), [("avg", 512), ("max", 512), ("avgmax", 1024)])
@pytest.mark.parametrize("head", ["paper_a", "linear"])
def test_pooled_heads_pool_the_map_as_set(head, pooling, width):
    model = small(head=head, pooling=pooling).eval()
    x = batch()
    fmap = model.features(x)
    avg, peak = fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))
    expected = {"avg": avg, "max": peak, "avgmax": torch.cat([avg, peak], dim=1)}[pooling]
    embedded = model.embed(x)
    assert embedded.shape == (2, width)
    torch.testing.assert_close(embedded, expected)
    linear = next(m for m in model.head if isinstance(m, nn.Linear))
    assert linear.in_features == width
    with torch.no_grad():
        torch.testing.assert_close(model.head_tail(embedded), model(x))


@pytest.mark.parametrize("head", ["paper_b", "bpnn"])
def test_pooling_other_than_avg_is_refused_for_heads_that_do_not_pool(head):
    backbone = "pixels" if head == "bpnn" else "timm:resnet18"
    refused = r"model\.pooling='avgmax' needs a head that pools.*set model\.pooling=avg"
    with pytest.raises(ConfigError, match=refused):
        small(backbone=backbone, head=head, pooling="avgmax")
    with pytest.raises(ValidationError, match="pooling"):
        ModelConfig(backbone="timm:resnet18", head="linear", pooling="mean")


def test_paper_b_head_flattens_the_whole_map_into_512_256_2():
    model = small(backbone="mobilenet_v2", head="paper_b")
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1280 * 2 * 2, 512), (512, 256), (256, 2)]
    assert [type(m) for m in model.head] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_linear_head_and_parameter_counts():
    model = small(head="linear")
    assert [type(m) for m in model.head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    trainable, total = count_parameters(model)
    assert trainable == 512 * 2 + 2
    assert total == trainable + sum(p.numel() for p in model.backbone.parameters())


def test_cross_entropy_on_logits_equals_categorical_cross_entropy_on_softmax():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.9]])
    target = torch.tensor([0, 1])
    one_hot = nn.functional.one_hot(target, 2).float()
    categorical = -(one_hot * logits.softmax(1).log()).sum(1).mean()
    assert torch.allclose(nn.functional.cross_entropy(logits, target), categorical)


# ---------------------------------------------------------------- train modes


def test_frozen_backbone_has_no_trainable_params_and_stays_in_eval():
    model = small(train_mode="frozen")
    assert trainable_names(model.backbone) == set()
    model.train()
    assert all(not m.training for m in model.backbone.body.modules())
    assert model.head.training
    bn = model.backbone.body.bn1
    before = bn.running_mean.clone()
    model(batch())
    assert torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("n", [1, 2])
def test_finetune_unfreezes_exactly_the_last_blocks(n):
    model = small(train_mode="finetune", unfreeze_last=n)
    blocks = model.backbone.blocks
    assert len(blocks) == 5  # timm resnet18: stem, layer1..layer4
    expected = {id(p) for block in blocks[-n:] for p in block.parameters()}
    got = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert got == expected and got
    model.train()
    # bn_frozen (default): every BatchNorm in eval; unfrozen convolutional blocks themselves train.
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert blocks[-1] is model.backbone.body.layer4
    assert model.backbone.body.layer4[0].conv1.training
    assert not model.backbone.body.conv1.training


def test_finetune_without_bn_frozen_trains_only_unfrozen_batchnorm():
    model = small(train_mode="finetune", unfreeze_last=1, bn_frozen=False).train()
    assert model.backbone.body.layer4[0].bn1.training
    assert not model.backbone.body.layer3[0].bn1.training


def test_full_mode_trains_everything_and_bad_unfreeze_counts_fail():
    model = small(train_mode="full", bn_frozen=False).train()
    assert count_parameters(model)[0] == count_parameters(model)[1]
    assert model.backbone.body.bn1.training
    for n in (0, 6):
        with pytest.raises(ConfigError, match=r"unfreeze_last=\d.*5 blocks"):
            small(train_mode="finetune", unfreeze_last=n)


# ---------------------------------------------------------------- torchvision weights


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """A seeded random torchvision ResNet50 state_dict (with its fc) standing in for the ImageNet file."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


def assert_backbone_matches(backbone, state: dict[str, torch.Tensor], drop: str) -> None:
    """The backbone holds exactly the file's non-classifier tensors, in the library's order."""
    expected = [v for k, v in state.items() if not k.startswith(drop)]
    got = list(backbone.state_dict().values())
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.slow
def test_resnet50_imagenet_loads_from_torch_hub_cache_and_from_a_path(resnet50_file, tmp_path):
    cached = torchvision_checkpoint_path(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(resnet50_file)
    state = torch.load(resnet50_file, weights_only=True)

    backbone = build_backbone("resnet50", "imagenet", (SMALL, SMALL))
    assert_backbone_matches(backbone, state, "fc.")
    assert backbone.out_channels == 2048 and backbone.mean == (0.485, 0.456, 0.406)
    assert len(backbone.blocks) == 5

    headless = tmp_path / "headless.pt"  # classifier keys absent is fine too
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    for source in (resnet50_file, headless):
        assert_backbone_matches(build_backbone("resnet50", str(source), (SMALL, SMALL)), state, "fc.")


def test_vgg19_imagenet_loads_from_cache_and_paper_b_sees_25088_features(tmp_path):
    # Keep it light: random tensors of the right shapes for the conv base only (the 123M-parameter classifier
    # may be absent), no random init (the meta device gives the shapes).
    with torch.device("meta"):
        shapes = torchvision.models.vgg19().features.state_dict()
    gen = torch.Generator().manual_seed(2)
    state = {f"features.{k}": torch.randn(v.shape, generator=gen) * 0.01 for k, v in shapes.items()}
    cached = torchvision_checkpoint_path(torchvision.models.VGG19_Weights.IMAGENET1K_V1)
    assert cached.name == "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)

    model = build_model({"backbone": "vgg19", "weights": "imagenet", "head": "paper_b"})  # 224 px
    assert_backbone_matches(model.backbone, state, "classifier.")
    assert model.backbone.feature_shape == (512, 7, 7)
    assert model.head.fc1.in_features == 25088
    assert len(model.backbone.blocks) == 5
    assert isinstance(gradcam_target_layer(model), nn.Sequential)


@pytest.mark.parametrize("switch", ["COVIDSCAN_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_without_cached_file_names_the_file_and_torch_home(tmp_path, monkeypatch, switch):
    monkeypatch.delenv("COVIDSCAN_OFFLINE")
    monkeypatch.setenv(switch, "1")
    with pytest.raises(WeightsNotFoundError, match="downloads are off") as info:
        build_backbone("resnet50", "imagenet", (SMALL, SMALL))
    message = str(info.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(expected) in message
    assert "TORCH_HOME" in message and "--set model.weights=path/to/file.pth" in message


def test_failed_download_becomes_weights_not_found(monkeypatch):
    monkeypatch.delenv("COVIDSCAN_OFFLINE")
    # The host answers, then the download fails.
    monkeypatch.setattr(weights_module, "unreachable", lambda url: None)

    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(WeightsNotFoundError, match=r"download failed \(URLError.*mobilenet_v2-7ebf99e0.pth"):
        build_backbone("mobilenet_v2", "imagenet", (SMALL, SMALL))


def test_weight_files_that_do_not_fit_are_rejected_with_file_and_keys(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    broken = dict(state)
    del broken["layer1.0.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ConfigError, match=r"broken\.pth.*missing keys: layer1\.0\.conv1\.weight.*extra\."):
        small(weights=str(path))

    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "shape.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(ConfigError, match=r"shape\.safetensors.*size mismatch for conv1\.weight"):
        small(weights=str(path))

    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match=r"ckpt\.pt is not a plain state_dict"):
        small(weights=str(tmp_path / "ckpt.pt"))
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match=r"cannot read weights file .*junk\.pth"):
        small(weights=str(tmp_path / "junk.pth"))
    with pytest.raises(WeightsNotFoundError, match=r"weights file imagnet not found.*'imagenet', 'none'"):
        small(weights="imagnet")


# ---------------------------------------------------------------- timm


def test_timm_backbone_by_name_uses_timm_normalisation_and_stages():
    model = small(backbone="timm:mobilenetv1_100", head="paper_b")
    backbone = model.backbone
    assert (backbone.mean, backbone.std) == ((0.5,) * 3, (0.5,) * 3)
    assert backbone.feature_shape == (1024, 2, 2)
    assert len(backbone.blocks) == 6  # stem + 5 stages
    assert model.head.fc1.in_features == 1024 * 4
    assert gradcam_target_layer(model) is backbone.body.blocks


def test_timm_imagenet_offline_missing_and_from_the_hugging_face_cache(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"timm/resnet18\.a1_in1k.*model\.safetensors") as info:
        small(weights="imagenet")
    assert str(tmp_path / "hf") in str(info.value)

    # Lay out the cache the way huggingface_hub does: refs/main -> snapshots/<revision>/model.safetensors.
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    state = timm.create_model("resnet18").state_dict()
    safetensors.torch.save_file(state, repo / "snapshots" / "abc123" / "model.safetensors")
    assert_backbone_matches(small(weights="imagenet").backbone.body, state, "fc.")


def test_unknown_names_raise_config_error():
    listed = r"unknown backbone 'resnet51'.*resnet50, vgg19, mobilenet_v2, timm:NAME"
    with pytest.raises(ConfigError, match=listed):
        small(backbone="resnet51")
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet_18'.*timm:resnet18"):
        small(backbone="timm:resnet_18")
    with pytest.raises(ConfigError, match="not a \\(N, C, h, w\\) feature map"):
        small(backbone="timm:vit_tiny_patch16_224", input_size=224)
    with pytest.raises(ConfigError, match=r"(?s)invalid model settings.*bogus"):
        small(bogus=1)
    with pytest.raises(ValidationError):
        ModelConfig(backbone="resnet50", head="paper_c")
    with pytest.raises(ConfigError, match="paper_a has exactly one hidden layer"):
        small(head="paper_a", hidden=[8, 8])


# ---------------------------------------------------------------- real weight files


def test_mobilenet_v2_coral_file_loads_strictly_and_matches_torchvision(shared_dir):
    path = shared_dir / CORAL
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, weights_only=True))
    model = build_model({"backbone": "mobilenet_v2", "weights": str(path), "head": "linear",
                         "train_mode": "finetune", "unfreeze_last": 3, "input_size": SMALL})
    assert len(model.backbone.blocks) == 19
    x = batch()
    with torch.no_grad():
        expected = reference.eval().features(x)
        model.train()  # BN stays in eval (bn_frozen), so training mode gives the same features
        assert torch.equal(model.features(x), expected)
        random = build_backbone("mobilenet_v2", "none", (SMALL, SMALL)).eval()(x)
    assert not torch.allclose(random, expected, atol=1e-2)
    assert gradcam_target_layer(model) is model.backbone.body[18]


def test_efficientnet_lite0_file_loads_strictly_and_matches_timm(shared_dir):
    path = shared_dir / LITE0
    reference = timm.create_model("tf_efficientnet_lite0")
    reference.load_state_dict(torch.load(path, weights_only=True))
    model = small(backbone="timm:tf_efficientnet_lite0", weights=str(path)).eval()
    assert model.mean == (0.5, 0.5, 0.5)
    x = batch()
    with torch.no_grad():
        assert torch.equal(model.features(x), reference.eval().forward_features(x))
        random = small(backbone="timm:tf_efficientnet_lite0").eval().features(x)
    assert not torch.allclose(random, model.features(x), atol=1e-2)


# ---------------------------------------------------------------- BPNN and Grad-CAM


def test_bpnn_is_a_four_hidden_layer_mlp_on_standardised_150x250_pixels():
    model = build_model({"backbone": "pixels", "weights": "none", "head": "bpnn"})
    assert isinstance(model, BPNN) and model.input_size == (150, 250)
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (150 * 250, 512), (512, 256), (256, 128), (128, 64), (64, 2)
    ]
    model.eval()
    gray = torch.rand(2, 1, 150, 250, generator=torch.Generator().manual_seed(3))
    logits = model(gray)
    assert logits.shape == (2, 2)
    # Per-image standardisation: gray repeated to 3 channels and any affine rescaling give the same logits.
    assert torch.allclose(model(gray.repeat(1, 3, 1, 1) * 4.0 - 1.0), logits, atol=1e-4)
    assert model(torch.rand(2, 3, 300, 500)).shape == (2, 2)  # other sizes are resized


def test_bpnn_settings_that_make_no_sense_fail():
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model({"backbone": "pixels", "head": "bpnn"})
    with pytest.raises(ConfigError, match="bpnn head goes with backbone 'pixels'"):
        build_model({"backbone": "resnet50", "weights": "none", "head": "bpnn"})
    with pytest.raises(ConfigError, match="no convolutional layer"):
        gradcam_target_layer(BPNN())


def test_gradcam_target_layer_outputs_the_feature_map():
    model = small(head="paper_a").eval()
    layer = gradcam_target_layer(model)
    assert layer is model.backbone.body.layer4
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = batch()
    feats = model.features(x)
    handle.remove()
    assert torch.equal(seen[0], feats)
