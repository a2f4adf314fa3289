"""Models of the two papers: pretrained CNN backbones + published heads, and the BPNN pixel baseline.

All models return logits for ``covidscan.CLASSES``; see :mod:`covidscan.models.heads` for why no softmax.
"""

from __future__ import annotations

from covidscan.models.backbones import PIXELS, TORCHVISION_BACKBONES, Backbone, build_backbone
from covidscan.models.classifier import (
    BPNN,
    BPNN_INPUT_SIZE,
    DEFAULT_HIDDEN,
    Classifier,
    ModelConfig,
    build_model,
    count_parameters,
    gradcam_target_layer,
    pool_features,
)
from covidscan.models.ensemble import EnsembleClassifier, EnsembleConfig, EnsembleMember, build_ensemble
from covidscan.models.fast import (
    PRECISIONS,
    CompiledClassifier,
    FastClassifier,
    Precision,
    PrecisionVerdict,
    bf16_supported,
    bf16_verdict,
    binary_logits,
    use_bf16,
)
from covidscan.models.heads import linear_head, mlp_head, paper_a_head
from covidscan.models.ood import FeatureDensity, ImageStatsEnvelope, OODDetector
from covidscan.models.weights import downloads_disabled, read_state_dict, torchvision_checkpoint_path

__all__ = [
    "BPNN",
    "BPNN_INPUT_SIZE",
    "DEFAULT_HIDDEN",
    "PIXELS",
    "PRECISIONS",
    "TORCHVISION_BACKBONES",
    "Backbone",
    "Classifier",
    "CompiledClassifier",
    "EnsembleClassifier",
    "EnsembleConfig",
    "EnsembleMember",
    "FastClassifier",
    "FeatureDensity",
    "ImageStatsEnvelope",
    "ModelConfig",
    "OODDetector",
    "Precision",
    "PrecisionVerdict",
    "bf16_supported",
    "bf16_verdict",
    "binary_logits",
    "build_backbone",
    "build_ensemble",
    "build_model",
    "count_parameters",
    "downloads_disabled",
    "gradcam_target_layer",
    "linear_head",
    "mlp_head",
    "paper_a_head",
    "pool_features",
    "read_state_dict",
    "torchvision_checkpoint_path",
    "use_bf16",
]
