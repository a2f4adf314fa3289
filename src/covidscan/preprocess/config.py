"""The ``preprocess:`` settings of a preset: a pydantic schema only, so that reading a preset imports no
image library."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PreprocessConfig(BaseModel):
    """Preprocessing settings (the ``preprocess`` section of a preset)."""

    model_config = ConfigDict(extra="forbid")

    # Standardisation, before CLAHE. ``max_pixels``: a larger decoded image is scaled down (aspect kept) to at
    # most this many pixels, so an 8-tile CLAHE grid spans about the same anatomy in a 4000-px radiograph as
    # in a 512-px one; None keeps every image's own size. ``normalize: percentile`` maps the ``percentiles``
    # (low, high) of each image to 0 and 1 (clipped), which undoes another window or exposure.
    max_pixels: int | None = Field(None, ge=32 * 32)
    normalize: Literal["none", "percentile"] = "none"
    percentiles: tuple[float, float] = (1.0, 99.0)
    clahe: bool = True
    clip_limit: float = Field(2.0, gt=0)
    tile_grid: tuple[int, int] = (8, 8)
    lung_crop: bool = True
    modality: Literal["ct", "cxr"] = "ct"
    margin: float = Field(0.05, ge=0, lt=0.5)
    # Lung-masked input: after CLAHE, everything outside the lung mask grown by ``mask_dilation`` (a fraction
    # of the shorter image side: a little pleura and the costophrenic angles stay in) becomes
    # ``mask_value``. 0 is black, what the air around the body already looks like after CLAHE.
    mask_outside_lungs: bool = False
    mask_dilation: float = Field(0.02, ge=0, lt=0.5)
    mask_value: float = Field(0.0, ge=0, le=1)
    # The X-ray lung U-Net the masked mode uses for ``modality: cxr`` (a safetensors file from ``covidscan
    # lungseg train``); None: the default location (covidscan.preprocess.lungseg.default_lung_model). CT
    # slices are masked with the contour finder, which follows the lungs closely there.
    lung_model: str | None = None

    @field_validator("tile_grid")
    @classmethod
    def _grid_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("tile_grid values must be >= 1")
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError("percentiles must be (low, high) with 0 <= low < high <= 100")
        return value

    @model_validator(mode="after")
    def _mask_needs_lungs(self) -> PreprocessConfig:
        if self.mask_outside_lungs and not self.lung_crop:
            raise ValueError("mask_outside_lungs needs lung_crop: true (the lung finder draws the mask)")
        return self
