"""Model-input transforms: shapes, normalisation, augmentation presets, seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from covidscan.errors import ConfigError
from covidscan.preprocess import (
    AUGMENT_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    augment_params,
    eval_transform,
    seeded,
    train_transform,
)


def _image(h: int = 96, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((np.sin(yy / 7.0) * np.cos(xx / 5.0) + 1) / 2).astype(np.float32)


@pytest.mark.parametrize(
    "x", [np.full((50, 70), 0.5, np.float32), torch.full((1, 50, 70), 0.5), torch.full((50, 70), 0.5)]
)
def test_eval_transform_shape_dtype_and_normalisation(x):
    out = eval_transform(size=32)(x)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_eval_transform_custom_mean_std_and_is_deterministic():
    t = eval_transform(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = t(np.ones((40, 40), np.float32))
    assert torch.allclose(out, torch.ones(3, 16, 16))
    img = _image()
    assert torch.equal(eval_transform(24)(img), eval_transform(24)(img))


def test_train_transform_none_equals_eval():
    img = _image()
    assert torch.equal(train_transform(None, size=24)(img), eval_transform(24)(img))
    assert torch.equal(train_transform("none", size=24)(img), eval_transform(24)(img))


@pytest.mark.parametrize("name", sorted(AUGMENT_PRESETS))
def test_seeded_augmentation_is_reproducible(name):
    t = train_transform(name, size=48)
    img = _image()
    a, b, c = seeded(t, img, 7), seeded(t, img, 7), seeded(t, img, 8)
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, eval_transform(48)(img))  # it really augments


def test_seeded_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeded(train_transform("paper_a", size=16), _image(), 5)
    assert torch.equal(torch.rand(3), expected)


def test_presets_carry_the_published_keras_settings():
    a, b = augment_params("paper_a"), augment_params("paper_b")
    assert (a.degrees, a.shear, a.translate, a.scale, a.hflip) == (30, 0.1, (0.2, 0.2), (0.7, 1.3), True)
    assert (b.degrees, b.shear, b.translate, b.scale, b.hflip) == (10, 0.0, (0.2, 0.2), (0.8, 1.2), False)
    affine = next(s for s in train_transform("paper_a").transforms if isinstance(s, v2.RandomAffine))
    assert affine.degrees == [-30.0, 30.0] and affine.shear == [-0.1, 0.1] and affine.fill == 0.0


def test_custom_augment_params_and_validation():
    params = AugmentParams(degrees=5, hflip=True)
    assert augment_params(params) is params
    assert seeded(train_transform(params, size=16), _image(), 1).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="extra"):
        AugmentParams(rotation=5)


def test_unknown_augment_lists_valid_names():
    with pytest.raises(ConfigError, match=r"paper_a, paper_b"):
        train_transform("keras")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 0}, "size"), ({"size": 12.5}, "size"), ({"mean": (0.5,)}, "mean"),
     ({"std": (1, 0, 1)}, "std")],
)
def test_transform_settings_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        eval_transform(**kwargs)


@pytest.mark.parametrize("bad", [np.zeros((3, 8, 8), np.float32), torch.zeros(2, 8, 8), [[0.0, 1.0]], "x"])
def test_transform_rejects_non_gray_input(bad):
    with pytest.raises(ConfigError, match="gray image"):
        eval_transform(16)(bad)
