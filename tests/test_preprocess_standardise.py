"""Intensity and resolution standardisation before CLAHE: percentile normalisation and a pixel budget."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError
from covidscan.preprocess import (
    PreprocessConfig,
    limit_pixels,
    percentile_normalize,
    prepare_image,
    preprocess,
)


def _ct(size: int = 128) -> np.ndarray:
    return make_phantom(2, modality="ct", covid=False, size=size).image


def test_limit_pixels_shrinks_to_the_budget_and_keeps_the_aspect():
    image = np.random.default_rng(0).random((1000, 500), dtype=np.float32)
    small = limit_pixels(image, 125_000)
    assert small.size <= 125_000 and small.shape == (500, 250)
    assert small.dtype == np.float32 and abs(small.mean() - image.mean()) < 1e-3  # area interpolation
    assert limit_pixels(image, 10**6) is image  # under the budget: untouched


def test_percentile_normalize_undoes_a_linear_window():
    image = _ct()
    dim = 0.2 + 0.5 * image  # another window: less contrast, brighter
    a, b = percentile_normalize(image), percentile_normalize(dim)
    assert np.abs(a - b).max() < 1e-4
    assert a.min() == 0 and a.max() == 1 and a.dtype == np.float32
    assert (a == 1).mean() == pytest.approx(0.01, abs=0.01)  # the top 1 % saturate
    flat = np.full((40, 40), 0.3, np.float32)
    assert np.array_equal(percentile_normalize(flat), flat)
    wide = percentile_normalize(image, (0.0, 100.0))
    assert wide.max() == 1 and (wide == 1).mean() < 0.01


def test_normalize_percentile_makes_two_windows_of_one_slice_alike():
    image = _ct()
    dim = 0.2 + 0.5 * image
    plain = np.abs(preprocess(image).enhanced - preprocess(dim).enhanced).mean()
    cfg = {"normalize": "percentile"}
    normalised = np.abs(preprocess(image, cfg).enhanced - preprocess(dim, cfg).enhanced).mean()
    assert normalised < 0.25 * plain


def test_pixel_budget_gives_clahe_the_same_scale_and_maps_boxes_back():
    small = _ct(128)
    big = cv2.resize(small, (512, 512), interpolation=cv2.INTER_CUBIC)
    cfg = PreprocessConfig(max_pixels=128 * 128)
    a, b = preprocess(small, cfg), preprocess(big, cfg)
    assert b.enhanced.shape == (128, 128) and b.scale == 0.25 and a.scale == 1.0
    assert np.abs(a.enhanced - b.enhanced).mean() < 0.03
    prepared = prepare_image(big, cfg, (64, 64), keep_original=True)
    assert prepared.lungs_found
    y0, x0, y1, x1 = prepared.bbox
    ys0, xs0, ys1, xs1 = a.crop.bbox
    assert all(abs(u - 4 * v) <= 8 for u, v in zip((y0, x0, y1, x1), (ys0, xs0, ys1, xs1), strict=True))
    assert prepared.original.shape == big.shape and prepared.lung_mask.shape == big.shape
    assert prepared.lung_mask.mean() == pytest.approx(a.crop.mask.mean(), abs=0.01)


def test_defaults_leave_the_decoded_image_as_it_is():
    image = _ct()
    default = preprocess(image)
    explicit = preprocess(image, {"max_pixels": None, "normalize": "none"})
    assert default.scale == 1.0 and np.array_equal(default.enhanced, explicit.enhanced)
    assert default.input_bbox(image.shape) == default.crop.bbox


@pytest.mark.parametrize(
    "bad", [{"percentiles": (99, 1)}, {"percentiles": (-1, 50)}, {"max_pixels": 100}, {"normalize": "zscore"}]
)
def test_bad_standardisation_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="invalid preprocess settings"):
        preprocess(np.zeros((64, 64), np.float32), bad)
