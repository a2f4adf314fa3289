"""Grad-CAM explanations: maps, overlays, lesion/lung localisation metrics, and per-file explanations."""

from __future__ import annotations

from covidscan.explain.cam import (
    CAM_METHODS,
    cam_metrics,
    cam_region,
    cam_to_original,
    gradcam,
    region_bbox,
)
from covidscan.explain.pipeline import explain_image, explain_prepared
from covidscan.explain.render import overlay, save_overlay

__all__ = [
    "CAM_METHODS",
    "cam_metrics",
    "cam_region",
    "cam_to_original",
    "explain_image",
    "explain_prepared",
    "gradcam",
    "overlay",
    "region_bbox",
    "save_overlay",
]
