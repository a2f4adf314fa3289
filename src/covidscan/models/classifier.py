"""Backbone + head classifier and the model factory (its settings: :mod:`covidscan.models.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from covidscan.errors import ConfigError
from covidscan.models.backbones import PIXELS, Backbone, build_backbone
from covidscan.models.config import BPNN_INPUT_SIZE, DEFAULT_HIDDEN, POOLED_HEADS, ModelConfig
from covidscan.models.heads import linear_head, mlp_head, paper_a_head


def pool_features(fmap: torch.Tensor) -> torch.Tensor:
    """Global average of a feature map ``(N, C, h, w)`` -> ``(N, C)``; flat features pass through."""
    return fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap.flatten(1)


class Classifier(nn.Module):
    """``backbone`` (feature map) + ``head`` (logits); ``features``/``head_forward`` allow feature caching."""

    def __init__(self, backbone: Backbone, head: nn.Module, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2)`` of a normalised ``(N, 3, H, W)`` batch (softmax: in the loss / at prediction)."""
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``(N, C, h, w)``."""
        return self.backbone(x)

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from (possibly cached) backbone features."""
        return self.head(features)

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, 2)`` and the globally pooled backbone features ``(N, C)`` (for the OOD score)."""
        fmap = self.backbone(x)
        return self.head(fmap), pool_features(fmap)

    @property
    def _first_trainable(self) -> int:
        # Heads begin with parameter-free steps (pool, flatten); caching their output instead of the
        # whole feature map keeps the frozen-base cache small (2048 floats per view for ResNet50).
        layers = list(self.head.children())
        return next((i for i, m in enumerate(layers) if any(True for _ in m.parameters())), len(layers))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's trainable part consumes: backbone features after pooling/flattening, ``(N, D)``."""
        return self.head[: self._first_trainable](self.backbone(x)).flatten(1)

    @property
    def head_tail(self) -> nn.Module:
        """The trainable part of the head, mapping ``embed`` outputs to logits (shares the head's weights)."""
        return self.head[self._first_trainable :]

    @property
    def cam_layers(self) -> list[nn.Module]:
        """The modules whose output maps Grad-CAM weighs: the backbone's final feature map."""
        return [gradcam_target_layer(self)]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model was built for."""
        return self.backbone.input_size

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel input mean the backbone's weights expect."""
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel input std the backbone's weights expect."""
        return self.backbone.std


class BPNN(Classifier):
    """Paper A's baseline: an MLP (4 hidden ReLU layers) on CLAHE lung crops resized to 150x250 (H x W).

    Input: a batch ``(N, 1 or 3, H, W)`` of the (CLAHE-enhanced, lung-cropped) slice; channels are averaged to
    gray, the image is resized to ``input_size`` if needed (feed crops at (150, 250) to avoid resizing twice),
    standardised per image (zero mean, unit variance), flattened, and passed to the MLP.
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = DEFAULT_HIDDEN["bpnn"],
        input_size: tuple[int, int] = BPNN_INPUT_SIZE,
        config: ModelConfig | None = None,
    ) -> None:
        backbone = build_backbone(PIXELS, "none", input_size)
        super().__init__(backbone, mlp_head(input_size[0] * input_size[1], hidden), config)


def check_combination(cfg: ModelConfig) -> None:
    """Refuse a head that does not fit the backbone or its hidden sizes (ConfigError)."""
    if (cfg.head == "bpnn") != (cfg.backbone == PIXELS):
        raise ConfigError(
            f"head {cfg.head!r} with backbone {cfg.backbone!r}: the bpnn head goes with backbone {PIXELS!r} "
            "(raw pixels) and only with it"
        )
    if cfg.head == "paper_a" and len(cfg.hidden_sizes) != 1:
        raise ConfigError(f"head paper_a has exactly one hidden layer; got hidden={list(cfg.hidden_sizes)}")
    if cfg.pooling != "avg" and cfg.head not in POOLED_HEADS:
        raise ConfigError(
            f"model.pooling={cfg.pooling!r} needs a head that pools the feature map (paper_a or linear); "
            f"head {cfg.head!r} does not pool: set model.pooling=avg"
        )
    if cfg.head == "linear" and cfg.hidden_sizes:
        raise ConfigError(f"head linear has no hidden layer; got hidden={list(cfg.hidden_sizes)}")


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> Classifier:
    """Build backbone (with weights) + head and apply the train mode. Bad settings raise ConfigError."""
    if not isinstance(cfg, ModelConfig):
        try:
            cfg = ModelConfig.model_validate(cfg)
        except ValidationError as err:
            raise ConfigError(f"invalid model settings: {err}") from err
    check_combination(cfg)
    if cfg.head == "bpnn":
        if cfg.weights != "none":
            raise ConfigError(
                f"the bpnn model has no pretrained weights; set `weights: none` (got {cfg.weights!r})"
            )
        model: Classifier = BPNN(cfg.hidden_sizes, cfg.input_hw, cfg)
    else:
        backbone = build_backbone(cfg.backbone, cfg.weights, cfg.input_hw)
        channels, h, w = backbone.feature_shape
        if cfg.head == "paper_a":
            head = paper_a_head(channels, cfg.hidden_sizes[0], cfg.dropout, cfg.pooling)
        elif cfg.head == "paper_b":
            head = mlp_head(channels * h * w, cfg.hidden_sizes)
        else:
            head = linear_head(channels, cfg.pooling)
        model = Classifier(backbone, head, cfg)
    model.backbone.set_train_mode(cfg.train_mode, cfg.unfreeze_last, cfg.bn_frozen)
    return model


def gradcam_target_layer(model: Classifier) -> nn.Module:
    """Backbone module whose output is the final feature map (ResNet layer4, VGG block5, MobileNetV2 18)."""
    layer = model.backbone.cam_layer
    if layer is None:
        raise ConfigError(f"backbone {model.backbone.name!r} has no convolutional layer for Grad-CAM")
    return layer


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
