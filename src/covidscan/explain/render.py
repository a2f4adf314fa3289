"""Heatmap overlays of CAMs on gray images (or transparent heat layers), saved as PNG with the CAM region
outlined."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pytorch_grad_cam.utils.image import show_cam_on_image

from covidscan.errors import CovidscanError
from covidscan.io import write_png

REGION_COLOR = (255, 255, 255)  # RGB; white stays visible on every part of the JET colormap
MIN_SIDE = 512
"""Smaller images are enlarged to this shorter side before drawing, so the title and outline stay legible."""


def _gray01(image: np.ndarray) -> np.ndarray:
    """A gray (H, W) image, uint8 or float in [0, 1], as float32 in [0, 1]."""
    array = np.asarray(image)
    if array.ndim != 2 or array.size == 0:
        raise CovidscanError(f"overlays take a gray (H, W) image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0)


def _same_shape(cam: np.ndarray, gray: np.ndarray) -> None:
    if cam.shape != gray.shape:
        raise CovidscanError(f"CAM shape {cam.shape} differs from image shape {gray.shape}; map it first")


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 (H, W, 3): the JET-coloured CAM blended over the gray image with weight ``alpha``."""
    gray = _gray01(image)
    _same_shape(cam, gray)
    if not 0.0 <= alpha <= 1.0:
        raise CovidscanError(f"overlay alpha {alpha!r} must be in [0, 1]")
    rgb = np.repeat(gray[..., None], 3, axis=2)
    return show_cam_on_image(rgb, np.clip(cam, 0.0, 1.0), use_rgb=True, image_weight=1.0 - alpha)


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    cam: np.ndarray,
    *,
    region: np.ndarray | None = None,
    title: str | None = None,
    alpha: float = 0.4,
    layer: bool = False,
) -> Path:
    """Write the :func:`overlay` as a PNG, with ``region`` (a boolean mask) outlined and ``title`` on top.

    With ``layer``, the PNG is a transparent heat layer instead, for a viewer that lays it over its own
    rendering of the image (its window, zoom and opacity): the CAM's colours with the CAM as their opacity,
    the region outlined, no gray image and no text (``title`` is refused). Images whose shorter side is
    under :data:`MIN_SIDE` pixels are drawn enlarged to it.
    """
    if layer and title:
        raise CovidscanError("a heat layer carries no text: show the title beside the image instead")
    path = Path(path)
    gray = _gray01(image)
    factor = MIN_SIDE / min(gray.shape)
    if factor > 1 and cam.shape == gray.shape:
        size = (round(gray.shape[1] * factor), round(gray.shape[0] * factor))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR)
        cam = cv2.resize(np.asarray(cam, np.float32), size, interpolation=cv2.INTER_LINEAR)
        if region is not None:
            region = cv2.resize(np.asarray(region, np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    if layer:
        _same_shape(cam, gray)
        heat = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0)
        # The same JET colours as show_cam_on_image gives the blended overlay.
        colors = cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)[..., ::-1]
        picture = np.ascontiguousarray(np.dstack([colors, np.uint8(255 * heat)]))
    else:
        picture = np.ascontiguousarray(overlay(gray, cam, alpha=alpha))
    side = min(picture.shape[:2])
    thickness = max(1, round(side / 256))
    if region is not None and np.any(region):
        mask = np.asarray(region, np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, REGION_COLOR + (255,) * layer, thickness)
    if title:
        scale = side / 512
        origin = (thickness * 4, thickness * 4 + round(22 * scale))
        # A dark outline under the text keeps it legible on bright and dark parts alike.
        for color, extra in (((0, 0, 0), 2), (REGION_COLOR, 0)):
            cv2.putText(picture, title, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness + extra,
                        cv2.LINE_AA)
    return write_png(path, cv2.cvtColor(picture, cv2.COLOR_RGBA2BGRA if layer else cv2.COLOR_RGB2BGR))
