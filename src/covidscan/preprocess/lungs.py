"""Lung-region detection and crop: paper A's contour method for CT slices, and a frontal chest X-ray variant.

Everything runs on a copy scaled down to at most ``WORK_SIZE`` pixels per side (cheap: a few OpenCV calls,
no Python loops over pixels); the mask is scaled back up to the input size. Morphology radii are given as
fractions of that working size so a 128-px and a 256-px image behave alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from covidscan.errors import ConfigError
from covidscan.io import to_uint8
from covidscan.preprocess.clahe import as_gray_float

MODALITIES: tuple[str, str] = ("ct", "cxr")
WORK_SIZE = 256
MIN_SIDE = 32


@dataclass(frozen=True)
class LungCrop:
    """Result of :func:`find_lungs`: cropped image, full-size lung mask, bbox ``(y0, x0, y1, x1)``, status."""

    image: np.ndarray
    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    found: bool
    reason: str


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _radius(g: np.ndarray, fraction: float) -> int:
    return max(1, round(fraction * min(g.shape)))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill each outer contour, so vessels and lesions enclosed by lung become part of the mask."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return filled


def _solidify(groups: list[np.ndarray], radius: int) -> np.ndarray:
    """Fill each lung (a group of pieces) and grow it by ``radius``, but only within the lung's convex hull.

    Otsu puts bright hilar vessels and ground-glass lesions on the body side, which notches the lung or cuts
    it into pieces; growing inside the hull takes them back without spilling past the pleura or across the
    mediastinum (a plain convex hull would swallow the heart wherever the two lungs touch).
    """
    out = np.zeros_like(groups[0])
    for group in groups:
        contours, _ = cv2.findContours(group, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        points = np.concatenate(contours)
        x, y, w, h = cv2.boundingRect(points)
        hull = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(points - (x, y)), 255)
        piece = cv2.dilate(group[y : y + h, x : x + w], _disk(radius)) & hull
        out[y : y + h, x : x + w] |= _fill_holes(piece)
    return out


class _Components:
    """Connected components of a binary mask with the statistics the lung rules need."""

    def __init__(self, mask: np.ndarray) -> None:
        self.count, self.labels, stats, self.centroids = cv2.connectedComponentsWithStats(
            mask, connectivity=4
        )
        self.x0, self.y0 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        self.x1 = self.x0 + stats[:, cv2.CC_STAT_WIDTH]
        self.y1 = self.y0 + stats[:, cv2.CC_STAT_HEIGHT]
        self.area = stats[:, cv2.CC_STAT_AREA]

    def mask_of(self, ids: list[int]) -> np.ndarray:
        lookup = np.zeros(self.count, np.uint8)  # label -> 0 or 255: one gather, cheaper than np.isin
        lookup[np.asarray(ids, dtype=np.intp)] = 255
        return lookup[self.labels]

    def largest(self) -> np.ndarray:
        return self.mask_of([1 + int(np.argmax(self.area[1:]))]) if self.count > 1 else self.mask_of([])


def _ids(keep: np.ndarray, largest_first: np.ndarray | None = None) -> list[int]:
    """The components (never 0, the background) where ``keep`` holds, in label order or by decreasing
    ``largest_first`` (ties in label order); whole-array tests, not a Python loop over every speck."""
    ids = np.flatnonzero(keep[1:]) + 1
    if largest_first is not None:
        ids = ids[np.argsort(-largest_first[ids], kind="stable")]
    return ids.tolist()


def _means(comps: _Components, g: np.ndarray) -> np.ndarray:
    """Mean intensity of every component, in one pass."""
    sums = np.bincount(comps.labels.ravel(), weights=g.ravel(), minlength=comps.count)
    return sums / np.maximum(comps.area, 1)


def _body_hull(g: np.ndarray, threshold: float) -> np.ndarray:
    """Convex hull of the large, thick bright regions (chest wall, mediastinum): lungs lie inside it.

    Thin bright things (the CT table, screenshot frames, scale bars, arrows) and small text are left out,
    so the outside air around the body stays outside the hull even in screenshots.
    """
    bright = cv2.morphologyEx(((g > threshold) * 255).astype(np.uint8), cv2.MORPH_OPEN, _disk(1))
    comps = _Components(bright)
    length = np.maximum(comps.x1 - comps.x0, comps.y1 - comps.y0)
    min_area = np.maximum(0.01 * g.size, 0.03 * min(g.shape) * length)  # area / length = mean thickness
    big = _ids(comps.area >= min_area)
    hull = np.zeros_like(g)
    if big:
        contours, _ = cv2.findContours(comps.mask_of(big), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.fillConvexPoly(hull, cv2.convexHull(np.concatenate(contours)), 255)
    return hull


def _ct_mask(g: np.ndarray, min_area: float) -> tuple[np.ndarray | None, float, str]:
    """CT: Otsu, keep large dark regions inside the body, pick a left/right pair (or one spanning both)."""
    h, w = g.shape
    threshold, dark = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    hull = _body_hull(g, threshold)
    mid = float(np.flatnonzero(hull.any(axis=0)).mean()) if hull.any() else w / 2
    # Outside air lies outside the body hull. Closing removes thin vessels that would split a lung into
    # pieces; opening cuts thin dark bridges to what is left of the outside air and drops speckle.
    small = _disk(_radius(g, 1 / 128))
    dark = cv2.morphologyEx(cv2.morphologyEx(dark & hull, cv2.MORPH_CLOSE, small), cv2.MORPH_OPEN, small)
    comps = _Components(dark)
    bright = g > threshold
    body_mean = float(g[bright].mean()) if bright.any() else 0.0
    means = _means(comps, g)
    dark_enough = body_mean - means >= 40  # aerated lung is clearly darker than the body
    cy = comps.centroids[:, 1]
    cands = _ids(
        (comps.area >= min_area * g.size)
        & (0.15 * h < cy) & (cy < 0.85 * h)  # not the air under the back or above the chest
        & dark_enough,
        largest_first=comps.area,
    )
    if not cands:
        return None, mid, "no large dark region inside the body (no lung-like contour)"
    first = cands[0]
    spans = comps.x0[first] < mid - 0.05 * w and comps.x1[first] > mid + 0.05 * w  # both lungs touching
    left = comps.centroids[first][0] < mid
    opposite = [i for i in cands[1:] if (comps.centroids[i][0] < mid) != left]
    partner = next((i for i in opposite if comps.area[i] >= 0.15 * comps.area[first]), None)
    if partner is None and not spans and comps.area[first] < 2 * min_area * g.size:
        return None, mid, "only one small lung-like region and no partner on the other side"
    main = [i for i in cands if i in (first, partner) or comps.area[i] >= 0.1 * comps.area[first]]
    # Dense lesions cut a lung into pieces: smaller dark pieces within a main region's box belong to it, and
    # the pieces on one side of the midline form one lung (a region spanning the midline stays on its own).
    cx = comps.centroids[:, 0]
    pad_x, pad_y = 0.03 * w, 0.03 * h
    lungs: dict[int, list[int]] = {}
    for i in main:
        near = (cx > comps.x0[i] - pad_x) & (cx < comps.x1[i] + pad_x)
        near &= (cy > comps.y0[i] - pad_y) & (cy < comps.y1[i] + pad_y)
        near &= (comps.area >= 0.002 * g.size) & dark_enough
        near[0] = False
        key = -1 if comps.x1[i] <= mid else 1 if comps.x0[i] >= mid else i + 1
        lungs.setdefault(key, []).extend([i, *np.flatnonzero(near)])
    groups = [comps.mask_of(ids) for ids in lungs.values()]
    return _solidify(groups, _radius(g, 10 / 256)), mid, ""


def _cxr_mask(g: np.ndarray, min_area: float) -> tuple[np.ndarray | None, float, str]:
    """Frontal X-ray: Otsu in the central chest area, the largest dark region on each side of the midline."""
    h, w = g.shape
    # The lungs lie in the central chest area; the margins hold outside air, shoulders, labels and markers.
    ry0, ry1, rx0, rx1 = int(0.06 * h), int(0.9 * h), int(0.08 * w), int(0.92 * w)
    chest = g[ry0:ry1, rx0:rx1]
    threshold, _ = cv2.threshold(chest, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    dark = np.zeros_like(g)
    dark[ry0:ry1, rx0:rx1] = (chest <= threshold) * np.uint8(255)
    radius = _radius(g, 1 / 64)
    comps = _Components(cv2.morphologyEx(dark, cv2.MORPH_OPEN, _disk(radius)))
    means = _means(comps, g)
    lungs = np.zeros_like(g)
    lung_like = (
        (comps.area >= min_area * g.size)
        & (comps.centroids[:, 1] < 0.75 * h)
        & (means > 0.4 * threshold)  # not the near-black outside air beside the chest or abdomen
    )
    on_left = comps.centroids[:, 0] < w / 2
    for left in (True, False):
        side = _ids(lung_like & (on_left == left))
        if not side:
            continue
        best = max(side, key=lambda i: comps.area[i])
        lung = comps.mask_of([best])
        if comps.y0[best] <= ry0 or comps.x0[best] <= rx0 or comps.x1[best] >= rx1:
            # Touching the edge of the chest area usually means a leak into the air above the shoulders or
            # beside the chest: a stronger opening cuts that neck off.
            lung = _Components(cv2.morphologyEx(lung, cv2.MORPH_OPEN, _disk(3 * radius))).largest()
        # Closing bridges the bright ribs that cross the lung field.
        lungs |= cv2.morphologyEx(lung, cv2.MORPH_CLOSE, _disk(2 * radius))
    if not lungs.any():
        return None, w / 2, "no large dark region in the chest area (no lung-like contour)"
    return _fill_holes(lungs), w / 2, ""


def _bbox(mask: np.ndarray, mid: float, margin: float) -> tuple[int, int, int, int]:
    """Box around the mask plus margin; a box around one lung only is mirrored about the body midline."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    if x1 <= mid or x0 >= mid:  # one lung found (the other consolidated or cut off): keep both sides
        x0, x1 = min(x0, round(2 * mid - x1)), max(x1, round(2 * mid - x0))
    dy, dx = round(margin * h), round(margin * w)
    return max(0, int(rows[0]) - dy), max(0, x0 - dx), min(h, int(rows[-1]) + 1 + dy), min(w, x1 + dx)


def _check_fraction(name: str, value: float, low: float, high: float, *, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value < high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"lung crop {name} must be a fraction in {bracket}{low}, {high}), got {value!r}")


def find_lungs(
    image: np.ndarray, *, modality: str = "ct", margin: float = 0.05, min_area: float = 0.01
) -> LungCrop:
    """Find the lungs in a (CLAHE-enhanced) gray float CT slice or frontal chest X-ray and crop to them.

    ``margin`` widens the box by that fraction of the image size on each side; ``min_area`` is the smallest
    lung region kept, as a fraction of the image. When no plausible lungs are found the whole image comes
    back with ``found=False`` and a ``reason`` (never an empty crop).
    """
    if modality not in MODALITIES:
        raise ConfigError(f"lung crop modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    _check_fraction("margin", margin, 0.0, 0.5, low_open=False)
    _check_fraction("min_area", min_area, 0.0, 0.5, low_open=True)
    gray = as_gray_float(image)
    h, w = gray.shape
    if min(h, w) < MIN_SIDE:
        reason = f"image too small ({h}x{w} px); lungs need at least {MIN_SIDE} px per side"
        return LungCrop(gray, np.zeros((h, w), bool), (0, 0, h, w), False, reason)
    scale = min(1.0, WORK_SIZE / max(h, w))
    if scale < 1:
        gray_small = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    else:
        gray_small = gray
    g = cv2.medianBlur(to_uint8(gray_small), 5)
    if int(g.max()) - int(g.min()) < 16:
        small_mask, mid, reason = None, 0.0, "image has almost no contrast (blank or constant)"
    else:
        small_mask, mid, reason = (_ct_mask if modality == "ct" else _cxr_mask)(g, min_area)
    if small_mask is None:
        return LungCrop(gray, np.zeros((h, w), bool), (0, 0, h, w), False, reason)
    if scale < 1:
        small_mask = cv2.resize(small_mask, (w, h), interpolation=cv2.INTER_LINEAR)
    return crop_to_mask(gray, small_mask > 127, margin=margin, mid=mid / scale)


def crop_to_mask(
    image: np.ndarray, mask: np.ndarray, *, margin: float = 0.05, mid: float | None = None, reason: str = ""
) -> LungCrop:
    """The :class:`LungCrop` of a lung ``mask`` (bool, the image's shape) found by any method: the box
    around it plus ``margin``, mirrored about ``mid`` (default: the image centre) when it holds one lung
    only. An empty mask gives the whole image with ``found=False`` and ``reason``."""
    _check_fraction("margin", margin, 0.0, 0.5, low_open=False)
    gray = as_gray_float(image)
    h, w = gray.shape
    if mask.shape != gray.shape:
        raise ConfigError(f"lung mask of shape {mask.shape} does not fit the image {gray.shape}")
    if not mask.any():
        return LungCrop(gray, np.zeros((h, w), bool), (0, 0, h, w), False, reason or "the lung mask is empty")
    y0, x0, y1, x1 = bbox = _bbox(mask, w / 2 if mid is None else mid, margin)
    return LungCrop(gray[y0:y1, x0:x1], mask, bbox, True, "")


def mask_outside(
    image: np.ndarray, crop: LungCrop, *, dilation: float, value: float
) -> tuple[np.ndarray, LungCrop]:
    """Set everything outside the lung mask grown by ``dilation`` (a fraction of the shorter image side) to
    ``value``; return the masked full image and the crop cut from it.

    Borders, burnt-in text, markers, the body outline and the CT table then carry no signal a model could
    learn the source from. A crop that found no lungs comes back unchanged: blanking the whole image would
    hide the failure behind an empty input, so the caller keeps ``found=False`` and warns instead.
    """
    _check_fraction("mask dilation", dilation, 0.0, 0.5, low_open=False)
    gray = as_gray_float(image)
    if not crop.found:
        return gray, crop
    if crop.mask.shape != gray.shape:
        raise ConfigError(f"lung mask of shape {crop.mask.shape} does not fit the image {gray.shape}")
    radius = round(dilation * min(gray.shape))
    keep = crop.mask if radius == 0 else cv2.dilate(crop.mask.astype(np.uint8), _disk(radius)) > 0
    masked = np.where(keep, gray, np.float32(value)).astype(np.float32, copy=False)
    y0, x0, y1, x1 = crop.bbox
    return masked, replace(crop, image=masked[y0:y1, x0:x1])
