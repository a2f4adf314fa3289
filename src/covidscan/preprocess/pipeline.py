"""Paper A's preprocessing as one call: CLAHE, then the lung crop computed on the CLAHE image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covidscan.errors import ConfigError
from covidscan.preprocess.clahe import apply_clahe, as_gray_float
from covidscan.preprocess.lungs import LungCrop, find_lungs


class PreprocessConfig(BaseModel):
    """Preprocessing settings (the ``preprocess`` section of a preset)."""

    model_config = ConfigDict(extra="forbid")

    clahe: bool = True
    clip_limit: float = Field(2.0, gt=0)
    tile_grid: tuple[int, int] = (8, 8)
    lung_crop: bool = True
    modality: Literal["ct", "cxr"] = "ct"
    margin: float = Field(0.05, ge=0, lt=0.5)

    @field_validator("tile_grid")
    @classmethod
    def _grid_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("tile_grid values must be >= 1")
        return value


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """The enhanced full image and, when the lung crop ran, its result; ``image`` is what models see."""

    enhanced: np.ndarray
    crop: LungCrop | None

    @property
    def image(self) -> np.ndarray:
        """The lung crop of the enhanced image, or the whole enhanced image when no crop is made."""
        return self.enhanced if self.crop is None else self.crop.image


def preprocess(image: np.ndarray, cfg: PreprocessConfig | dict[str, Any] | None = None) -> Preprocessed:
    """CLAHE (if enabled) then lung crop (if enabled), on a gray float image; one definition for training,
    prediction and the preview sheet."""
    if not isinstance(cfg, PreprocessConfig):
        try:
            cfg = PreprocessConfig(**(cfg or {}))
        except ValidationError as exc:
            raise ConfigError(f"invalid preprocess settings: {exc}") from None
    out = as_gray_float(image)
    if cfg.clahe:
        out = apply_clahe(out, clip_limit=cfg.clip_limit, tile_grid=cfg.tile_grid)
    crop = find_lungs(out, modality=cfg.modality, margin=cfg.margin) if cfg.lung_crop else None
    return Preprocessed(out, crop)
