"""Types and small array helpers shared by the PIL and DICOM readers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

LUNG_WINDOW: tuple[float, float] = (1500.0, -600.0)
"""Default CT window as (width, level) in Hounsfield units: air black, soft tissue and bone white."""


@dataclass(frozen=True)
class ImageMeta:
    """Where an image came from and what it was before conversion to gray float."""

    path: Path
    format: str  # "PNG", "JPEG", "BMP", "TIFF", "DICOM"
    mode: str  # PIL mode ("L", "I;16", "P", "RGB", ...) or DICOM PhotometricInterpretation
    original_size: tuple[int, int]  # (height, width) of the decoded pixels
    modality: str | None  # DICOM Modality ("CT", "CR", "DX", ...); None for ordinary image files
    patient_id: str | None  # DICOM PatientID when present
    series_uid: str | None = None  # DICOM SeriesInstanceUID
    instance_number: int | None = None
    slice_position: float | None = None  # position along the slice normal (z for axial slices)
    body_part: str | None = None  # DICOM BodyPartExamined ("CHEST", "HEAD", ...)
    colour: float = 0.0  # fraction of visibly coloured pixels before conversion to gray (0 for gray files)


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels (see ``check_header``)."""

    path: Path
    format: str
    height: int
    width: int
    frames: int = 1
    modality: str | None = None
    body_part: str | None = None


# eq=False: comparing or hashing the pixel array field-wise is ambiguous for numpy, so identity it is.
@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded image: float32 (H, W) gray pixels in [0, 1] plus where they came from."""

    pixels: np.ndarray
    meta: ImageMeta


def rgb_to_gray(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    """(H, W, 3+) integer or float colour -> float32 (H, W) luminance in [0, 1] (ITU-R 601, no rounding)."""
    # OpenCV's float RGB2GRAY uses exactly 0.299/0.587/0.114 and is faster than a numpy dot here.
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3], dtype=np.float32), cv2.COLOR_RGB2GRAY)
    gray /= np.float32(full_scale)
    return np.clip(gray, 0.0, 1.0, out=gray)


def scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low -> 0`` and ``high -> 1`` linearly as float32, clipping outside (``high <= low`` gives 0)."""
    out = np.asarray(values, dtype=np.float32)
    if out is values:
        out = out.copy()  # never scale the caller's array in place
    if low:
        out -= np.float32(low)
    if high > low:
        out /= np.float32(high - low)
    else:
        out[:] = 0.0
    return np.clip(out, 0.0, 1.0, out=out)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Gray float in [0, 1] -> uint8 0..255 (rounded to nearest, values outside [0, 1] clipped)."""
    return np.clip(np.rint(np.asarray(pixels, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def pixel_hash(pixels: np.ndarray) -> str:
    """SHA-1 of an image's 8-bit pixels and shape: equal for the same picture in any file or container."""
    quantised = to_uint8(pixels)
    return hashlib.sha1(quantised.tobytes() + repr(quantised.shape).encode()).hexdigest()


def unit_histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal bins over [0, 1], as ``np.histogram(values, bins, (0, 1))[0]``.

    Equal to numpy's to the count (values outside [0, 1] and NaN are left out, 1.0 falls in the last bin),
    at a fifth of its cost: with a power-of-two ``bins`` the bin of ``v`` is exactly ``floor(v * bins)``.
    """
    if bins < 1 or bins & (bins - 1):
        raise ValueError(f"unit_histogram needs a power-of-two number of bins, got {bins}")
    flat = np.ravel(values)
    inside = (flat >= 0) & (flat <= 1)  # False for NaN
    if not inside.all():
        flat = flat[inside]
    index = (flat * np.float32(bins)).astype(np.intp)
    return np.bincount(np.minimum(index, bins - 1, out=index), minlength=bins)
