"""Ensembles: several trained classifiers whose logits are averaged, served as one :class:`Classifier`.

An :class:`EnsembleClassifier` quacks like a single classifier, so everything that stands on one (the
``Predictor``, ONNX export, Grad-CAM, ``adapt``, the review service) uses an ensemble unchanged:

* its input is the prepared image with identity normalisation (mean 0, std 1); each member normalises it
  with its own backbone's mean and std, exactly as it was trained;
* its "backbone" runs every member's backbone and concatenates their feature maps along the channels, so
  the pooled features (the OOD detector's and the shift test's input) are the members' pooled features
  side by side;
* its head splits that map again, runs each member's head and returns ``sum_i w_i * logits_i`` with
  ``w_i = 1 / (M * T_i)``: the mean of the members' temperature-scaled logits (each member's own
  validation temperature ``T_i``), so an over-confident member does not outvote the others. The ensemble is
  then calibrated once more, on the shared validation split.
* Grad-CAM targets every member's last feature map (:attr:`EnsembleClassifier.cam_layers`): the map is the
  average of the members' normalised maps, each weighted by the gradient of the ensemble's own logit.
* ``embed`` / ``head_tail`` (the frozen-base feature cache, ``adapt``'s new head) are the members' embeddings
  concatenated, and a tail that splits them, runs each member's trainable head part and sums the weighted
  logits: ``adapt --mode head`` refits all members' heads jointly on the averaged logit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from covidscan.errors import ConfigError
from covidscan.models.classifier import Classifier, build_model, pool_features
from covidscan.models.config import ENSEMBLE, EnsembleConfig, EnsembleMember

MEMBERS_DIR = "members"
"""The folder of an ensemble run holding ``NAME/`` per member (see :class:`EnsembleMember`)."""


def _split(x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    return torch.split(x, list(sizes), dim=1)


class EnsembleBackbone(nn.Module):
    """Every member's backbone on its own normalisation; the feature maps concatenated along channels."""

    name = ENSEMBLE

    def __init__(self, backbones: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(backbones)
        shapes = [tuple(b.feature_shape) for b in backbones]
        if len({s[1:] for s in shapes}) != 1:
            raise ConfigError(
                f"ensemble members' feature maps differ in size ({', '.join(map(str, shapes))} "
                "as (C, h, w)); ensemble models with the same input size and downsampling"
            )
        self.channels = [s[0] for s in shapes]
        self.feature_shape = (sum(self.channels), *shapes[0][1:])
        self.out_channels = self.feature_shape[0]
        self.input_size = backbones[0].input_size
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # each member normalises for itself
        for i, b in enumerate(backbones):
            self.register_buffer(f"mean{i}", torch.tensor(b.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{i}", torch.tensor(b.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated feature maps ``(N, sum C_i, h, w)`` of a batch normalised with mean 0, std 1."""
        maps = [
            b((x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")) for i, b in enumerate(self.members)
        ]
        return torch.cat(maps, dim=1)

    def set_train_mode(self, mode: str, unfreeze_last: int = 0, bn_frozen: bool = True) -> None:
        """An ensemble's backbones stay frozen (it is built from trained runs, never trained as a whole)."""
        if mode != "frozen":
            raise ConfigError(f"an ensemble's backbones are frozen; train_mode {mode!r} is for its members")
        for b in self.members:
            b.set_train_mode("frozen")


class EnsembleTail(nn.Module):
    """Members' trainable head parts on their slices of the concatenated input; weighted sum of logits.

    ``weights`` (a buffer saved with the model) are ``1 / (M * T_i)`` when built from trained runs;
    ``reset_parameters`` (a fresh head in ``adapt``) makes them a plain mean.
    """

    def __init__(self, heads: Sequence[nn.Module], sizes: Sequence[int], weights: Sequence[float]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.sizes = list(sizes)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the members' logits ``(N, 2)``."""
        logits = torch.stack(
            [head(part) for head, part in zip(self.heads, _split(x, self.sizes), strict=True)]
        )
        return (self.weights.view(-1, 1, 1) * logits).sum(dim=0)

    def reset_parameters(self) -> None:
        """Equal weights: a head trained afresh learns its own scale."""
        self.weights.fill_(1.0 / len(self.heads))


class EnsembleHead(nn.Module):
    """The members' heads: each one's parameter-free start (pooling, flattening) on its channels, then the
    shared :class:`EnsembleTail`."""

    def __init__(self, starts: Sequence[nn.Module], tail: EnsembleTail, channels: Sequence[int]) -> None:
        super().__init__()
        self.starts = nn.ModuleList(starts)
        self.tail = tail
        self.channels = list(channels)

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        """The members' head inputs, each flattened, side by side ``(N, sum D_i)``."""
        return torch.cat(
            [
                start(part).flatten(1)
                for start, part in zip(self.starts, _split(fmap, self.channels), strict=True)
            ],
            dim=1,
        )

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Ensemble logits ``(N, 2)`` of the concatenated feature map."""
        return self.tail(self.embed(fmap))


class EnsembleClassifier(Classifier):
    """Members' classifiers as one; see the module docstring for what each part computes."""

    def __init__(
        self, members: Sequence[Classifier], weights: Sequence[float], config: EnsembleConfig | None = None
    ) -> None:
        if len(members) < 2 or len(weights) != len(members):
            raise ConfigError(
                f"an ensemble needs at least 2 members and one weight each; got {len(members)} "
                f"members and {len(weights)} weights"
            )
        backbone = EnsembleBackbone([m.backbone for m in members])
        cuts = [m._first_trainable for m in members]
        starts = [m.head[:k] for m, k in zip(members, cuts, strict=True)]
        tails = [m.head[k:] for m, k in zip(members, cuts, strict=True)]
        # Each member's embedding width, from a dummy pass of its head's start on its feature map.
        with torch.no_grad():
            sizes = [
                start(torch.zeros(1, *m.backbone.feature_shape)).flatten(1).shape[1]
                for start, m in zip(starts, members, strict=True)
            ]
        head = EnsembleHead(starts, EnsembleTail(tails, sizes, weights), backbone.channels)
        super().__init__(backbone, head)  # type: ignore[arg-type]
        self.ensemble = config

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The members' head inputs side by side ``(N, sum D_i)`` (what :attr:`head_tail` consumes)."""
        return self.head.embed(self.backbone(x))

    @property
    def head_tail(self) -> nn.Module:
        """The members' trainable head parts with the weighted sum of their logits."""
        return self.head.tail

    @property
    def cam_layers(self) -> list[nn.Module]:
        """Every member's last feature-map module (Grad-CAM averages their maps)."""
        layers = [b.cam_layer for b in self.backbone.members]
        if any(layer is None for layer in layers):
            raise ConfigError("an ensemble member has no convolutional layer for Grad-CAM")
        return layers

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble logits and the members' pooled features side by side, from one pass of each backbone."""
        fmap = self.backbone(x)
        return self.head(fmap), pool_features(fmap)


def build_ensemble(config: EnsembleConfig) -> EnsembleClassifier:
    """An ensemble's architecture from its config, without pretrained weights (a run's saved weights are
    loaded into it); the member weights ``w_i`` are placeholders until then."""
    members = [build_model(m.model.model_copy(update={"weights": "none"})) for m in config.members]
    n = len(members)
    return EnsembleClassifier(members, [1.0 / n] * n, config)


__all__ = [
    "ENSEMBLE",
    "MEMBERS_DIR",
    "EnsembleBackbone",
    "EnsembleClassifier",
    "EnsembleConfig",
    "EnsembleHead",
    "EnsembleMember",
    "EnsembleTail",
    "build_ensemble",
]
