"""Chest X-ray lung segmentation: a small U-Net and :class:`LungSegmenter`, which turns its weights file into
a boolean lung mask for a gray [0, 1] image (CPU; at its 128-px input, 80-200 ms per image on a busy 2-core
machine).

The masked input mode (``preprocess.mask_outside_lungs``) uses it for ``modality: cxr``: the contour rules of
:func:`~covidscan.preprocess.find_lungs` were made to find a crop box, and they miss lung behind the heart
and the diaphragm, which a mask that blanks everything else must not. ``covidscan lungseg train``
(:func:`covidscan.training.lungseg.train_lung_model`) produces the weights. The weights this project trains
learn from the V7 Labs lung annotations (CC BY 4.0, V7 Ltd; shipped inside the PyPI package torchxrayvision
as ``semantic_masks_v7labs_lungs.zip``) of images of the ieee8023 COVID-19 image data collection, whose
images carry their own per-image licences (many CC BY-NC-SA or none stated).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from covidscan.errors import ConfigError
from covidscan.preprocess.clahe import as_gray_float
from covidscan.system import cache_dir

FORMAT = "covidscan-lungseg-1"
WIDTHS: tuple[int, ...] = (8, 16, 32, 64, 96)
SIZE = 128
DEFAULT_NAME = "cxr_lungs.safetensors"
TRAIN_HINT = "covidscan lungseg train --images IMAGES --out {path}"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with ``widths`` channels per level: gray (N, 1, H, W) -> lung logits.

    H and W must be multiples of ``2 ** (len(widths) - 1)``. The default has about 400 000 parameters; five
    levels give the bottom a receptive field spanning the whole 128-px chest, so left and right lung, heart
    and shoulders are told apart by where they are, not only by how they look.
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.down = nn.ModuleList(_block(c_in, c_out)
                                  for c_in, c_out in zip((1, *widths), widths, strict=False))
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
                                for c_in, c_out in zip(widths[:0:-1], widths[-2::-1], strict=True))
        self.merge = nn.ModuleList(_block(2 * c, c) for c in widths[-2::-1])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) of "lung" for a batch of gray images."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1], strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def model_input(image: np.ndarray, size: int) -> np.ndarray:
    """The U-Net's view of a gray image: squeezed to ``size`` x ``size`` and stretched between its 1st and
    99th percentiles (so another window or exposure looks the same); float32 in [0, 1]."""
    small = cv2.resize(as_gray_float(image), (size, size), interpolation=cv2.INTER_AREA)
    low, high = np.percentile(small, (1, 99))
    return np.clip((small - low) / max(high - low, 1e-6), 0, 1).astype(np.float32)


def clean_mask(prob: np.ndarray, min_area: float = 0.01) -> np.ndarray:
    """Threshold a lung probability map at 0.5, keep the two largest regions of at least ``min_area`` of the
    image (the lungs; specks in the shoulders or the bowel go), and fill their holes."""
    binary = (prob > 0.5).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [1 + i for i in np.argsort(-areas)[:2] if areas[i] >= min_area * prob.size]
    kept = np.isin(labels, keep).astype(np.uint8)
    contours, _ = cv2.findContours(kept, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(kept)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled > 0


class LungSegmenter:
    """A trained :class:`UNet` from a safetensors file: ``segmenter(image)`` is the boolean lung mask.

    The file's metadata says the format, the widths and the input size; :meth:`save` writes such a file.
    """

    def __init__(self, model: UNet, size: int, source: str = "<in memory>") -> None:
        self.model = model.eval()
        self.size = int(size)
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LungSegmenter:
        """Read a weights file written by :meth:`save`; ConfigError naming the file (and the command that
        makes one) when it is missing, damaged or not a lung model."""
        path = Path(path).expanduser()
        hint = TRAIN_HINT.format(path=path)
        if not path.is_file():
            raise ConfigError(f"lung model weights {path} not found; produce them with `{hint}` (see the "
                              "README, 'Lung-masked input') or set preprocess.lung_model to the file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot read lung model weights {path} ({exc}); the file is damaged or not a "
                              f"safetensors file: produce it again with `{hint}`") from None
        if meta.get("format") != FORMAT:
            found = meta.get("format")
            raise ConfigError(f"{path} is not a covidscan lung model (format {found!r}, expected "
                              f"{FORMAT!r}); produce one with `{hint}`")
        try:
            widths = tuple(int(v) for v in meta["widths"].split(","))
            model = UNet(widths)
            model.load_state_dict(state)
            size = int(meta["size"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"lung model weights {path} do not fit the U-Net they describe ({exc}); "
                              f"produce them again with `{hint}`") from None
        return cls(model, size, str(path))

    def save(self, path: str | os.PathLike[str], **info: str) -> Path:
        """Write the weights with their metadata (and ``info``: free-form notes such as held-out IoU)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "widths": ",".join(map(str, self.model.widths)), "size": str(self.size)}
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(path), metadata={**info, **meta})
        return path

    def probability(self, image: np.ndarray) -> np.ndarray:
        """Lung probability (float32, the image's shape) of a gray [0, 1] image."""
        gray = as_gray_float(image)
        x = torch.from_numpy(model_input(gray, self.size))[None, None]
        with torch.inference_mode():
            prob = torch.sigmoid(self.model(x))[0, 0].numpy()
        return cv2.resize(prob, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)

    def __call__(self, image: np.ndarray, min_area: float = 0.01) -> np.ndarray:
        """Boolean lung mask of a gray [0, 1] image, at the image's shape (see :func:`clean_mask`)."""
        return clean_mask(self.probability(image), min_area)


def default_lung_model() -> Path:
    """Where ``covidscan lungseg train`` puts the X-ray lung model unless told otherwise (the cache)."""
    return cache_dir("models") / DEFAULT_NAME


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, size: int) -> LungSegmenter:
    return LungSegmenter.load(path)


def lung_model_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``path`` (``~`` expanded), or :func:`default_lung_model` when None."""
    return Path(path).expanduser() if path is not None else default_lung_model()


def lung_segmenter(path: str | os.PathLike[str] | None = None) -> LungSegmenter:
    """The segmenter of ``path`` (default :func:`default_lung_model`), loaded once per file version."""
    resolved = lung_model_path(path)
    try:
        stat = resolved.stat()
    except OSError:
        return LungSegmenter.load(resolved)  # raises the "not found, produce it with ..." error
    return _cached(str(resolved.resolve()), stat.st_mtime_ns, stat.st_size)
