"""Paper A's preprocessing as one call: CLAHE, then the lung crop computed on the CLAHE image.

Optionally (every preset's default is off) everything outside the lungs is masked to a constant, so the
model input holds no borders, burnt-in text, markers or body outline that could tell the source apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidscan.errors import ConfigError
from covidscan.preprocess.clahe import apply_clahe, as_gray_float
from covidscan.preprocess.lungs import LungCrop, find_lungs, mask_outside


class PreprocessConfig(BaseModel):
    """Preprocessing settings (the ``preprocess`` section of a preset)."""

    model_config = ConfigDict(extra="forbid")

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

    @field_validator("tile_grid")
    @classmethod
    def _grid_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("tile_grid values must be >= 1")
        return value

    @model_validator(mode="after")
    def _mask_needs_lungs(self) -> PreprocessConfig:
        if self.mask_outside_lungs and not self.lung_crop:
            raise ValueError("mask_outside_lungs needs lung_crop: true (the lung finder draws the mask)")
        return self


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """The enhanced full image and, when the lung crop ran, its result; ``image`` is what models see.

    With ``mask_outside_lungs`` both ``enhanced`` and the crop's image are masked (when lungs were found).
    """

    enhanced: np.ndarray
    crop: LungCrop | None

    @property
    def image(self) -> np.ndarray:
        """The lung crop of the enhanced image, or the whole enhanced image when no crop is made."""
        return self.enhanced if self.crop is None else self.crop.image


def preprocess(image: np.ndarray, cfg: PreprocessConfig | dict[str, Any] | None = None) -> Preprocessed:
    """CLAHE, lung crop, then masking outside the lungs (each if enabled), on a gray float image; one recipe
    for training, prediction and the preview sheet.

    When the masked mode finds no lungs, nothing is masked: the crop says ``found=False`` and the whole image
    goes on, so the failure stays visible (``prepare_image`` adds a warning) instead of an empty input.
    """
    if not isinstance(cfg, PreprocessConfig):
        try:
            cfg = PreprocessConfig(**(cfg or {}))
        except ValidationError as exc:
            raise ConfigError(f"invalid preprocess settings: {exc}") from None
    out = as_gray_float(image)
    if cfg.clahe:
        out = apply_clahe(out, clip_limit=cfg.clip_limit, tile_grid=cfg.tile_grid)
    crop = find_lungs(out, modality=cfg.modality, margin=cfg.margin) if cfg.lung_crop else None
    if crop is not None and cfg.mask_outside_lungs:
        out, crop = mask_outside(out, crop, dilation=cfg.mask_dilation, value=cfg.mask_value)
    return Preprocessed(out, crop)
