"""Fit a run's out-of-distribution detector on the images it was trained and validated on."""

from __future__ import annotations

import logging

import numpy as np
import torch

from covidscan.models import PIXELS, Classifier, OODDetector
from covidscan.preprocess import PreparedSet, to_model_batch

log = logging.getLogger(__name__)

MIN_VAL_IMAGES = 20
"""Fewer validation images than this give no stable 95th percentile: the run then has no detector."""
MAX_TRAIN_IMAGES = 5000
"""The k-NN part keeps every training vector; above this many, a seeded sample keeps the file small."""


@torch.inference_mode()
def pooled_features(
    model: Classifier, images: np.ndarray, *, batch_size: int = 32, device: torch.device | None = None
) -> np.ndarray:
    """Globally pooled backbone features ``(N, C)`` of prepared float images (no augmentation)."""
    model.eval()
    device = device or torch.device("cpu")
    out = [
        model.forward_pooled(to_model_batch(images[i : i + batch_size], model.mean, model.std).to(device))[1]
        .float().cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_ood(
    model: Classifier,
    train: PreparedSet,
    val: PreparedSet,
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    seed: int = 0,
    quantile: float = 0.95,
) -> tuple[OODDetector, int, int] | None:
    """k-NN on pooled features + image-statistics envelope, scaled and thresholded on ``val``.

    Returns the detector with the numbers of training and validation images used, or None (with a
    warning) when validation is too small to fit a threshold on, or for the BPNN baseline, whose
    "backbone" is the pixels themselves (their global mean is a constant, no feature space to compare in).
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
    detector = OODDetector().fit(
        pooled_features(model, train.images[keep], batch_size=batch_size, device=device),
        train.labels[keep],
        train.stats[keep],
        pooled_features(model, val.images, batch_size=batch_size, device=device),
        val.stats,
        quantile=quantile,
    )
    return detector, len(keep), len(val)


def ood_share(
    detector: OODDetector, model: Classifier, images: PreparedSet, *, batch_size: int = 32,
    device: torch.device | None = None,
) -> float:
    """The share of ``images`` the detector flags as unlike the training data."""
    assert images.stats is not None
    feats = pooled_features(model, images.images, batch_size=batch_size, device=device)
    return float(np.mean(detector.flag(detector.score(feats, images.stats))))
