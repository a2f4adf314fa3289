"""Deterministic synthetic chest phantoms (CT slices, frontal X-rays) with lung and lesion masks.

The phantoms stand in for real data in tests, in the end-to-end demo and in lung-crop quality checks.
They are drawn with OpenCV primitives in coordinates relative to the image size, so any ``size`` works.
Three random streams keep things reproducible and separable:

* anatomy (``anatomy_seed``): body, lungs, heart, ribs, table, and the patient's contrast/brightness;
* slice (``seed``): z level (or inspiration for X-rays), vessels, noise;
* lesion (``seed``): the ground-glass opacities, drawn only for ``covid=True``, so the same seed with
  ``covid=False`` gives the same image without lesions.

A ``site`` (:data:`SITES`, or a :class:`SiteStyle`) renders the same patients as another scanner would:
other field of view, resolution, window and noise -- a synthetic "new hospital" for adaptation tests.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covidscan import CLASSES
from covidscan.errors import ConfigError, StorageError
from covidscan.io import to_uint8, write_png
from covidscan.outputs import write_csv

MODALITIES: tuple[str, str] = ("ct", "cxr")
MIN_SIZE = 64
MAX_SIZE = 4096  # a digital radiograph's side; beyond it a phantom only costs memory and disk
MAX_IMAGES = 1_000_000  # a day of CPU time and tens of GB: more is a typo, not an experiment
# Bytes a phantom's three PNGs (image, lung and lesion masks) take at most, per pixel of the image side
# squared, plus its manifest row: measured 0.25-0.86 per pixel (CT 512 px to X-ray 64 px).
_BYTES_PER_PIXEL, _BYTES_PER_ROW = 1.0, 1024
_SIZE_HINT = f"phantoms need {MIN_SIZE} px to show anatomy; {MAX_SIZE} px is a radiograph's full resolution"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "lung_mask", "lesion_mask")

# OpenCV draws with integer coordinates; 4 fractional bits keep small shapes smooth at 64 px.
_SHIFT = 4
_ONE = 1 << _SHIFT
# Stream tags so that anatomy, slice, lesion and site-noise draws never share random numbers.
_ANATOMY, _SLICE, _LESION, _SITE = 0, 1, 2, 3


@dataclass(frozen=True)
class Phantom:
    """One synthetic image with its lung mask, lesion mask (empty for non_covid), label and modality."""

    image: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    label: str
    modality: str


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner renders a phantom, applied after drawing (the default changes nothing).

    ``fov`` > 1 shows more around the patient (the body gets smaller), < 1 crops closer; ``resolution``
    < 1 renders at that fraction of the size and scales back up (lost detail); ``gain`` / ``offset``
    change contrast around mid-gray and brightness (another window); ``noise`` adds Gaussian noise.
    """

    fov: float = 1.0
    resolution: float = 1.0
    gain: float = 1.0
    offset: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not (self.fov > 0 and 0 < self.resolution <= 1 and self.gain > 0 and self.noise >= 0):
            raise ConfigError(
                f"invalid site style {self}: fov and gain must be > 0, resolution in (0, 1], noise >= 0"
            )


SITES: dict[str, SiteStyle] = {
    "default": SiteStyle(),
    # Another hospital: wider field of view, half the resolution, harder window, noisier low-dose scans.
    "scanner-b": SiteStyle(fov=1.3, resolution=0.5, gain=1.35, offset=-0.06, noise=0.05),
}
"""Named site styles for :func:`make_phantom` / :func:`write_phantom_dataset`."""


def _site_style(site: str | SiteStyle) -> SiteStyle:
    if isinstance(site, SiteStyle):
        return site
    if site not in SITES:
        raise ConfigError(f"site={site!r} is unknown: use one of {', '.join(SITES)} or a SiteStyle")
    return SITES[site]


def _render_site(
    image: np.ndarray, masks: tuple[np.ndarray, ...], style: SiteStyle, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Apply a site's field of view and resolution (to the masks too), then its window and noise."""
    size = image.shape[0]
    if style.fov != 1.0:
        zoom = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, 1.0 / style.fov)
        image = cv2.warpAffine(image, zoom, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
        masks = tuple(cv2.warpAffine(m.astype(np.uint8), zoom, (size, size), flags=cv2.INTER_NEAREST) > 0
                      for m in masks)
    if style.resolution < 1.0:
        small = max(8, round(size * style.resolution))
        image = cv2.resize(cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA), (size, size),
                           interpolation=cv2.INTER_LINEAR)
    image = (image - np.float32(0.5)) * np.float32(style.gain) + np.float32(0.5 + style.offset)
    if style.noise:
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(style.noise)
    return image, masks


# ----------------------------------------------------------------------------------------- drawing helpers
def _fixed(points: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) as x, y -> OpenCV fixed-point int32."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


def _fill_poly(canvas: np.ndarray, points: np.ndarray, value: float) -> None:
    cv2.fillPoly(canvas, [_fixed(points)], float(value), cv2.LINE_8, _SHIFT)


def _ellipse(canvas: np.ndarray, center, axes, angle: float, value: float, thickness: int = -1) -> None:
    c = tuple(int(v) for v in _fixed(center))
    ax = tuple(max(1, int(v)) for v in _fixed(axes))
    cv2.ellipse(canvas, c, ax, float(angle), 0, 360, float(value), thickness, cv2.LINE_8, _SHIFT)


def _polyline(canvas: np.ndarray, points: np.ndarray, value: float, thickness: float) -> None:
    cv2.polylines(canvas, [_fixed(points)], False, float(value), max(1, round(thickness)), cv2.LINE_8, _SHIFT)


def _smooth_closed(points: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Chaikin corner cutting: a handful of control points becomes a smooth closed outline."""
    for _ in range(iterations):
        following = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * following, 0.25 * points + 0.75 * following], axis=1)
        points = points.reshape(-1, 2)
    return points


def _blob(rng: np.random.Generator, center, radius: float, n: int = 9, jitter=(0.6, 1.25)) -> np.ndarray:
    """Irregular rounded blob outline (pixel coordinates) around ``center``."""
    angles = np.linspace(0.0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi / n)
    radii = radius * rng.uniform(*jitter, n)
    points = np.asarray(center) + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return _smooth_closed(points, 2)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 12) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), max(sigma, 0.3))


def _vessel_trees(
    canvas: np.ndarray, rng: np.random.Generator, root, angles, length: float, width: float, value: float
) -> None:
    """Branching vessels: each tree forks three times, thinning and fading towards the periphery."""
    stack = [(np.asarray(root, dtype=np.float64), a, length, width, value, 3) for a in angles]
    while stack:
        start, angle, seg, thick, val, depth = stack.pop()
        angle += rng.normal(0.0, 0.15)
        end = start + seg * np.array([math.cos(angle), math.sin(angle)])
        _polyline(canvas, np.stack([start, end]), val, thick)
        if depth:
            for side in (-1.0, 1.0):
                child = (end, angle + side * rng.uniform(0.25, 0.65), seg * rng.uniform(0.6, 0.85))
                stack.append((*child, thick * 0.7, val * 0.85, depth - 1))


def _lesions(
    lung: np.ndarray,
    rng: np.random.Generator,
    *,
    count: tuple[int, int],
    radius: tuple[float, float],
    amplitude: tuple[float, float],
    blur: float,
    lower_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Patchy ground-glass opacities: (intensity to add, lesion mask), both confined to ``lung``.

    Centres favour the lung periphery (close to the pleura) and the lower/posterior part, as COVID-19
    pneumonia does. Each blob is blurred and textured so it looks hazy, not like a stamped disc.
    """
    size = lung.shape[0]
    lung_u8 = lung.astype(np.uint8)
    dist = cv2.distanceTransform(lung_u8, cv2.DIST_L2, 3)
    ys, xs = np.nonzero(lung)
    vertical = (ys - ys.min()) / max(int(np.ptp(ys)), 1)
    weight = np.exp(-dist[ys, xs] / (0.06 * size)) * (1.0 + lower_weight * vertical**2)
    picks = rng.choice(ys.size, size=int(rng.integers(count[0], count[1] + 1)), p=weight / weight.sum())

    strength = np.zeros(lung.shape, np.float32)
    shape = np.zeros(lung.shape, np.float32)
    for i in picks:
        outline = _blob(rng, (xs[i], ys[i]), rng.uniform(*radius) * size)
        _fill_poly(strength, outline, rng.uniform(*amplitude))
        _fill_poly(shape, outline, 1.0)
    sigma = blur * size
    shape = _blur(shape, sigma)
    texture = 0.6 + 0.8 * _smooth_noise(rng, size, cells=max(4, size // 10))
    add = _blur(strength, sigma) * texture * lung
    mask = (shape > 0.5) & lung
    if not mask.any():
        # A blob centred right on a thin lung edge can blur below 0.5; its core still marks the lesion.
        mask = (shape >= 0.5 * shape[lung].max()) & lung
    return add, mask


def _finish(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    noise: float,
    sigma: float,
    gain: float,
    offset: float,
    gamma: float,
) -> np.ndarray:
    """Acquisition look: noise, blur (detector/reconstruction), then the patient's contrast and brightness."""
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise)
    image = np.clip(_blur(image, sigma), 0.0, 1.0) ** np.float32(gamma)
    return (image - np.float32(0.5)) * np.float32(gain) + np.float32(0.5 + offset)


# ---------------------------------------------------------------------------------------------------- CT
def _ct(
    size: int, anatomy: np.random.Generator, sl: np.random.Generator, lesion_rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial chest CT slice in a lung window. Returns (image, lung mask, lesion mask)."""
    s = float(size)
    # --- patient anatomy (shared by all slices of the patient)
    cx, cy = s * (0.5 + anatomy.uniform(-0.02, 0.02)), s * (0.5 + anatomy.uniform(-0.02, 0.03))
    a = s * anatomy.uniform(0.40, 0.46)
    b = a * anatomy.uniform(0.62, 0.74)
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    r = anatomy.uniform(0.97, 1.03, t.size)
    body_y = np.sin(t) * np.where(np.sin(t) > 0, 0.9, 1.0)  # flatter back, where the patient lies
    body_unit = _smooth_closed(np.stack([r * np.cos(t), r * body_y], axis=1), 2)
    fat = anatomy.uniform(0.03, 0.09)
    lung_w, lung_h = a * anatomy.uniform(0.36, 0.4), b * anatomy.uniform(0.66, 0.76)
    lung_dx, tilt = a * anatomy.uniform(0.48, 0.52), anatomy.uniform(-0.15, 0.05)
    lung_jitter = anatomy.uniform(0.95, 1.05, (2, 12))
    dependent = anatomy.uniform(0.0, 0.12)  # gravity-dependent density at the back
    table = anatomy.random() < 0.7
    gain, offset, gamma = anatomy.uniform(0.75, 1.2), anatomy.uniform(-0.1, 0.08), anatomy.uniform(0.85, 1.2)

    # --- this slice: z in [-1, 1] from apex to base changes lung size, heart, trachea and rib positions
    z = sl.uniform(-1.0, 1.0)
    lung_scale = 1.0 - 0.15 * z**2
    dx, dy = sl.normal(0.0, 0.006 * s, 2)
    cx, cy = cx + dx, cy + dy

    image = np.zeros((size, size), np.float32)
    body_pts = body_unit * (a, b) + (cx, cy)
    _fill_poly(image, body_pts, 0.55)  # subcutaneous fat
    _fill_poly(image, body_unit * (a * (1 - fat), b * (1 - fat * a / b)) + (cx, cy), 0.68)  # muscle
    if table:
        x = np.linspace(cx - 0.9 * a, cx + 0.9 * a, 9)
        y = cy + b * 1.02 + 0.03 * s + 0.0004 * (x - cx) ** 2 / s
        _polyline(image, np.stack([x, y], axis=1), 0.5, 0.012 * s)
    support = image > 0
    # ribs in cross-section along the chest wall
    rib_t = np.linspace(0.15, 2 * np.pi - 0.15, 14) + 0.2 * z
    rib_t = rib_t[np.sin(rib_t) > -0.9]  # none at the sternum (top centre)
    for angle in rib_t:
        centre = (cx + 0.9 * a * (1 - fat) * math.cos(angle), cy + 0.88 * b * (1 - fat) * math.sin(angle))
        _ellipse(image, centre, (0.035 * a, 0.018 * a), math.degrees(angle) + 90, 0.93)
    # mediastinum: fat, heart (or great vessels / trachea high up), aorta, spine
    _ellipse(image, (cx, cy - 0.05 * b), (0.3 * a, 0.55 * b), 0, 0.6)
    if z > -0.35:
        heart = 0.75 + 0.25 * z
        _ellipse(image, (cx + 0.1 * a, cy - 0.08 * b), (0.3 * a * heart, 0.42 * b * heart), 25, 0.72)
    else:
        _ellipse(image, (cx - 0.05 * a, cy - 0.25 * b), (0.07 * a, 0.07 * a), 0, 0.74)
        _ellipse(image, (cx, cy - 0.05 * b), (0.055 * a, 0.055 * a), 0, 0.05)  # trachea (air)
    _ellipse(image, (cx + 0.14 * a, cy + 0.3 * b), (0.07 * a, 0.07 * a), 0, 0.74)  # descending aorta
    spine_c, spine_r = (cx, cy + 0.6 * b), 0.11 * a
    _ellipse(image, (spine_c[0], spine_c[1] + 1.5 * spine_r), (0.25 * spine_r, 0.8 * spine_r), 0, 0.95)
    _ellipse(image, spine_c, (spine_r, 0.9 * spine_r), 0, 0.95)
    _ellipse(image, spine_c, (0.75 * spine_r, 0.65 * spine_r), 0, 0.84)  # cancellous interior

    # lungs: bean shapes with a concave hilum facing the mediastinum; the left one makes room for the heart
    lung_u8 = np.zeros((size, size), np.uint8)
    hila = []
    for side, jitter, indent, width in ((-1, lung_jitter[0], 0.35, 1.0), (1, lung_jitter[1], 0.5, 0.92)):
        t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        u, v = jitter * np.cos(t), jitter * np.sin(t)
        u = np.where(u < 0, u * (1 - indent * (1 - v**2)), u)  # medial side (u < 0) is concave
        u, v = u * math.cos(tilt) - v * math.sin(tilt), u * math.sin(tilt) + v * math.cos(tilt)
        centre_x, centre_y = cx + side * lung_dx, cy - 0.05 * b
        w, h = lung_w * width * lung_scale, lung_h * lung_scale
        pts = np.stack([centre_x + side * u * w, centre_y + v * h], axis=1)  # u points laterally
        _fill_poly(lung_u8, _smooth_closed(pts), 1)
        hila.append((centre_x - side * 0.55 * w, centre_y))
    lung = lung_u8.astype(bool)
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    image = np.where(lung, 0.09 + dependent * rows**2, image).astype(np.float32)

    vessels = np.zeros_like(image)
    for side, hilum in zip((-1, 1), hila, strict=True):
        angles = math.pi * (side < 0) + np.linspace(-1.2, 1.2, 6) + sl.normal(0, 0.1, 6)
        _vessel_trees(vessels, sl, hilum, angles, 0.05 * s, 0.007 * s, 0.35)
    ys, xs = np.nonzero(lung)
    for i in sl.choice(ys.size, size=min(ys.size, 60), replace=False):
        cv2.circle(vessels, tuple(int(v) for v in _fixed((xs[i], ys[i]))), int(_ONE * sl.uniform(0.6, 1.8)),
                   float(sl.uniform(0.15, 0.4)), -1, cv2.LINE_8, _SHIFT)
    image += _blur(vessels, 0.5) * lung

    lesion = np.zeros_like(lung)
    if lesion_rng is not None:
        add, lesion = _lesions(lung, lesion_rng, count=(3, 7), radius=(0.03, 0.075), amplitude=(0.25, 0.5),
                               blur=0.012, lower_weight=2.0)
        image += add
    image = _finish(image, sl, noise=sl.uniform(0.04, 0.08), sigma=0.7, gain=gain * sl.uniform(0.95, 1.05),
                    offset=offset + sl.uniform(-0.02, 0.02), gamma=gamma)
    image = np.where(support, image, 0.0)  # air outside the body is below the lung window: black
    return image, lung, lesion


# --------------------------------------------------------------------------------------------------- CXR
def _cxr(
    size: int, anatomy: np.random.Generator, sl: np.random.Generator, lesion_rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frontal (PA) chest radiograph. Returns (image, lung mask, lesion mask)."""
    s = float(size)
    # --- patient anatomy; x grows to the image right (the patient's left), y downwards
    mid = 0.5 + anatomy.uniform(-0.02, 0.02)
    half = anatomy.uniform(0.36, 0.42)  # hemithorax width
    apex, base = anatomy.uniform(0.1, 0.16), anatomy.uniform(0.72, 0.8)
    dome = anatomy.uniform(0.05, 0.09)
    heart_w, heart_h = anatomy.uniform(0.17, 0.22), anatomy.uniform(0.1, 0.13)
    lung_jitter = anatomy.uniform(-0.02, 0.02, (2, 9, 2))
    gain, offset, gamma = anatomy.uniform(0.75, 1.2), anatomy.uniform(-0.1, 0.1), anatomy.uniform(0.8, 1.25)

    # --- this radiograph: depth of inspiration and a little positioning shift
    breath = sl.uniform(0.93, 1.0)
    mid += sl.normal(0.0, 0.005)
    base = apex + (base - apex) * breath
    top = sl.normal(0.0, 0.005)

    image = np.zeros((size, size), np.float32)
    trunk = np.array([[mid - 0.1, -0.05], [mid - 0.09, 0.06], [mid - half - 0.02, 0.12 + top],
                      [mid - half - 0.09, 0.2], [mid - half - 0.05, 0.55], [mid - half + 0.01, 1.05],
                      [mid + half - 0.01, 1.05], [mid + half + 0.05, 0.55], [mid + half + 0.09, 0.2],
                      [mid + half + 0.02, 0.12 + top], [mid + 0.09, 0.06], [mid + 0.1, -0.05]])
    _fill_poly(image, _smooth_closed(trunk, 2) * s, 0.5)
    for side in (-1, 1):  # humeral heads at the shoulders
        _ellipse(image, ((mid + side * (half + 0.06)) * s, 0.2 * s), (0.06 * s, 0.07 * s), 0, 0.62)

    xs = np.linspace(0.0, 1.0, size, dtype=np.float32)
    rows = xs[:, None]
    # diaphragm: two domes, the left (image right) a little lower; the abdomen below it is dense
    domes = [base - dome * np.exp(-(((xs - (mid + side * half * 0.5)) / (half * 0.45)) ** 2))
             for side in (-1, 1)]
    diaphragm = np.where(xs < mid, domes[0], domes[1] + 0.02)
    abdomen = rows > diaphragm[None, :]
    image = np.where(abdomen & (image > 0), image + 0.1 + 0.1 * (rows - base), image)
    # mediastinum, spine and trachea
    _fill_poly(image, np.array([[mid - 0.07, 0.0], [mid + 0.07, 0.0], [mid + 0.08, base],
                                [mid - 0.08, base]]) * s, 0.68)
    _fill_poly(image, np.array([[mid - 0.025, 0.0], [mid + 0.025, 0.0], [mid + 0.025, 1.0],
                                [mid - 0.025, 1.0]]) * s, 0.74)
    _polyline(image, np.array([[mid, 0.0], [mid, 0.27]]) * s, 0.55, 0.03 * s)
    heart_c = ((mid + 0.07) * s, (base - heart_h * 0.45) * s)
    heart_axes = (heart_w * s, heart_h * s)
    _ellipse(image, heart_c, heart_axes, 25, 0.76)

    # lung fields: rounded apex, convex lateral wall, straight mediastinal border; diaphragm closes them
    lung_u8 = np.zeros((size, size), np.uint8)
    for k, side in enumerate((-1, 1)):
        # (u, v): u from the mediastinum (0) to the lateral wall (1), v from apex (0) to below the dome
        unit = np.array([[0.35, 0.0], [0.6, 0.03], [0.8, 0.17], [0.94, 0.45], [1.0, 0.8], [1.0, 1.1],
                         [0.5, 1.1], [0.05, 1.1], [0.05, 0.5], [0.15, 0.1]])
        unit[:-1] += lung_jitter[k]
        px = np.stack([mid + side * (0.065 + unit[:, 0] * (half - 0.08)),
                       apex + unit[:, 1] * (base + 0.04 - apex)], axis=1)
        _fill_poly(lung_u8, _smooth_closed(px, 3) * s, 1)
    heart_u8 = np.zeros_like(lung_u8)
    _ellipse(heart_u8, heart_c, heart_axes, 25, 1)
    lung = lung_u8.astype(bool) & ~abdomen & ~heart_u8.astype(bool)
    lung_values = 0.2 + 0.1 * (1.0 - np.abs(xs - mid) / half)[None, :]  # denser towards the hila
    image = np.where(lung, lung_values, image).astype(np.float32)

    # bones and vessels: drawn on an overlay so they add to whatever lies beneath
    overlay = np.zeros_like(image)
    for side in (-1, 1):
        for k in range(10):  # posterior ribs arch up from the spine, then sweep down laterally
            y0 = apex - 0.02 + k * (base - apex) * 0.11
            tt = np.linspace(0.0, 1.0, 9)
            x = mid + side * (0.03 + tt * (half + 0.02))
            y = y0 - 0.035 * np.sin(np.pi * tt * 0.9) + 0.14 * tt**2
            _polyline(overlay, np.stack([x, y], axis=1) * s, 0.08, 0.016 * s)
            xa = mid + side * (half - tt * (half - 0.12))  # anterior ribs: fainter, sloping down medially
            _polyline(overlay, np.stack([xa, y0 + 0.1 + 0.1 * tt], axis=1) * s, 0.035, 0.014 * s)
        clavicle = np.array([[mid + side * 0.05, 0.13], [mid + side * 0.17, 0.11], [mid + side * 0.3, 0.09],
                             [mid + side * (half + 0.04), 0.1]])
        _polyline(overlay, (clavicle + np.array([0.0, top])) * s, 0.2, 0.025 * s)
        angles = np.pi * (side < 0) + side * np.linspace(-1.5, 0.9, 5) + sl.normal(0, 0.1, 5)
        _vessel_trees(overlay, sl, ((mid + side * 0.09) * s, (apex + 0.55 * (base - apex)) * s), angles,
                      0.07 * s, 0.01 * s, 0.12)
    # bones and vessels barely show through the dense mediastinum and heart
    image += _blur(overlay, 0.8) * np.where(image > 0.6, 0.3, 1.0) * (image > 0) * ~abdomen

    lesion = np.zeros_like(lung)
    if lesion_rng is not None:
        add, lesion = _lesions(lung, lesion_rng, count=(3, 6), radius=(0.04, 0.09), amplitude=(0.2, 0.4),
                               blur=0.02, lower_weight=3.0)
        image += add
    image = image + 0.04  # scatter: air outside the body is not perfectly black on a radiograph
    image = _finish(image, sl, noise=sl.uniform(0.02, 0.05), sigma=1.0, gain=gain * sl.uniform(0.95, 1.05),
                    offset=offset + sl.uniform(-0.03, 0.03), gamma=gamma)
    return image, lung, lesion


# ------------------------------------------------------------------------------------------------ public
def _check_int(name: str, value, minimum: int, hint: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid: must be an integer >= {minimum} ({hint})")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value!r} is too large: at most {maximum} ({hint})")
    return int(value)


def _check_disk_space(out: Path, n: int, size: int) -> None:
    """Refuse before the first write when the disk under ``out`` cannot hold the dataset."""
    need = int(n * (size * size * _BYTES_PER_PIXEL + _BYTES_PER_ROW))
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise StorageError(
            f"{n} phantoms of {size} px need about {need / 2**20:,.0f} MiB but the disk of {existing} has "
            f"{free / 2**20:,.0f} MiB free; ask for fewer images or write them to another disk"
        )


def _check_modality(modality) -> str:
    if modality not in MODALITIES:
        raise ConfigError(f"modality={modality!r} is unknown: use one of {', '.join(MODALITIES)}")
    return modality


def make_phantom(
    seed: int,
    *,
    modality: str = "ct",
    covid: bool,
    size: int = 256,
    anatomy_seed: int | None = None,
    site: str | SiteStyle = "default",
) -> Phantom:
    """Draw one phantom: ``seed`` picks slice and lesions, ``anatomy_seed`` (default ``seed``) the patient,
    ``site`` the scanner's rendering (:data:`SITES`)."""
    seed = _check_int("seed", seed, 0, "pass a non-negative integer")
    anatomy_seed = seed if anatomy_seed is None else _check_int(
        "anatomy_seed", anatomy_seed, 0, "pass a non-negative integer or None")
    size = _check_int("size", size, MIN_SIZE, _SIZE_HINT, MAX_SIZE)
    draw = {"ct": _ct, "cxr": _cxr}[_check_modality(modality)]
    lesion_rng = np.random.default_rng([seed, _LESION]) if covid else None
    style = _site_style(site)
    image, lung, lesion = draw(size, np.random.default_rng([anatomy_seed, _ANATOMY]),
                               np.random.default_rng([seed, _SLICE]), lesion_rng)
    if style != SiteStyle():
        noise = np.random.default_rng([seed, _SITE])
        image, (lung, lesion) = _render_site(image, (lung, lesion), style, noise)
    return Phantom(
        image=np.clip(image, 0.0, 1.0).astype(np.float32),
        lung_mask=lung,
        lesion_mask=lesion,
        label=CLASSES[int(bool(covid))],
        modality=modality,
    )


def _derived_seed(*key: int) -> int:
    """A 32-bit seed derived from a dataset seed and indices, so patients and slices never collide."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])




_PHANTOM_LAYOUT = re.compile(r"(images/(covid|non_covid)|masks/(lung|lesion))/phantom-(ct|cxr)-\d+-s\d+\.png")


def _check_only_phantoms(out: Path) -> None:
    """Refuse a folder whose manifest.csv is not an earlier phantom dataset's (it would be replaced) or
    whose images/ or masks/ hold other files (phantoms would mix with them)."""
    manifest = out / "manifest.csv"
    foreign: Path | None = None
    if manifest.is_file():
        try:
            paths = pd.read_csv(manifest, usecols=["path"], dtype=str)["path"]
            if not paths.map(lambda p: bool(_PHANTOM_LAYOUT.fullmatch(str(p)))).all():
                foreign = manifest
        except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError):
            foreign = manifest
    others = (p for sub in ("images", "masks") for p in (out / sub).rglob("*")
              if p.is_file() and not _PHANTOM_LAYOUT.fullmatch(p.relative_to(out).as_posix()))
    foreign = foreign or next(others, None)
    if foreign is not None:
        raise ConfigError(
            f"output folder {out} holds {foreign}, which is not part of an earlier phantom dataset: writing "
            "phantoms there would replace its manifest.csv or mix with its images; choose a new folder"
        )


def write_phantom_dataset(
    out_dir: str | Path,
    *,
    n: int = 200,
    modality: str = "ct",
    seed: int = 0,
    slices_per_patient: int = 4,
    size: int = 256,
    site: str | SiteStyle = "default",
    overwrite: bool = False,
) -> Path:
    """Write ``n`` phantoms (balanced classes, ``slices_per_patient`` per patient); return the manifest path.

    ``site`` renders every image as that site's scanner would (:data:`SITES`); the patients stay the same.

    Layout under ``out_dir``: ``images/{covid,non_covid}/NAME.png``, ``masks/lung/NAME.png`` and
    ``masks/lesion/NAME.png`` (0/255), and ``manifest.csv`` (path, label, patient_id, lung_mask,
    lesion_mask; paths relative to the manifest's folder). A folder that is not empty is refused unless
    ``overwrite``, and even then unless it holds an earlier phantom dataset alone; phantom files left from
    an earlier run with other settings are then removed so that folder scans see only this dataset.
    """
    n = _check_int("n", n, 2, "a dataset needs at least one image per class", MAX_IMAGES)
    modality = _check_modality(modality)
    seed = _check_int("seed", seed, 0, "pass a non-negative integer")
    per_patient = _check_int("slices_per_patient", slices_per_patient, 1, "each patient needs a slice")
    size = _check_int("size", size, MIN_SIZE, _SIZE_HINT, MAX_SIZE)
    style = _site_style(site)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is an existing file: choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder {out} is not empty; choose a new folder, or pass --overwrite "
                              "to replace an earlier phantom dataset there")
        _check_only_phantoms(out)
    _check_disk_space(out, n, size)
    subfolders = ("images/covid", "images/non_covid", "masks/lung", "masks/lesion")
    folders = {name: out / name for name in subfolders}
    try:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc

    counts = {"covid": n // 2, "non_covid": n - n // 2}
    rows: list[dict[str, str]] = []
    patient = 0
    # Alternate the classes patient by patient, so a truncated run still holds both.
    remaining = dict(counts)
    while any(remaining.values()):
        for label in CLASSES:
            slices = min(per_patient, remaining[label])
            if not slices:
                continue
            patient_id = f"phantom-{modality}-{patient:04d}"
            anatomy_seed = _derived_seed(seed, _ANATOMY, patient)
            for k in range(slices):
                phantom = make_phantom(_derived_seed(seed, _SLICE, patient, k), modality=modality,
                                       covid=label == "covid", size=size, anatomy_seed=anatomy_seed,
                                       site=style)
                name = f"{patient_id}-s{k}.png"
                image = to_uint8(phantom.image)
                paths = {"path": f"images/{label}/{name}", "lung_mask": f"masks/lung/{name}",
                         "lesion_mask": f"masks/lesion/{name}"}
                write_png(out / paths["path"], image)
                write_png(out / paths["lung_mask"], phantom.lung_mask.astype(np.uint8) * 255)
                write_png(out / paths["lesion_mask"], phantom.lesion_mask.astype(np.uint8) * 255)
                rows.append({**paths, "label": label, "patient_id": patient_id})
            remaining[label] -= slices
            patient += 1

    written = {out / row[key] for row in rows for key in ("path", "lung_mask", "lesion_mask")}
    for folder in folders.values():
        for stale in folder.glob("phantom-*.png"):
            if stale not in written:
                stale.unlink()
    manifest = out / "manifest.csv"
    write_csv(pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)), manifest, "manifest ")
    return manifest
