"""Paper A's preprocessing as one call: CLAHE, then the lung crop computed on the CLAHE image.

Optionally (every preset's default is off) everything outside the lungs is masked to a constant, so the
model input holds no borders, burnt-in text, markers or body outline that could tell the source apart, and
the decoded image can be standardised first (a common pixel budget, percentile intensity normalisation) so
that CLAHE tiles see about the same scale and contrast whatever the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pydantic import ValidationError

from covidscan.errors import ConfigError
from covidscan.preprocess.clahe import apply_clahe, as_gray_float
from covidscan.preprocess.config import PreprocessConfig
from covidscan.preprocess.lungs import LungCrop, crop_to_mask, find_lungs, mask_outside
from covidscan.preprocess.lungseg import lung_segmenter


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """The enhanced full image and, when the lung crop ran, its result; ``image`` is what models see.

    With ``mask_outside_lungs`` both ``enhanced`` and the crop's image are masked (when lungs were found).
    ``unmasked`` is then the enhanced image before masking (for the preview sheet), else None.
    ``scale`` is the size of ``enhanced`` over the input's (below 1 when ``max_pixels`` shrank it): the
    crop's box and mask are in ``enhanced``'s pixels; :meth:`input_bbox` / :meth:`input_mask` map them back.
    """

    enhanced: np.ndarray
    crop: LungCrop | None
    scale: float = 1.0
    unmasked: np.ndarray | None = None

    @property
    def image(self) -> np.ndarray:
        """The lung crop of the enhanced image, or the whole enhanced image when no crop is made."""
        return self.enhanced if self.crop is None else self.crop.image

    def input_bbox(self, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """The region ``image`` shows, as (y0, x0, y1, x1) in the input image of ``shape`` (H, W)."""
        h, w = shape
        if self.crop is None:
            return 0, 0, h, w
        y0, x0, y1, x1 = (v / self.scale for v in self.crop.bbox)
        return max(0, math.floor(y0)), max(0, math.floor(x0)), min(h, math.ceil(y1)), min(w, math.ceil(x1))

    def input_mask(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The crop's lung mask at the input image's ``shape``, or None when no lungs were found."""
        if self.crop is None or not self.crop.found:
            return None
        if self.crop.mask.shape == tuple(shape):
            return self.crop.mask
        return cv2.resize(self.crop.mask.astype(np.uint8), (shape[1], shape[0]),
                          interpolation=cv2.INTER_NEAREST) > 0


def limit_pixels(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """Scale ``image`` down (area interpolation, aspect kept) to at most ``max_pixels``; smaller ones pass."""
    h, w = image.shape
    if h * w <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / (h * w))
    size = (max(1, math.floor(w * factor)), max(1, math.floor(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def percentile_normalize(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Map the image's (low, high) percentiles to 0 and 1, clipped; a flat image is returned unchanged."""
    low, high = np.percentile(image, percentiles)
    if high - low < 1e-6:  # constant (or nearly): stretching would only amplify rounding noise
        return image
    out = (image - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def preprocess(image: np.ndarray, cfg: PreprocessConfig | dict[str, Any] | None = None) -> Preprocessed:
    """Standardisation, CLAHE, lung crop, then masking outside the lungs (each if enabled), on a gray float
    image; one recipe for training, prediction and the preview sheet.

    When the masked mode finds no lungs, nothing is masked: the crop says ``found=False`` and the whole image
    goes on, so the failure stays visible (``prepare_image`` adds a warning) instead of an empty input.
    """
    if not isinstance(cfg, PreprocessConfig):
        try:
            cfg = PreprocessConfig(**(cfg or {}))
        except ValidationError as exc:
            raise ConfigError(f"invalid preprocess settings: {exc}") from None
    out = as_gray_float(image)
    height = out.shape[0]
    if cfg.max_pixels is not None:
        out = limit_pixels(out, cfg.max_pixels)
    scale = out.shape[0] / height
    if cfg.normalize == "percentile":
        out = percentile_normalize(out, cfg.percentiles)
    standardised = out
    if cfg.clahe:
        out = apply_clahe(out, clip_limit=cfg.clip_limit, tile_grid=cfg.tile_grid)
    if cfg.mask_outside_lungs and cfg.modality == "cxr":
        # The U-Net gets the image before CLAHE (it standardises its own input) and sees the lungs behind
        # the heart and the diaphragm that the contour rules leave out.
        lungs = lung_segmenter(cfg.lung_model)(standardised)
        crop = crop_to_mask(out, lungs, margin=cfg.margin, reason="the lung model found no lungs")
    elif cfg.lung_crop:
        crop = find_lungs(out, modality=cfg.modality, margin=cfg.margin)
    else:
        crop = None
    unmasked = None
    if crop is not None and cfg.mask_outside_lungs and crop.found:
        unmasked = out
        out, crop = mask_outside(out, crop, dilation=cfg.mask_dilation, value=cfg.mask_value)
    return Preprocessed(out, crop, scale, unmasked)
