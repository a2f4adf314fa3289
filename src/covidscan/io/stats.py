"""Statistics of a decoded image that describe where it came from: its histogram, size and format.

The out-of-distribution envelope (:class:`covidscan.models.ood.ImageStatsEnvelope`) compares them with the
training images'; they are computed where an image is decoded, before any preprocessing changes it.
"""

from __future__ import annotations

import numpy as np

from covidscan.errors import ConfigError
from covidscan.io.base import ImageMeta, unit_histogram

HIST_BINS = 32
# Below / above these gray levels a pixel counts as black / white (padding, burnt-in labels, saturation).
_NEAR_BLACK, _NEAR_WHITE = 0.02, 0.98
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "MONOCHROME1", "MONOCHROME2"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
STAT_NAMES: tuple[str, ...] = (
    *(f"hist{i:02d}" for i in range(HIST_BINS)),
    "mean", "std", "near_black", "near_white",
    "log_height", "log_width", "log_aspect", "colour", "high_depth",
)
"""Names of the :func:`image_stats` entries, in order."""


def image_stats(pixels: np.ndarray, meta: ImageMeta | None = None) -> np.ndarray:
    """Statistics of one decoded gray image in [0, 1] (before any preprocessing), as in :data:`STAT_NAMES`.

    A 32-bin intensity histogram (fractions), mean, std, the near-black and near-white fractions, log
    height / width / aspect of the decoded image, and two flags from ``meta``: colour source and more
    than 8 bits per pixel (16-bit files, DICOM).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ConfigError(f"image_stats needs a gray (H, W) image; got an array of shape {pixels.shape}")
    # A strided view of at most ~512 px per side: the same statistics, without a histogram of 9 Mpx.
    step = max(1, max(pixels.shape) // 512)
    values = pixels[::step, ::step].astype(np.float32, copy=False).ravel()
    hist = unit_histogram(values, HIST_BINS) / values.size
    height, width = pixels.shape
    colour = high_depth = 0.0
    if meta is not None:
        colour = float(meta.mode not in _GRAY_MODES)
        high_depth = float(meta.format == "DICOM" or meta.mode in _HIGH_DEPTH_MODES)
    extra = [
        values.mean(), values.std(), (values < _NEAR_BLACK).mean(), (values > _NEAR_WHITE).mean(),
        np.log(height), np.log(width), np.log(width / height), colour, high_depth,
    ]
    return np.concatenate([hist, np.asarray(extra)]).astype(np.float32)
