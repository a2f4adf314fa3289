"""Preprocessing: CLAHE, lung-region crop (CT and chest X-ray), model-input transforms, preview sheets."""

from __future__ import annotations

from .clahe import apply_clahe
from .lungs import MODALITIES, LungCrop, find_lungs
from .pipeline import PreprocessConfig, preprocess
from .preview import format_preview, preview_sheet
from .transforms import (
    AUGMENT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    augment_params,
    eval_transform,
    seeded,
    train_transform,
)

__all__ = [
    "AUGMENT_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODALITIES",
    "AugmentParams",
    "LungCrop",
    "PreprocessConfig",
    "apply_clahe",
    "augment_params",
    "eval_transform",
    "find_lungs",
    "format_preview",
    "preprocess",
    "preview_sheet",
    "seeded",
    "train_transform",
]
