"""Lung-masked input mode: everything outside the (dilated) lung mask becomes a constant before the model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from covidscan.config import list_presets, load_config
from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError
from covidscan.preprocess import PreprocessConfig, find_lungs, mask_outside, prepare_image, preprocess

MASKED = {"mask_outside_lungs": True, "mask_dilation": 0.02, "mask_value": 0.0}


def _ct_slice(seed: int = 5) -> np.ndarray:
    return make_phantom(seed, modality="ct", covid=True, size=128).image


def test_masked_mode_blanks_everything_outside_the_dilated_lung_mask():
    image = _ct_slice()
    plain = preprocess(image)
    masked = preprocess(image, MASKED)
    assert masked.crop is not None and masked.crop.found
    keep = cv2.dilate(masked.crop.mask.astype(np.uint8), cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * 3 + 1, 2 * 3 + 1))) > 0  # 0.02 * 128 px = radius 3
    assert (masked.enhanced[~keep] == 0).all()
    assert np.array_equal(masked.enhanced[keep], plain.enhanced[keep])  # the lungs are untouched
    # the body outside the lungs was bright before: masking removed real signal, not just black air
    assert plain.enhanced[~keep].mean() > 0.1 and (plain.enhanced[~keep] > 0.5).sum() > 0.1 * image.size
    y0, x0, y1, x1 = masked.crop.bbox
    assert masked.crop.bbox == plain.crop.bbox
    assert np.array_equal(masked.image, masked.enhanced[y0:y1, x0:x1])


def test_mask_value_and_dilation_are_honoured():
    image = _ct_slice()
    tight = preprocess(image, {**MASKED, "mask_dilation": 0.0})
    loose = preprocess(image, {**MASKED, "mask_dilation": 0.1})
    grey = preprocess(image, {**MASKED, "mask_value": 0.5})
    assert (tight.enhanced[~tight.crop.mask] == 0).all()
    assert (grey.enhanced[~grey.crop.mask] == 0.5).sum() > 0.3 * image.size
    kept_tight, kept_loose = (tight.enhanced != 0).sum(), (loose.enhanced != 0).sum()
    assert kept_loose > kept_tight * 1.2


def test_masked_model_input_has_nothing_outside_the_lungs():
    image = _ct_slice()
    cfg = PreprocessConfig(**MASKED)
    prepared = prepare_image(image, cfg, (64, 64), keep_original=True)
    assert prepared.lungs_found and prepared.warnings == ()
    # the corners of a lung crop lie outside both lungs: they are exactly the mask value
    assert prepared.pixels[0, 0] == 0 and prepared.pixels[-1, -1] == 0
    assert prepared.pixels.dtype == np.float32 and prepared.pixels.shape == (64, 64)
    assert prepared.lung_mask is not None and prepared.lung_mask.shape == image.shape


def test_no_lungs_found_keeps_the_whole_image_and_warns():
    # (the chest X-ray case, with its lung model, is in test_lungseg.py)
    image = np.full((96, 96), 0.5, np.float32)  # no contrast, no lungs
    cfg = PreprocessConfig(**MASKED)
    result = preprocess(image, cfg)
    assert not result.crop.found and result.unmasked is None
    assert np.array_equal(result.enhanced, preprocess(image).enhanced)  # not blanked
    prepared = prepare_image(image, cfg, (32, 32))
    assert prepared.lungs_found is False
    assert len(prepared.warnings) == 1 and prepared.warnings[0].startswith("unmasked: no lungs found")
    assert (prepared.pixels == 0).mean() < 0.01  # the model input is the image, not a blank


def test_mask_outside_checks_its_inputs():
    image = _ct_slice()
    crop = find_lungs(image)
    with pytest.raises(ConfigError, match="dilation"):
        mask_outside(image, crop, dilation=0.7, value=0.0)
    with pytest.raises(ConfigError, match="does not fit"):
        mask_outside(image[:64], crop, dilation=0.0, value=0.0)


def test_masked_mode_needs_the_lung_crop():
    with pytest.raises(ConfigError, match="lung_crop"):
        preprocess(np.zeros((64, 64), np.float32), {"mask_outside_lungs": True, "lung_crop": False})
    with pytest.raises(ConfigError, match="lung_crop"):
        load_config("paper-a-resnet50-noprep", ["preprocess.mask_outside_lungs=true"])
    cfg = load_config("paper-a-resnet50", ["preprocess.mask_outside_lungs=true",
                                           "preprocess.mask_value=0.25"])
    assert cfg.preprocess.mask_outside_lungs and cfg.preprocess.mask_value == 0.25


def test_every_papers_preset_leaves_the_new_options_off():
    # covidscan's own presets (covidscan-*) use them; the papers' presets must stay as published.
    for name in (n for n in list_presets() if not n.startswith("covidscan-")):
        pre = load_config(name).preprocess
        assert not pre.mask_outside_lungs, name
