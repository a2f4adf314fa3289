"""What an image file shows, when no DICOM Modality says it: a chest CT slice, a chest X-ray, or neither.

A PNG, JPEG, BMP or TIFF carries no Modality, so a run would otherwise give a probability to anything: an
X-ray handed to a CT model, a photo, a screenshot, a black picture with a white frame. Two judges, both
cheap and both run before the model sees the image:

* colour: chest images are gray; a file in which more than ``COLOUR_LIMIT`` of the pixels carry a
  visible colour (``ImageMeta.colour``) is a photo, a chart or a heat map, not a chest image;
* a small classifier (a two-layer perceptron on :data:`FEATURE_NAMES`: the image's coarse layout, local
  contrast, histogram, borders, symmetry, edges and flat areas) giving P(CT slice), P(chest X-ray) and
  P(neither). Its weights are data (``content_model.json``), fitted by ``benchmarks/measure_content.py``
  on CT and X-ray phantoms, generated photos, screenshots, documents and framed images, and the training
  split of the real development sets; that script also measures false and true refusals on every real
  image in ``../shared`` and chose ``min_p`` (in the JSON): the smallest probability of the run's own kind
  below which an image is refused.

``judge_content`` returns the refusals (code ``wrong_content``) for a run's modality; the quality gate
(:func:`covidscan.io.assess`) calls it for every image without a DICOM Modality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import cv2
import numpy as np

from covidscan.errors import ConfigError

from .base import LoadedImage, to_uint8, unit_histogram

CONTENT_KINDS: tuple[str, ...] = ("ct", "cxr", "other")
"""The classifier's classes, in the order of its probabilities."""
_KIND_NAMES = {"ct": "a chest CT slice", "cxr": "a chest X-ray", "other": "neither a chest CT slice nor a "
               "chest X-ray (a photo, screenshot, document or drawing?)"}
COLOUR_LIMIT = 0.05
"""Largest fraction of coloured pixels (``colour_fraction``) a chest image may have. Films saved as RGB,
RGBA or palette files have almost none (at most 0.02% among the colour originals in
../shared/data/raw-formats, coloured arrows, labels and two purple-tinted X-rays included); photos, charts
and heat maps have far more."""
COLOUR_CHROMA = 0.1
"""A pixel counts as coloured when its largest and smallest channels differ by more than this (in [0, 1])."""
_TINT_HUES = 30.0  # degrees either side of the dominant hue that still count as the film's tint
_GRID, _CELLS, _BINS, _SIDE = 6, 4, 16, 96
FEATURE_NAMES: tuple[str, ...] = (
    *(f"grid{i:02d}" for i in range(_GRID * _GRID)),
    *(f"cellstd{i:02d}" for i in range(_CELLS * _CELLS)),
    *(f"hist{i:02d}" for i in range(_BINS)),
    "mean", "std", "near_black", "near_white", "border_mean", "border_std", "centre_mean",
    "symmetry", "edge_mean", "edge_strong", "flat", "top_level", "levels", "log_aspect",
)
"""Names of the :func:`content_features` entries, in order."""
MODEL_FILE = "content_model.json"
_FORMAT = "covidscan-content/1"


def colour_fraction(rgb: np.ndarray, full_scale: float) -> float:
    """Fraction of pixels of an (H, W, 3+) image coloured in a hue other than the image's dominant one.

    A pixel is coloured when its largest and smallest channels differ by more than ``COLOUR_CHROMA``; a
    film tinted in one hue (sepia, purple: two such X-rays are in ../shared/data/raw-formats) is a gray
    image, so coloured pixels within ``_TINT_HUES`` of the commonest hue do not count.
    """
    step = max(1, max(rgb.shape[:2]) // 512)  # a strided view: the same fraction, cheaply
    sample = np.ascontiguousarray(rgb[::step, ::step, :3], dtype=np.float32) / np.float32(full_scale)
    chroma = sample.max(axis=2) - sample.min(axis=2)
    coloured = chroma > COLOUR_CHROMA
    if not coloured.any():
        return 0.0
    hue = cv2.cvtColor(sample, cv2.COLOR_RGB2HSV)[..., 0][coloured]  # degrees, 0..360
    dominant = np.argmax(np.bincount((hue // 10).astype(np.int64) % 36, minlength=36)) * 10 + 5
    away = np.abs((hue - dominant + 180) % 360 - 180) > _TINT_HUES
    return float(away.sum() / coloured.size)


def content_features(pixels: np.ndarray) -> np.ndarray:
    """Cheap statistics of a gray (H, W) image in [0, 1] that tell CT slices, X-rays and other pictures apart.

    Coarse layout (a 6x6 grid of means), local contrast (a 4x4 grid of stds), a 16-bin histogram, mean,
    std, near-black and near-white fractions, the border ring against the centre, left-right symmetry,
    edge density (mean and strong Sobel gradients), flat areas (neighbours of exactly equal 8-bit level,
    as in screenshots and documents), the share of the commonest level, the number of levels used, and
    the aspect ratio.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise ConfigError(f"content_features needs a gray (H, W) image; got an array of shape {pixels.shape}")
    h, w = pixels.shape
    small = cv2.resize(pixels, (_SIDE, _SIDE), interpolation=cv2.INTER_AREA)
    grid = cv2.resize(small, (_GRID, _GRID), interpolation=cv2.INTER_AREA).ravel()
    means = cv2.resize(small, (_CELLS, _CELLS), interpolation=cv2.INTER_AREA)
    squares = cv2.resize(small * small, (_CELLS, _CELLS), interpolation=cv2.INTER_AREA)
    cell_std = np.sqrt(np.maximum(squares - means * means, 0.0)).ravel()
    hist = unit_histogram(small, _BINS) / small.size
    ring = _SIDE // 12
    border = np.concatenate([small[:ring].ravel(), small[-ring:].ravel(), small[ring:-ring, :ring].ravel(),
                             small[ring:-ring, -ring:].ravel()])
    centre = small[_SIDE // 4 : -_SIDE // 4, _SIDE // 4 : -_SIDE // 4]
    grad = np.hypot(cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3))
    step = max(1, max(h, w) // 512)
    levels = to_uint8(pixels[::step, ::step])
    counts = np.bincount(levels.ravel(), minlength=256) / levels.size
    flat = float((levels[:, 1:] == levels[:, :-1]).mean()) if levels.shape[1] > 1 else 1.0
    extra = [
        small.mean(), small.std(), (small < 0.02).mean(), (small > 0.98).mean(), border.mean(), border.std(),
        centre.mean(), np.abs(small - small[:, ::-1]).mean(), grad.mean() / 4, (grad > 1.0).mean(), flat,
        counts.max(), (counts > 0).mean(), np.log(w / h),
    ]
    return np.concatenate([grid, cell_std, hist, np.asarray(extra, dtype=np.float64)]).astype(np.float32)


@dataclass(frozen=True)
class ContentModel:
    """The fitted classifier: standardisation, a ReLU hidden layer, softmax over :data:`CONTENT_KINDS`."""

    centre: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    min_p: float
    """An image whose probability of the run's own kind is below this is refused."""

    def proba(self, features: np.ndarray) -> np.ndarray:
        """(N, 3) probabilities of :data:`CONTENT_KINDS` for (N, len(FEATURE_NAMES)) features."""
        x = (np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.centre) / self.scale
        for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
            x = np.maximum(x @ weight + bias, 0.0)
        z = x @ self.weights[-1] + self.biases[-1]
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        """The JSON form (``extra``: provenance and measured figures, kept beside the weights)."""
        return {"format": _FORMAT, "features": list(FEATURE_NAMES), "kinds": list(CONTENT_KINDS),
                "centre": self.centre.tolist(), "scale": self.scale.tolist(),
                "weights": [w.round(6).tolist() for w in self.weights],
                "biases": [b.round(6).tolist() for b in self.biases], "min_p": self.min_p, **extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContentModel:
        """Read the JSON form, checking it was fitted on these features."""
        if data.get("format") != _FORMAT or tuple(data.get("features", ())) != FEATURE_NAMES:
            raise ConfigError(f"{MODEL_FILE} was fitted on other features; refit it with "
                              "benchmarks/measure_content.py")
        weights = tuple(np.asarray(w) for w in data["weights"])
        biases = tuple(np.asarray(b) for b in data["biases"])
        centre, scale = np.asarray(data["centre"]), np.asarray(data["scale"])
        return cls(centre, scale, weights, biases, float(data["min_p"]))


@cache
def content_model() -> ContentModel:
    """The classifier shipped with covidscan (read once)."""
    text = resources.files("covidscan.io").joinpath(MODEL_FILE).read_text(encoding="utf-8")
    return ContentModel.from_dict(json.loads(text))


def judge_content(
    loaded: LoadedImage, model: str | None, classifier: ContentModel | None = None
) -> list[str]:
    """Refusals (``wrong_content: ...``) of an image for a run on ``model`` (``ct``, ``cxr``, None: either).

    Colour first (a colour picture is no chest image), then the classifier: refused when the probability
    of the run's kind (of either kind when ``model`` is None) is below the classifier's ``min_p``.
    """
    if loaded.meta.colour > COLOUR_LIMIT:
        return [f"wrong_content: a colour picture ({loaded.meta.colour:.0%} of the pixels coloured), "
                "chest CT slices and X-rays are gray"]
    classifier = classifier or content_model()
    p = classifier.proba(content_features(loaded.pixels))[0]
    wanted = [CONTENT_KINDS.index(model)] if model else [0, 1]
    if p[wanted].sum() >= classifier.min_p:
        return []
    kind = CONTENT_KINDS[int(p.argmax())]
    expected = _KIND_NAMES[model] if model else "a chest CT slice or chest X-ray"
    return [f"wrong_content: the picture looks like {_KIND_NAMES[kind]} (p {p.max():.2f}), not like "
            f"{expected} (p {p[wanted].sum():.3f})"]


__all__ = ["COLOUR_LIMIT", "CONTENT_KINDS", "FEATURE_NAMES", "ContentModel", "colour_fraction",
           "content_features", "content_model", "judge_content"]
