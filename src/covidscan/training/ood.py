"""Fit a run's out-of-distribution detector on the images it was trained and validated on."""

from __future__ import annotations

import logging

import numpy as np

from covidscan.inference import Predictor
from covidscan.models import PIXELS, OODDetector
from covidscan.preprocess import PreparedSet

log = logging.getLogger(__name__)

MIN_VAL_IMAGES = 20
"""Fewer validation images than this give no stable 95th percentile: the run then has no detector."""
MAX_TRAIN_IMAGES = 5000
"""The k-NN part keeps every training vector; above this many, a seeded sample keeps the file small."""


def fit_ood(
    scorer: Predictor,
    train: PreparedSet,
    val: PreparedSet,
    val_features: np.ndarray,
    *,
    seed: int = 0,
    quantile: float = 0.95,
) -> tuple[OODDetector, int, int] | None:
    """k-NN on pooled features + image-statistics envelope, scaled and thresholded on ``val``.

    ``scorer`` serves the fitted model (:meth:`Predictor.from_model`); ``val_features`` are the validation
    images' pooled features, computed once with their logits. Returns the detector with the numbers of
    training and validation images used, or None (with a warning) when validation is too small to fit a
    threshold on, or for the BPNN baseline, whose "backbone" is the pixels themselves (their global mean is
    a constant: no feature space).
    """
    if scorer.model.backbone.name == PIXELS:
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
    _, train_features = scorer.logits_and_features(train.images[keep])
    assert train_features is not None  # the torch engine always gives features
    detector = OODDetector().fit(train_features, train.labels[keep], train.stats[keep], val_features,
                                 val.stats, quantile=quantile)
    return detector, len(keep), len(val)


def ood_share(detector: OODDetector, features: np.ndarray, images: PreparedSet) -> float:
    """The share of ``images`` (with their pooled ``features``) the detector flags as unlike training."""
    assert images.stats is not None
    return float(np.mean(detector.flag(detector.score(features, images.stats))))
