"""Photometric augmentation (brightness, contrast, gamma, blur, noise, JPEG) and the ``strong`` preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidscan.errors import ConfigError
from covidscan.preprocess import AUGMENT_PRESETS, AugmentParams, augment_params, seeded, train_transform

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalisation: outputs are pixels in [0, 1]


def _image(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.3 * np.sin(12 * xx) * np.cos(9 * yy)  # smooth, mid-gray, some detail
    img[size // 4 : size // 2, size // 4 : size // 2] = 0.9  # a sharp edge
    return img.astype(np.float32)


def _run(params: AugmentParams, seed: int = 0) -> torch.Tensor:
    return seeded(train_transform(params, size=64, **RAW), _image(), seed)[0]


def _only(**kwargs) -> AugmentParams:
    return AugmentParams(photometric_p=1.0, **kwargs)


def test_gamma_raises_pixels_to_the_drawn_power():
    out = _run(_only(gamma=(2.0, 2.0)))
    assert torch.allclose(out, torch.from_numpy(_image()) ** 2, atol=1e-5)


def test_brightness_contrast_blur_noise_and_jpeg_each_change_the_image_as_they_should():
    x = torch.from_numpy(_image())
    contrast = [_run(_only(contrast=0.5), seed).std() / x.std() for seed in range(8)]
    assert min(contrast) < 0.9 and max(contrast) > 1.1  # both lower and higher contrast are drawn
    bright = [_run(_only(brightness=0.5), seed).mean() / x.mean() for seed in range(8)]
    assert min(bright) < 0.9 and max(bright) > 1.05

    def edge(t: torch.Tensor) -> float:  # the steepest step: the square's sharp border
        return float((t[:, 1:] - t[:, :-1]).abs().max())

    assert edge(_run(_only(blur_sigma=(1.5, 1.5)))) < 0.5 * edge(x)
    noisy = _run(_only(noise=0.05)) - x
    assert 0.035 < float(noisy.std()) < 0.06
    err_low = float((_run(_only(jpeg_quality=(10, 10))) - x).abs().mean())
    err_high = float((_run(_only(jpeg_quality=(95, 95))) - x).abs().mean())
    assert 0 < err_high < err_low < 0.1


def test_photometric_steps_are_skipped_with_probability_zero():
    plain = train_transform(None, size=64, **RAW)(_image())
    off = _run(AugmentParams(contrast=0.5, gamma=(0.5, 2.0), noise=0.1, jpeg_quality=(5, 10),
                             photometric_p=0))
    assert torch.equal(off, plain[0])


def test_strong_preset_is_seeded_varied_and_stays_in_range():
    t = train_transform("strong", size=64, **RAW)
    a, b, c = seeded(t, _image(), 3), seeded(t, _image(), 3), seeded(t, _image(), 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    outs = torch.stack([seeded(t, _image(), s) for s in range(12)])
    assert outs.min() >= 0 and outs.max() <= 1
    assert not augment_params("strong").hflip  # the heart stays on its side


def test_published_presets_carry_no_photometric_step():
    for name in ("paper_a", "paper_b"):
        params = AUGMENT_PRESETS[name]
        assert (params.brightness, params.contrast, params.gamma, params.blur_sigma, params.noise,
                params.jpeg_quality) == (0, 0, (1, 1), (0, 0), 0, None)
        kinds = [type(step).__name__ for step in train_transform(name, size=32).transforms]
        assert "RandomApply" not in kinds


@pytest.mark.parametrize(
    "bad",
    [{"gamma": (2.0, 1.0)}, {"gamma": (0.0, 1.0)}, {"blur_sigma": (0.0, 1.0)}, {"jpeg_quality": (0, 50)},
     {"jpeg_quality": (90, 50)}, {"noise": -0.1}, {"contrast": 1.5}, {"photometric_p": 2}],
)
def test_bad_photometric_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AugmentParams(**bad)


def test_unknown_augment_name_lists_strong():
    with pytest.raises(ConfigError, match="strong"):
        augment_params("heavy")
