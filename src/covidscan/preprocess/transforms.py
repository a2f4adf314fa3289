"""Model-input transforms (torchvision.transforms.v2): gray float image -> normalised 3 x S x S tensor.

Augmentation presets reproduce the published Keras ``ImageDataGenerator`` settings of the two papers as
closely as torchvision allows; the differences are spelled out next to each parameter. The ``strong`` preset
adds photometric augmentation (brightness, contrast, gamma, blur, noise, JPEG compression) so that a model
cannot tell sources apart by their exposure, sharpness, noise or compression.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from covidscan.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class AugmentParams(BaseModel):
    """Random affine + flip settings for training; a preset name maps to one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    degrees: float = Field(0.0, ge=0, le=180)
    # Keras ``shear_range`` is a shear *angle in degrees*, and torchvision's ``shear`` is too, so the value is
    # carried over unchanged (paper A's 0.1 means 0.1 degrees: a tiny shear, but the published setting).
    shear: float = Field(0.0, ge=0, lt=90)
    # Both Keras ``width/height_shift_range`` and torchvision ``translate`` are fractions of the image size.
    translate: tuple[float, float] = (0.0, 0.0)
    # Keras ``zoom_range=z`` draws x and y zoom independently from [1 - z, 1 + z] (anisotropic); torchvision
    # draws one isotropic scale from this range, so aspect ratio is kept. Same range, one factor.
    scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    # Keras fills with "nearest" (edge pixels smeared outwards). We fill with 0 (black) instead: the image
    # border of a chest CT or X-ray is air/background, black is what a real shift would reveal, and smeared
    # streaks are texture a CNN could latch onto.
    fill: float = Field(0.0, ge=0, le=1)
    # Photometric augmentation, after the affine; each step that is set runs with probability
    # ``photometric_p``. ``brightness`` / ``contrast``: factors drawn from [1 - v, 1 + v]; ``gamma``: drawn
    # log-uniformly from (low, high); ``blur_sigma``: (low, high) Gaussian blur sigma in model-size pixels;
    # ``noise``: sigma of additive Gaussian noise on [0, 1] pixels; ``jpeg_quality``: (low, high) of a JPEG
    # round trip. All draw from torch's RNG, so :func:`seeded` makes them reproducible.
    brightness: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, lt=1)
    gamma: tuple[float, float] = (1.0, 1.0)
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    noise: float = Field(0.0, ge=0, le=0.5)
    jpeg_quality: tuple[int, int] | None = None
    photometric_p: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentParams:
        (g0, g1), (b0, b1) = self.gamma, self.blur_sigma
        if not 0.1 <= g0 <= g1 <= 10:
            raise ValueError(f"gamma must be (low, high) with 0.1 <= low <= high <= 10, got {self.gamma}")
        if (b0, b1) != (0, 0) and not 0 < b0 <= b1 <= 10:
            raise ValueError(f"blur_sigma must be (0, 0) or (low, high) with 0 < low <= high <= 10, got "
                             f"{self.blur_sigma}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must be (low, high) with 1 <= low <= high <= 100, got "
                             f"{self.jpeg_quality}")
        return self


class RandomGamma(v2.Transform):
    """Gamma correction ``x ** gamma`` with gamma drawn log-uniformly from ``(low, high)`` (torch's RNG)."""

    def __init__(self, gamma: tuple[float, float]) -> None:
        super().__init__()
        self.log_range = (float(np.log(gamma[0])), float(np.log(gamma[1])))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw one gamma for all inputs of a call."""
        return {"gamma": float(torch.empty(()).uniform_(*self.log_range).exp())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the drawn gamma (float images in [0, 1])."""
        return F.adjust_gamma(inpt, params["gamma"])


class RandomJPEG(v2.Transform):
    """A JPEG round trip (OpenCV) at a quality drawn from ``(low, high)``, as a saved file would come back.

    OpenCV rather than ``v2.JPEG``: torchvision 0.29 deprecates its own image encoders.
    """

    def __init__(self, quality: tuple[int, int]) -> None:
        super().__init__()
        self.quality = (int(quality[0]), int(quality[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw one quality for all inputs of a call."""
        return {"quality": int(torch.randint(self.quality[0], self.quality[1] + 1, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Compress and decode each channel of a float (C, H, W) image in [0, 1]."""
        planes = (inpt.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        flag = [cv2.IMWRITE_JPEG_QUALITY, params["quality"]]
        decoded = [cv2.imdecode(cv2.imencode(".jpg", p, flag)[1], cv2.IMREAD_GRAYSCALE) for p in planes]
        out = torch.from_numpy(np.stack(decoded)).to(inpt.dtype) / 255
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def photometric_steps(params: AugmentParams) -> list[Callable[[Any], Any]]:
    """The photometric steps ``params`` set, each applied with probability ``photometric_p``."""
    steps: list[Callable[[Any], Any]] = []
    if params.brightness or params.contrast:
        steps.append(v2.ColorJitter(brightness=params.brightness or None, contrast=params.contrast or None))
    if params.gamma != (1.0, 1.0):
        steps.append(RandomGamma(params.gamma))
    if params.blur_sigma[1] > 0:
        kernel = 2 * int(np.ceil(3 * params.blur_sigma[1])) + 1  # +-3 sigma: the kernel never truncates
        steps.append(v2.GaussianBlur(kernel, sigma=params.blur_sigma))
    if params.noise:
        steps.append(v2.GaussianNoise(sigma=params.noise, clip=True))
    if params.jpeg_quality is not None:
        steps.append(RandomJPEG(params.jpeg_quality))
    return [v2.RandomApply([step], p=params.photometric_p) for step in steps]


AUGMENT_PRESETS: dict[str, AugmentParams] = {
    # Paper A (Keras): rotation_range=30, shear_range=0.1, width/height_shift_range=0.2, zoom_range=0.3,
    # horizontal_flip=True.
    "paper_a": AugmentParams(degrees=30, shear=0.1, translate=(0.2, 0.2), scale=(0.7, 1.3), hflip=True),
    # Paper B (Keras): rotation_range=10, width/height_shift_range=0.2, zoom_range=0.2.
    "paper_b": AugmentParams(degrees=10, translate=(0.2, 0.2), scale=(0.8, 1.2)),
    # Ours, against source shortcuts: a mild affine (no flip: the heart is on the left in every chest image)
    # and strong photometric changes, so exposure, sharpness, noise and compression stop telling sources
    # apart.
    "strong": AugmentParams(
        degrees=10, translate=(0.1, 0.1), scale=(0.85, 1.15), brightness=0.2, contrast=0.3,
        gamma=(0.7, 1.4), blur_sigma=(0.1, 1.5), noise=0.03, jpeg_quality=(30, 90), photometric_p=0.5,
    ),
}


def augment_params(augment: str | AugmentParams) -> AugmentParams:
    """Resolve a preset name (or pass through explicit params); unknown names raise ConfigError."""
    if isinstance(augment, AugmentParams):
        return augment
    if augment not in AUGMENT_PRESETS:
        valid = ", ".join(["none", *AUGMENT_PRESETS])
        raise ConfigError(f"unknown augment {augment!r}; valid names: {valid}")
    return AUGMENT_PRESETS[augment]


def _as_image(x: Any) -> torch.Tensor:
    """Gray float (H, W) numpy array, or (H, W) / (1, H, W) tensor -> float32 tv_tensors.Image (1, H, W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(tensor, torch.Tensor) or not (
        tensor.ndim == 2 or (tensor.ndim == 3 and tensor.shape[0] == 1)
    ):
        shape = getattr(x, "shape", None)
        raise ConfigError(
            f"transform input must be a gray image, (H, W) array or (1, H, W) tensor; got {type(x).__name__} "
            f"with shape {shape}"
        )
    return tv_tensors.Image(tensor.reshape(1, *tensor.shape[-2:]).to(torch.float32))


Size = int | tuple[int, int]


def _check(size: Size, mean: Sequence[float], std: Sequence[float]) -> tuple[int, int]:
    if isinstance(size, int):
        hw: tuple = (size, size)
    else:
        hw = tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 8 for s in hw):
        raise ConfigError(f"transform size must be pixels >= 8, as an int or (height, width); got {size!r}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"normalisation mean and std need 3 values each (std > 0), got {mean!r} / {std!r}")
    return hw


def _build(
    size: Size, mean: Sequence[float], std: Sequence[float], params: AugmentParams | None
) -> v2.Compose:
    hw = _check(size, mean, std)
    steps: list[Callable[[Any], Any]] = [v2.Lambda(_as_image), v2.Resize(hw, antialias=True)]
    if params is not None:
        steps.append(
            v2.RandomAffine(
                degrees=params.degrees,
                translate=params.translate,
                scale=params.scale,
                shear=params.shear or None,
                interpolation=v2.InterpolationMode.BILINEAR,  # Keras interpolates with order=1 too
                fill=params.fill,
            )
        )
        if params.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += photometric_steps(params)
    steps += [v2.RGB(), v2.Normalize(mean=list(mean), std=list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)


def eval_transform(
    size: Size = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Gray float image -> resize (int: square, or (H, W)) -> 3 channels -> normalised float tensor."""
    return _build(size, mean, std, None)


def train_transform(
    augment: str | AugmentParams | None,
    size: Size = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """:func:`eval_transform` plus the random affine/flip of a preset (None or "none": no augmentation)."""
    return _build(size, mean, std, None if augment in (None, "none") else augment_params(augment))


def seeded(transform: Callable[[Any], Any], x: Any, seed: int) -> Any:
    """Apply a random transform reproducibly: same seed, same output; the global RNG is left untouched."""
    # The CPU generator only: torch.manual_seed would also seed every accelerator's generator, which fork_rng
    # (devices=[]) does not restore, and on a machine without one it still formats three stack traces per
    # call (queued for a lazy CUDA/XPU/MTIA start) -- about 1 ms an image, 5% of a small model's training.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(x)
