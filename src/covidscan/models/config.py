"""The ``model:`` settings of a preset and an ensemble's members: pydantic schemas only.

Kept apart from the modules that build networks (torch, torchvision, timm) so that reading and checking a
preset, as every light command does, does not pay for importing them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

TrainMode = Literal["frozen", "finetune", "full"]
Pooling = Literal["avg", "max", "avgmax"]
"""How a pooled head reduces the feature map: its average, its maximum, or both side by side."""
HeadName = Literal["paper_a", "paper_b", "linear", "bpnn"]
DEFAULT_HIDDEN: dict[str, tuple[int, ...]] = {
    "paper_a": (256,),
    "paper_b": (512, 256),
    "linear": (),
    "bpnn": (512, 256, 128, 64),
}
POOLED_HEADS = frozenset({"paper_a", "linear"})
"""Heads whose trainable part takes the globally pooled feature map (the same cached features)."""
BPNN_INPUT_SIZE = (150, 250)
"""Paper A's BPNN input "250x150" read as width 250 x height 150, i.e. (H, W) = (150, 250)."""

PositiveInt = Annotated[int, Field(gt=0)]


class ModelConfig(BaseModel):
    """Model settings (presets' ``model:`` section)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str
    """resnet50, vgg19, mobilenet_v2, timm:NAME, or pixels (only with head bpnn)."""
    weights: str = "imagenet"
    """imagenet, none, or a path to a state_dict (.pth/.pt/.safetensors) of the library's full model."""
    head: HeadName
    hidden: tuple[PositiveInt, ...] | None = None
    """Hidden layer sizes; None = the published ones (DEFAULT_HIDDEN)."""
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    """Dropout of the paper_a head."""
    pooling: Pooling = "avg"
    """How the paper_a and linear heads pool the feature map: ``avg`` (published), ``max``, or ``avgmax``
    (both side by side, twice the features)."""
    standardize: bool = False
    """Train the head on features standardised per feature (zero mean, unit variance on the training
    features), the map then folded into the head's first linear layer. Frozen base, cached features only."""
    train_mode: TrainMode = "frozen"
    unfreeze_last: int = Field(0, ge=0)
    """Blocks (last first) that train in ``finetune`` mode."""
    bn_frozen: bool = True
    """Keep BatchNorm in eval mode while fine-tuning (required by folded-BN weights)."""
    input_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None
    """Network input, an int (square) or (H, W); None = 224 for CNNs, (150, 250) for bpnn."""

    @property
    def input_hw(self) -> tuple[int, int]:
        """Input size as (H, W) with the head's default filled in."""
        if self.input_size is None:
            return BPNN_INPUT_SIZE if self.head == "bpnn" else (224, 224)
        if isinstance(self.input_size, int):
            return (self.input_size, self.input_size)
        return self.input_size

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """Hidden sizes with the head's published default filled in."""
        return DEFAULT_HIDDEN[self.head] if self.hidden is None else self.hidden


ENSEMBLE = "ensemble"
"""The :attr:`EnsembleBackbone.name` (where a single run has its backbone's name)."""
_SHA256 = r"^[0-9a-f]{64}$"


class EnsembleMember(BaseModel):
    """One member of an ensemble run: its model settings and where it came from.

    ``name`` is also the folder under the ensemble's ``members/`` holding the member's own config.yaml (which
    re-creates it), checkpoint.json (its calibration) and metrics.json.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig
    run: str
    """The trained run it was copied from, as it was when the ensemble was built."""
    weights_sha256: str = Field(pattern=_SHA256)
    """That run's own weights (the ensemble's model.safetensors holds a copy)."""


class EnsembleConfig(BaseModel):
    """The ``ensemble`` section of an ensemble run's config.yaml and checkpoint.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: tuple[EnsembleMember, ...] = Field(min_length=2)

    @property
    def description(self) -> str:
        """``ensemble(mobilenet_v2, timm:tf_efficientnet_lite0)``: the model's name where one is shown."""
        return f"{ENSEMBLE}({', '.join(m.model.backbone for m in self.members)})"
