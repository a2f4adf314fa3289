"""The quality gate: one definition of whether an image is fit for a run, used by every command.

Two stages. ``check_pixel_count`` runs on the header, before any pixel is decoded, so a tiny file that
declares a huge image (a decompression bomb) costs nothing; ``read_image`` applies it to every file.
``assess`` runs on the decoded image and returns a ``QualityReport``: *refusals* (the image must get no
label and no probability: tiny, elongated, constant, blank, wrong or missing DICOM modality, a body part
that is not the chest, an image file whose content is not the run's kind of chest image: ``wrong_content``,
see :mod:`covidscan.io.content`) and *warnings* (doubtful but usable: small, rather elongated, a DICOM
modality or body part that cannot be confirmed, an inverted CT gray scale). Each entry is
``"code: details"`` with no ``;`` inside, so a ``;``-joined list splits back cleanly. The same code may
appear as a refusal or a warning depending on how far past the limit an image is (``tiny``, ``elongated``,
``body_part``).

Whether the lungs can be found is not judged here: that needs the lung finder (``covidscan.preprocess``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidscan.errors import ConfigError, ImageRefusedError

from .base import LoadedImage
from .content import judge_content

MAX_PIXELS_ENV = "COVIDSCAN_MAX_PIXELS"
"""Environment variable that sets the default ``QualityLimits.max_pixels``."""
DEFAULT_MAX_PIXELS = 50_000_000
"""50 megapixels: a 7000x7000 detector image fits, a 12000x12000 bomb (3.9 GB once decoded) does not."""

MODEL_MODALITIES = {"ct": "chest CT slices", "cxr": "chest X-rays"}
DICOM_MODALITY = {"CT": "ct", "CR": "cxr", "DX": "cxr", "DR": "cxr", "RG": "cxr"}
"""DICOM Modality codes -> the covidscan modality of models trained on them."""
DOUBTFUL_MODALITIES = {"OT": "other", "SC": "secondary capture"}
"""Codes a converted or screen-captured chest image may legitimately carry: warned, not refused."""
_MODALITY_NAMES = {
    "MR": "magnetic resonance", "US": "ultrasound", "SR": "structured report", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy", "ES": "endoscopy",
    "OP": "ophthalmic photography", "IO": "intra-oral radiography", "PX": "panoramic dental X-ray",
    "ECG": "electrocardiogram", "SEG": "segmentation", "RTSTRUCT": "radiotherapy structure set",
}
_CHEST_PART = re.compile(r"CHEST|THORA|LUNG|TORAX|PULMO")
"""BodyPartExamined values that name the chest (defined terms CHEST, CHESTABDOMEN, ... and free text)."""
_OTHER_PART = re.compile(
    r"HEAD|BRAIN|SKULL|FACE|ORBIT|SINUS|JAW|TMJ|PELVIS|HIP|KNEE|LEG|ANKLE|FOOT|TOE|ARM|ELBOW|WRIST|"
    r"HAND|FINGER|EXTREMITY|CSPINE|LSPINE|SSPINE|COCCYX"
)
"""Body parts that show no lung at all: refused. Any other unrecognised value is only warned about."""


def _env_max_pixels() -> int:
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        return int(float(text))
    except ValueError:
        raise ConfigError(f"{MAX_PIXELS_ENV}={text!r} must be a number of pixels, e.g. 50000000") from None


@dataclass(frozen=True)
class QualityLimits:
    """The gate's thresholds. ``max_pixels`` defaults to ``$COVIDSCAN_MAX_PIXELS``, else 50 megapixels."""

    max_pixels: int = field(default_factory=_env_max_pixels)
    """Largest height x width x frames decoded at all (checked from the header)."""
    min_side: int = 32
    """Shorter sides below this are refused: too few pixels to show lungs (every real set here has >= 61).
    At least 8, so that the inverted check's zones are never empty."""
    small_side: int = 128
    """Shorter sides below this are warned about: the model sees mostly interpolation."""
    max_aspect: float = 5.0
    """Longer / shorter side above this is refused (a strip, not a chest image)."""
    warn_aspect: float = 3.0
    """... and above this warned about (side-by-side figure panels reach 2.4 in ../shared)."""
    blank_std: float = 0.02
    """Gray-level standard deviation (image in [0, 1]) below which an image is refused as blank."""
    inverted_margin: float = 0.05
    """How much brighter (mean, in [0, 1]) the lung zones of a CT slice must be than its middle to warn."""

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 8 or self.small_side < self.min_side:
            raise ConfigError(f"{self}: need max_pixels >= 1 and 8 <= min_side <= small_side")
        if not 1.0 <= self.warn_aspect <= self.max_aspect or not 0 <= self.blank_std < 1:
            raise ConfigError(f"{self}: need 1 <= warn_aspect <= max_aspect and 0 <= blank_std < 1")


def check_pixel_count(path: str | Path, height: int, width: int, frames: int = 1,
                      limits: QualityLimits | None = None) -> None:
    """Refuse (``ImageRefusedError``, code ``too_large``) a header declaring more pixels than allowed."""
    limits = limits or QualityLimits()
    count = int(height) * int(width) * max(1, int(frames))
    if count > limits.max_pixels:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageRefusedError(
            path, [f"too_large: header declares {height}x{width}{frames_text} = {count / 1e6:.1f} "
                   f"megapixels, over the limit of {limits.max_pixels / 1e6:.1f}"],
            f"downscale the image, or raise the limit with {MAX_PIXELS_ENV} if it is a genuine image",
        )


@dataclass(frozen=True)
class QualityReport:
    """What the gate found: refused images get no label and no probability, warnings travel with them."""

    path: Path
    refusals: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing was refused (there may still be warnings)."""
        return not self.refusals

    @property
    def codes(self) -> tuple[str, ...]:
        """The codes of every refusal and warning, in order."""
        return tuple(entry.split(":", 1)[0] for entry in self.refusals + self.warnings)

    def raise_if_refused(self) -> None:
        """Raise ``ImageRefusedError`` naming the file and every refusal, if there is any."""
        if self.refusals:
            raise ImageRefusedError(self.path, self.refusals,
                                    "leave the file out, or replace it with a readable chest image")


def _check_modality(modality: str | None) -> str | None:
    if modality is not None and modality not in MODEL_MODALITIES:
        raise ConfigError(f"modality={modality!r}: use one of {', '.join(MODEL_MODALITIES)} (or None: any)")
    return modality


def _size(h: int, w: int, limits: QualityLimits) -> tuple[list[str], list[str]]:
    refusals, warnings = [], []
    short, long = min(h, w), max(h, w)
    aspect = long / max(short, 1)
    if short < limits.min_side:
        refusals.append(f"tiny: {h}x{w} px, shorter side under {limits.min_side} px")
    elif short < limits.small_side:
        warnings.append(f"tiny: {h}x{w} px, shorter side under {limits.small_side} px")
    if aspect > limits.warn_aspect:
        (refusals if aspect > limits.max_aspect else warnings).append(
            f"elongated: {h}x{w} px, one side {aspect:.1f} times the other "
            f"(limit {limits.max_aspect if aspect > limits.max_aspect else limits.warn_aspect:g})"
        )
    return refusals, warnings


def _dicom(modality_tag: str | None, body_part: str | None, model: str | None) -> tuple[list[str], list[str]]:
    """Refusals and warnings from the DICOM Modality and BodyPartExamined attributes."""
    refusals, warnings = [], []
    wanted = MODEL_MODALITIES[model] if model else "chest CT slices or chest X-rays"
    tag = (modality_tag or "").strip().upper()
    kind = DICOM_MODALITY.get(tag)
    if not tag:
        refusals.append(f"missing_modality: DICOM file without a Modality attribute (required), "
                        f"cannot confirm it holds {wanted}")
    elif tag in DOUBTFUL_MODALITIES:
        warnings.append(f"other_modality: DICOM Modality {tag} ({DOUBTFUL_MODALITIES[tag]}), "
                        f"cannot confirm it holds {wanted}")
    elif kind is None or (model is not None and kind != model):
        what = MODEL_MODALITIES[kind] if kind else _MODALITY_NAMES.get(tag, "not a CT or X-ray code")
        refusals.append(f"wrong_modality: DICOM Modality {tag} ({what}) but the run expects {wanted}")
    part = re.sub(r"[^A-Z]", "", (body_part or "").upper())
    if part and not _CHEST_PART.search(part):
        (refusals if _OTHER_PART.search(part) else warnings).append(
            f"body_part: DICOM BodyPartExamined {body_part.strip()} is not the chest"  # type: ignore[union-attr]
        )
    return refusals, warnings


def inverted_contrast(pixels: np.ndarray) -> tuple[float, float]:
    """(mean of the two lung zones, mean of the mediastinum) of a chest CT slice, both in [0, 1].

    In the middle half of the rows the lungs lie either side of the centre (columns 1/8..3/8 and 5/8..7/8)
    and the mediastinum between them (the central 1/8): lungs are darker whether the slice is cropped to
    the chest or shows the air around the body, and brighter when the gray scale is inverted. (The old
    rule, corners brighter than the middle, fired on tightly cropped slices with tissue in the corners.)
    """
    h, w = pixels.shape
    rows = slice(h // 4, h - h // 4)
    left, right = pixels[rows, w // 8 : 3 * w // 8], pixels[rows, w - 3 * w // 8 : w - w // 8]
    middle = pixels[rows, w // 2 - w // 16 : w // 2 + w // 16 + 1]
    return (float(left.mean()) + float(right.mean())) / 2, float(middle.mean())


def assess(
    loaded: LoadedImage, modality: str | None = None, limits: QualityLimits | None = None
) -> QualityReport:
    """Judge a decoded image for a run on ``modality`` (``"ct"``, ``"cxr"``, or ``None``: either).

    Size first: a refused size ends the assessment (nothing else means anything on a sliver). Then the
    DICOM Modality and BodyPartExamined, then the pixels: constant and blank images are refused; any
    other file without a DICOM Modality is refused when its content is not a chest CT slice or X-ray of
    the run's kind (``wrong_content``, :func:`covidscan.io.content.judge_content`); for CT an inverted gray
    scale is warned about.
    """
    limits = limits or QualityLimits()
    model = _check_modality(modality)
    meta = loaded.meta
    h, w = loaded.pixels.shape[:2]
    refusals, warnings = _size(h, w, limits)
    if refusals:
        return QualityReport(meta.path, tuple(refusals), tuple(warnings))
    if meta.format == "DICOM":
        more_refusals, more_warnings = _dicom(meta.modality, meta.body_part, model)
        refusals += more_refusals
        warnings += more_warnings
    pixels = loaded.pixels
    low, high = float(pixels.min()), float(pixels.max())
    std = float(pixels.std())
    if high - low < 1 / 255:
        shade = "all black" if high < 1 / 255 else "all white" if low > 254 / 255 else "one gray level"
        refusals.append(f"constant: every pixel is {low:.2f} ({shade})")
    elif std < limits.blank_std:
        refusals.append(f"blank: nearly uniform image (gray std {std:.3f} < {limits.blank_std})")
    else:
        if meta.format != "DICOM":  # a DICOM file's Modality says what it holds; other files need a look
            refusals += judge_content(loaded, model)
        lungs, middle = inverted_contrast(pixels)
        if model == "ct" and not refusals and lungs - middle > limits.inverted_margin:
            warnings.append(f"inverted: lung zones brighter than the mediastinum ({lungs:.2f} vs "
                            f"{middle:.2f}), lungs and air should be dark (inverted gray scale?)")
    return QualityReport(meta.path, tuple(refusals), tuple(warnings))


def gate(
    loaded: LoadedImage, modality: str | None = None, limits: QualityLimits | None = None
) -> QualityReport:
    """The quality gate every image passes before it is trained on or scored: :func:`assess`, then
    ``ImageRefusedError`` (naming the file and every refusal) when anything is refused; returns the report
    with its warnings otherwise."""
    report = assess(loaded, modality, limits)
    report.raise_if_refused()
    return report
