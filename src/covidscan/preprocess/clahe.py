"""CLAHE contrast enhancement (paper A's first step) on gray float images."""

from __future__ import annotations

import numbers

import cv2
import numpy as np

from covidscan.errors import ConfigError
from covidscan.io import to_uint8


def as_gray_float(image: np.ndarray) -> np.ndarray:
    """Check that ``image`` is a non-empty 2-D numeric array; return it as float32 clipped to [0, 1]."""
    array = np.asarray(image)
    if array.ndim != 2 or array.size == 0:
        raise ConfigError(
            f"expected a gray image as a non-empty 2-D array (H, W), got shape {array.shape}; "
            "read files with covidscan.io.read_image"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ConfigError(f"expected a gray image of numbers in [0, 1], got dtype {array.dtype}")
    # fmax maps NaN and -inf to 0 and minimum maps +inf to 1, as nan_to_num + clip would, in two passes.
    out = np.fmax(array.astype(np.float32, copy=False), np.float32(0.0))
    return np.minimum(out, np.float32(1.0), out=out)


def check_clahe_args(clip_limit: float, tile_grid: tuple[int, int]) -> tuple[float, tuple[int, int]]:
    """Validate CLAHE settings and return them as ``(float, (rows, cols))``; raise ConfigError otherwise."""
    if isinstance(clip_limit, bool) or not isinstance(clip_limit, numbers.Real) or not clip_limit > 0:
        raise ConfigError(f"clahe clip_limit must be a number > 0 (2.0 is usual), got {clip_limit!r}")
    grid = tuple(tile_grid) if isinstance(tile_grid, (tuple, list)) else ()
    if len(grid) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in grid
    ):
        raise ConfigError(f"clahe tile_grid must be two whole numbers >= 1 such as (8, 8), got {tile_grid!r}")
    return float(clip_limit), (int(grid[0]), int(grid[1]))


def apply_clahe(
    image: np.ndarray, *, clip_limit: float = 2.0, tile_grid: tuple[int, int] = (8, 8)
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a gray float image; returns gray float."""
    clip_limit, (rows, cols) = check_clahe_args(clip_limit, tile_grid)
    gray = as_gray_float(image)
    # OpenCV's tileGridSize is (columns, rows).
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(cols, rows))
    return clahe.apply(to_uint8(gray)).astype(np.float32) / np.float32(255.0)
