"""Explain a trained run's decision on files: Grad-CAM on the model input, drawn on the original image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covidscan.errors import CovidscanError
from covidscan.explain.cam import cam_metrics, cam_region, cam_to_original, gradcam, region_bbox
from covidscan.explain.render import save_overlay
from covidscan.io import read_image
from covidscan.preprocess import PreparedImage, find_lungs

if TYPE_CHECKING:
    from covidscan.inference import Predictor


def _per_image(values: Sequence[Any] | None, n: int, name: str) -> Sequence[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise CovidscanError(f"{name} has {len(values)} entries for {n} images; give one per image")
    return values


def explain_prepared(
    predictor: Predictor,
    prepared: Sequence[PreparedImage],
    out_pngs: Sequence[str | Path | None] | None = None,
    *,
    lung_masks: Sequence[np.ndarray | None] | None = None,
    lesion_masks: Sequence[np.ndarray | None] | None = None,
    titles: Sequence[str | None] | None = None,
    layers: bool = False,
    target: int = 1,
    threshold: float = 0.5,
    tolerance: int = 0,
    method: str = "gradcam",
) -> list[dict[str, Any]]:
    """Grad-CAM for images prepared with ``keep_original=True`` by ``predictor``; one dict per image.

    Each CAM is mapped to the original image, its region (``threshold``) outlined in an overlay PNG (where
    ``out_pngs`` gives a path) and scored with :func:`cam_metrics`. Lung masks default to the lung crop's
    own mask, else :func:`covidscan.preprocess.find_lungs` on the original (None where none is found).
    ``layers`` writes transparent heat layers for a viewer instead (see :func:`save_overlay`). Keys:
    ``cam_png``, ``cam_region_bbox`` ((y0, x0, y1, x1) in the original, or None), ``cam_energy_in_lungs``,
    ``cam_pointing_game_hit``, ``cam_iou``.
    """
    n = len(prepared)
    if any(p.original is None for p in prepared):
        raise CovidscanError("explaining needs the original images: prepare them with keep_original=True")
    out_pngs, lung_masks, lesion_masks, titles = (
        _per_image(values, n, name)
        for values, name in ((out_pngs, "out_pngs"), (lung_masks, "lung_masks"),
                             (lesion_masks, "lesion_masks"), (titles, "titles"))
    )
    cams = gradcam(predictor.model, predictor.batch(prepared).contiguous(), target=target, method=method)
    modality = predictor.modality
    rows = []
    per_image = zip(prepared, cams, out_pngs, lung_masks, lesion_masks, titles, strict=True)
    for prep, cam, png, lungs, lesion, title in per_image:
        original = prep.original
        full = cam_to_original(cam, prep.bbox, original.shape)
        region = cam_region(full, threshold=threshold)
        if lungs is None and prep.lung_mask is not None:
            lungs = prep.lung_mask  # the mask the lung crop already found: no second search
        elif lungs is None:
            found = find_lungs(original, modality=modality)
            lungs = found.mask if found.found else None
        metrics = cam_metrics(full, lungs, lesion, threshold=threshold, tolerance=tolerance)
        if png is not None:
            png = str(save_overlay(png, original, full, region=region, title=title, layer=layers))
        rows.append({"cam_png": png, "cam_region_bbox": region_bbox(region),
                     **{f"cam_{k}": v for k, v in metrics.items()}})
    return rows


def explain_image(
    predictor: Predictor,
    path: str | Path,
    out_png: str | Path | None,
    *,
    window: tuple[float, float] | None = None,
    target: int = 1,
    threshold: float = 0.5,
    method: str = "gradcam",
    title: str | None = None,
) -> dict[str, Any]:
    """Read, prepare as the run was trained, Grad-CAM, and save the overlay on the original image.

    Returns :func:`explain_prepared`'s dict (``cam_png``, ``cam_region_bbox``, ``cam_energy_in_lungs``, ...).
    The overlay's title defaults to the file name; ``window`` (width, level) applies to DICOM only.
    """
    prepared = predictor.prepare(read_image(path, window=window), keep_original=True)
    return predictor.explain(
        [prepared], [out_png], titles=[title or Path(path).name], target=target, threshold=threshold,
        method=method,
    )[0]
