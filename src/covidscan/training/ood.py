"""Fit a run's out-of-distribution detector on the images it was trained and validated on."""

from __future__ import annotations

import logging

import numpy as np
import torch

from covidscan.models import PIXELS, Classifier, OODDetector
from covidscan.preprocess import PreparedSet
from covidscan.training.engine import predict_outputs

log = logging.getLogger(__name__)

MIN_VAL_IMAGES = 20
"""Fewer validation images than this give no stable 95th percentile: the run then has no detector."""
MAX_TRAIN_IMAGES = 5000
"""The k-NN part keeps every training vector; above this many, a seeded sample keeps the file small."""


def fit_ood(
    model: Classifier,
    train: PreparedSet,
    val: PreparedSet,
    val_features: np.ndarray,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    seed: int = 0,
    quantile: float = 0.95,
) -> tuple[OODDetector, int, int] | None:
    """k-NN on pooled features + image-statistics envelope, scaled and thresholded on ``val``.

    ``val_features`` are the validation images' pooled features (:func:`predict_outputs`, computed once
    with their logits). Returns the detector with the numbers of training and validation images used, or
    None (with a warning) when validation is too small to fit a threshold on, or for the BPNN baseline,
    whose "backbone" is the pixels themselves (their global mean is a constant: no feature space).
    """
    if model.backbone.name == PIXELS:
        log.warning("no out-of-distribution detector: the BPNN baseline has no backbone features")
        return None
    if len(val) < MIN_VAL_IMAGES or len(train) < 10:
        log.warning("no out-of-distribution detector: %d training and %d validation images (at least 10 "
                    "and %d are needed)", len(train), len(val), MIN_VAL_IMAGES)
        return None
    assert train.stats is not None and val.stats is not None
    keep = np.arange(len(train))
    if len(train) > MAX_TRAIN_IMAGES:
        keep = np.sort(np.random.default_rng(seed).choice(len(train), MAX_TRAIN_IMAGES, replace=False))
    _, train_features = predict_outputs(model, train.images[keep], batch_size=batch_size, device=device)
    detector = OODDetector().fit(train_features, train.labels[keep], train.stats[keep], val_features,
                                 val.stats, quantile=quantile)
    return detector, len(keep), len(val)


def ood_share(detector: OODDetector, features: np.ndarray, images: PreparedSet) -> float:
    """The share of ``images`` (with their pooled ``features``) the detector flags as unlike training."""
    assert images.stats is not None
    return float(np.mean(detector.flag(detector.score(features, images.stats))))
