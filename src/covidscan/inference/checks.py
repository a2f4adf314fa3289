"""Cheap checks that an input looks like the images a model was trained on.

They are heuristics meant to make a doctor look twice, not a validation: each costs a few array
reductions on the decoded image. Every warning starts with a short code (``tiny``, ``blank``,
``other_modality``, ``no_lungs``, ``inverted``) followed by what was measured; none contains ``;`` so a
``;``-joined list splits back cleanly.
"""

from __future__ import annotations

import numpy as np

from covidscan.io import ImageMeta

TINY_SIDE = 128
"""Shorter sides below this (pixels) are upscaled so much that the model sees mostly interpolation."""
BLANK_STD = 0.02
"""Gray-level standard deviation (image scaled to [0, 1]) below which an image is considered blank."""
DICOM_MODALITY = {"CT": "ct", "CR": "cxr", "DX": "cxr", "DR": "cxr", "RG": "cxr"}
"""DICOM Modality codes -> the covidscan modality of models trained on them."""
INVERTED_MARGIN = 0.35
"""How much brighter (median, on [0, 1]) the corners of a CT slice must be than its middle to warn."""
_NAMES = {"ct": "chest CT slices", "cxr": "chest X-rays"}


def _inverted(pixels: np.ndarray) -> tuple[bool, float, float]:
    """CT air (the corners, outside the body) is black; inverted slices have white corners, a dark middle.

    Compares the median of the four corner patches (1/8 of each side) with the mean of the central half.
    The margin keeps paper figures on white pages quiet: under 2% of the ucsd-ct images trigger it.
    """
    h, w = pixels.shape
    by, bx = max(1, h // 8), max(1, w // 8)
    corners = np.concatenate(
        [pixels[:by, :bx], pixels[:by, -bx:], pixels[-by:, :bx], pixels[-by:, -bx:]], axis=None
    )
    corner, middle = float(np.median(corners)), float(pixels[h // 4 : h - h // 4, w // 4 : w - w // 4].mean())
    return corner - middle > INVERTED_MARGIN, corner, middle


def input_warnings(
    pixels: np.ndarray, meta: ImageMeta, lungs_found: bool | None, model_modality: str
) -> list[str]:
    """Warnings for a decoded gray image (float [0, 1]) fed to a model trained on ``model_modality``."""
    found: list[str] = []
    h, w = pixels.shape
    if min(h, w) < TINY_SIDE:
        found.append(f"tiny: {h}x{w} px, shorter side under {TINY_SIDE} px")
    std = float(pixels.std())
    if std < BLANK_STD:
        found.append(f"blank: nearly uniform image (gray std {std:.3f} < {BLANK_STD})")
        return found  # the other checks mean nothing on a blank image
    kind = DICOM_MODALITY.get(meta.modality or "")
    if kind is not None and kind != model_modality:
        found.append(
            f"other_modality: DICOM Modality {meta.modality} ({_NAMES[kind]}) but the model was trained "
            f"on {_NAMES[model_modality]}"
        )
    if lungs_found is False:
        found.append(f"no_lungs: lung finder found no lungs (not like the {_NAMES[model_modality]} the "
                     "model was trained on?), the whole image was used")
    if model_modality == "ct":
        inverted, corner, middle = _inverted(pixels)
        if inverted:
            found.append(f"inverted: corners much brighter than the middle ({corner:.2f} vs {middle:.2f}), "
                         "air around the body should be black (inverted gray scale?)")
    return found
