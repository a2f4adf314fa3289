"""Preprocessing: CLAHE, lung-region crop (CT and chest X-ray), model-input transforms, preview sheets."""

from __future__ import annotations

from .clahe import apply_clahe
from .lungs import MODALITIES, LungCrop, find_lungs, mask_outside
from .pipeline import PreprocessConfig, Preprocessed, limit_pixels, percentile_normalize, preprocess
from .prepare import (
    PreparedImage,
    PreparedSet,
    prepare_image,
    prepare_manifest,
    prepare_paths,
    to_model_batch,
)
from .preview import format_preview, preview_lung_model, preview_sheet
from .transforms import (
    AUGMENT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    RandomGamma,
    RandomJPEG,
    augment_params,
    eval_transform,
    photometric_steps,
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
    "PreparedImage",
    "PreparedSet",
    "PreprocessConfig",
    "Preprocessed",
    "RandomGamma",
    "RandomJPEG",
    "apply_clahe",
    "augment_params",
    "eval_transform",
    "find_lungs",
    "format_preview",
    "limit_pixels",
    "mask_outside",
    "percentile_normalize",
    "photometric_steps",
    "prepare_image",
    "prepare_manifest",
    "prepare_paths",
    "preprocess",
    "preview_lung_model",
    "preview_sheet",
    "seeded",
    "to_model_batch",
    "train_transform",
]
