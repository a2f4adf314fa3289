"""Reading chest images: PNG, JPEG, BMP, TIFF and DICOM into float32 gray (H, W) arrays in [0, 1]."""

from __future__ import annotations

from .base import LUNG_WINDOW, ImageMeta, LoadedImage, pixel_hash, to_uint8
from .dicom import apply_window, is_dicom_path, read_dicom, read_dicom_series
from .images import IMAGE_SUFFIXES, is_image_path, iter_images, list_images, read_image, scan_images

__all__ = [
    "IMAGE_SUFFIXES",
    "LUNG_WINDOW",
    "ImageMeta",
    "LoadedImage",
    "apply_window",
    "is_dicom_path",
    "is_image_path",
    "iter_images",
    "list_images",
    "pixel_hash",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "scan_images",
    "to_uint8",
]
