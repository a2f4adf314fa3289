"""Reading chest images (PNG, JPEG, BMP, TIFF, DICOM) into float32 gray [0, 1] arrays; the quality gate."""

from __future__ import annotations

from .base import LUNG_WINDOW, ImageHeader, ImageMeta, LoadedImage, pixel_hash, to_uint8
from .dicom import apply_window, is_dicom_path, read_dicom, read_dicom_series
from .images import (
    IMAGE_SUFFIXES,
    ImageSource,
    check_header,
    is_image_path,
    iter_images,
    list_images,
    read_checked,
    read_image,
    scan_images,
    write_png,
)
from .quality import MAX_PIXELS_ENV, QualityLimits, QualityReport, assess, check_pixel_count, gate
from .stats import STAT_NAMES, image_stats

__all__ = [
    "IMAGE_SUFFIXES",
    "LUNG_WINDOW",
    "MAX_PIXELS_ENV",
    "STAT_NAMES",
    "ImageHeader",
    "ImageMeta",
    "ImageSource",
    "LoadedImage",
    "QualityLimits",
    "QualityReport",
    "apply_window",
    "assess",
    "check_header",
    "check_pixel_count",
    "gate",
    "image_stats",
    "is_dicom_path",
    "is_image_path",
    "iter_images",
    "list_images",
    "pixel_hash",
    "read_checked",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "scan_images",
    "to_uint8",
    "write_png",
]
