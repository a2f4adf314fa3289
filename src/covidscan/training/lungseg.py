"""Training the chest X-ray lung U-Net (:mod:`covidscan.preprocess.lungseg`) on real lung masks.

The masks are V7 Labs' lung annotations of the ieee8023 COVID-19 image data collection (Cohen et al.,
https://github.com/ieee8023/covid-chestxray-dataset), as shipped inside the PyPI package torchxrayvision
(``torchxrayvision/data/semantic_masks_v7labs_lungs.zip``: 517 masks, no images; V7 Labs publishes them under
CC BY 4.0, https://github.com/v7labs/covid-19-xray-dataset). Lungs there include the part behind the heart.
The zip holds masks only, so they are matched to your copy of the images by file name (the name without
its extension: ``a.jpeg`` in the zip matches ``covid/a.png``). The images keep their own licences (the
collection's ``license`` column: CC BY-NC-SA, CC BY-NC-ND, CC BY, Apache 2.0, or none stated).

The held-out split is by patient when the images come as a manifest CSV with patient ids (a
``patient_group`` or ``patient_id`` column, see :func:`covidscan.data.read_manifest`), else by image.
Phantom X-rays (:func:`covidscan.data.synthetic.make_phantom`) can be added to the training part; their
lungs leave out the heart, unlike the V7 masks, so they are for trying the command without real data.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm

from covidscan.data import read_manifest
from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError, InputError
from covidscan.io import IMAGE_SUFFIXES, read_image
from covidscan.outputs import check_output, replaced_file
from covidscan.preprocess import AugmentParams, apply_clahe, find_lungs, photometric_steps
from covidscan.preprocess.lungseg import SIZE, WIDTHS, LungSegmenter, UNet, model_input

MASKS_NAME = "semantic_masks_v7labs_lungs.zip"
WHEEL_MEMBER = f"torchxrayvision/data/{MASKS_NAME}"
MASKS_LICENSE = "V7 Labs lung annotations, CC BY 4.0 (https://github.com/v7labs/covid-19-xray-dataset)"
# Augmentation of the training images: a mild affine (applied to image and mask alike) and the strong
# photometric changes, so the model copes with every exposure, blur, noise and compression it will meet.
AFFINE = v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.85, 1.15))
PHOTOMETRIC = AugmentParams(brightness=0.2, contrast=0.3, gamma=(0.6, 1.6), blur_sigma=(0.1, 1.2), noise=0.03,
                            jpeg_quality=(30, 90), photometric_p=0.5)


@dataclass
class LungSample:
    """One training image with its lung mask (both at the image's own size) and its patient (group)."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    group: str


@dataclass
class LungsegResult:
    """What :func:`train_lung_model` did: the weights file and the held-out figures."""

    path: Path
    n_train: int
    n_val: int
    n_phantoms: int
    val_iou: float  # mean per-image IoU on the held-out images, of the mask the pipeline uses
    val_iou_median: float
    baseline_iou: float  # the contour finder (find_lungs, cxr) on the same held-out images
    epochs: int
    seconds: float
    split: str  # "patient" or "image"
    skipped: list[str] = field(default_factory=list)  # images with a mask that could not be used, and why

    def summary(self) -> str:
        """A few lines for the command line."""
        return (f"lung model written to {self.path}: {self.n_train} training images (+{self.n_phantoms} "
                f"phantoms), {self.n_val} held out ({self.split}-disjoint); held-out IoU mean "
                f"{self.val_iou:.3f}, median {self.val_iou_median:.3f} (contour finder on the same images: "
                f"{self.baseline_iou:.3f}); {self.epochs} epochs in {self.seconds:.0f} s"
                + (f"; {len(self.skipped)} images skipped" if self.skipped else ""))


def _archive_bytes(source: str | os.PathLike[str] | None) -> tuple[bytes, str]:
    """The masks zip's bytes from a zip, a torchxrayvision wheel, a torchxrayvision folder or the installed
    package, and where they came from."""
    if source is None:
        spec = importlib.util.find_spec("torchxrayvision")
        if spec is None or spec.origin is None:
            raise ConfigError(f"no lung masks given and torchxrayvision is not installed: `pip install "
                              f"torchxrayvision`, or pass --masks with its wheel or {MASKS_NAME}")
        source = Path(spec.origin).parent
    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [path / MASKS_NAME, path / "data" / MASKS_NAME,
                      path / "torchxrayvision" / "data" / MASKS_NAME]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path} holds no {MASKS_NAME}; give the zip itself or a torchxrayvision wheel")
        path = found
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                return wheel.read(WHEEL_MEMBER), f"{path}:{WHEEL_MEMBER}"
        return path.read_bytes(), str(path)
    except FileNotFoundError:
        raise ConfigError(f"lung masks {path} not found; give {MASKS_NAME} or a torchxrayvision "
                          "wheel") from None
    except KeyError:
        raise ConfigError(f"the wheel {path} has no {WHEEL_MEMBER}; use a torchxrayvision wheel that "
                          "ships the V7 Labs lung masks (1.5.7 does)") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"cannot read lung masks from {path}: {exc}") from None


def read_lung_masks(source: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """The V7 Labs lung masks, ``{file name without extension: bool mask}``; ``source`` is the zip, a
    torchxrayvision wheel or folder, or None for the installed torchxrayvision."""
    data, where = _archive_bytes(source)
    masks: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                if name.endswith("/"):
                    continue
                decoded = cv2.imdecode(np.frombuffer(archive.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
                if decoded is not None:
                    masks[Path(name).stem] = decoded > 127  # some masks are JPEGs: 255 blurred by compression
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{where} is not a zip of lung masks ({exc})") from None
    if not masks:
        raise ConfigError(f"{where} holds no readable lung mask images")
    return masks


def _image_list(images: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], bool]:
    """(path, group) of every image of a manifest CSV, or of every image file under a folder, and whether
    the groups are patients (else each image is its own group)."""
    source = Path(images).expanduser()
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [(str(p), str(p)) for p in files], False
    df = read_manifest(source)
    pids = df["patient_id"] if "patient_id" in df else df["path"]
    listed = [(str(p), str(g) if isinstance(g, str) and g else str(p))
              for p, g in zip(df["path"], pids, strict=True)]
    return listed, any(p != g for p, g in listed)


def match_masks(
    images: str | os.PathLike[str], masks: dict[str, np.ndarray]
) -> tuple[list[LungSample], list[str], bool]:
    """Pair images with masks by file name; returns the samples, the images skipped (with why) and whether
    the groups are patients (a manifest with patient ids) rather than single images."""
    listed, by_patient = _image_list(images)
    samples, skipped = [], []
    for path, group in listed:
        mask = masks.get(Path(path).stem)
        if mask is None:
            continue
        try:
            image = read_image(path).pixels
        except InputError as exc:
            skipped.append(f"{path}: {exc.reason}")
            continue
        (h, w), (mh, mw) = image.shape, mask.shape
        if abs(h / w - mh / mw) > 0.03 * (h / w):  # another crop of the picture: the mask would not fit
            skipped.append(f"{path}: image {h}x{w} and mask {mh}x{mw} differ in aspect ratio")
            continue
        fitted = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0.5
        samples.append(LungSample(Path(path).name, image, fitted, group))
    if not samples:
        raise ConfigError(f"no image under {images} matches a lung mask by file name; the masks are of the "
                          "ieee8023 covid-chestxray-dataset images (e.g. its images/ folder)")
    return samples, skipped, by_patient


def phantom_samples(n: int, seed: int, size: int = 256) -> list[LungSample]:
    """``n`` phantom chest X-rays with their lung masks (half with lesions), each its own group."""
    out = []
    for i in range(n):
        ph = make_phantom(seed * 100_003 + i, modality="cxr", covid=bool(i % 2), size=size)
        out.append(LungSample(f"phantom-{i}", ph.image, ph.lung_mask.astype(bool), f"phantom-{i}"))
    return out


def _tensors(samples: list[LungSample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([model_input(s.image, size) for s in samples])
    y = np.stack([cv2.resize(s.mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.5
                  for s in samples])
    return torch.from_numpy(x)[:, None], torch.from_numpy(y.astype(np.float32))[:, None]


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (the Dice term keeps small lungs from being traded for
    background)."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return nn.functional.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _augment(x: torch.Tensor, y: torch.Tensor, photometric: v2.Compose) -> tuple[torch.Tensor, torch.Tensor]:
    """One random view of each image of a batch: the same affine for image and mask, photometric on the
    image only."""
    xs, ys = [], []
    for image, mask in zip(x, y, strict=True):
        image, mask = AFFINE(tv_tensors.Image(image), tv_tensors.Mask(mask))
        xs.append(photometric(image))
        ys.append(mask)
    return torch.stack(xs).as_subclass(torch.Tensor), torch.stack(ys).as_subclass(torch.Tensor)


def fit_unet(
    train: list[LungSample],
    *,
    epochs: int,
    seed: int,
    size: int = SIZE,
    batch_size: int = 16,
    lr: float = 3e-3,
    progress: bool = True,
) -> LungSegmenter:
    """Train a :class:`UNet` on the samples (augmented views, Adam, cosine learning rate) and wrap it."""
    if size < 16 or size % 16:
        raise ConfigError(f"the lung model's input size must be a multiple of 16, got {size}")
    if epochs < 1 or not train:
        raise ConfigError(f"lung model training needs images and epochs >= 1 (got {len(train)} images, "
                          f"{epochs} epochs)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(WIDTHS)
        x, y = _tensors(train, size)
        photometric = v2.Compose(photometric_steps(PHOTOMETRIC))
        steps_per_epoch = math.ceil(len(train) / batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        bar = tqdm(total=epochs * steps_per_epoch, desc="lungseg", disable=not progress, leave=False)
        for _ in range(epochs):
            order = torch.randperm(len(train))
            for k in range(steps_per_epoch):
                idx = order[k * batch_size : (k + 1) * batch_size]
                xb, yb = _augment(x[idx], y[idx], photometric)
                loss = _loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    return LungSegmenter(model, size)


def _contour_mask(image: np.ndarray) -> np.ndarray:
    """The mask the existing contour finder draws on a CLAHE image (the baseline the U-Net replaces)."""
    return find_lungs(apply_clahe(image), modality="cxr").mask


def train_lung_model(
    out: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    epochs: int = 12,
    seed: int = 0,
    phantoms: int = 0,
    val_fraction: float = 0.2,
    size: int = SIZE,
    progress: bool = True,
) -> LungsegResult:
    """Train the X-ray lung U-Net on the masks matched to ``images`` (a manifest CSV or a folder) plus
    ``phantoms`` phantom X-rays, measure its IoU on held-out images, and write the weights to ``out``.

    ``val_fraction`` of the patients (of the images, without patient ids) are held out; with phantoms only
    (``images`` None), held-out phantoms are measured. ``size`` is the U-Net's input side (a multiple of 16).
    ``out`` may not replace ``images`` or ``masks``; it is replaced only by a complete file.
    """
    start = time.perf_counter()
    if not str(out).endswith(".safetensors"):
        raise ConfigError(f"the lung model is a safetensors file: name it .safetensors, not {Path(out).name}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must lie between 0 and 1, got {val_fraction}")
    if images is None and phantoms < 2:
        raise ConfigError("give images (with their lung masks) or at least 2 phantoms to train on")
    check_output(out, [p for p in (images, masks) if p is not None])
    skipped: list[str] = []
    if images is not None:
        samples, skipped, by_patient = match_masks(images, read_lung_masks(masks))
        extra = phantom_samples(phantoms, seed)
    else:
        samples, extra, by_patient = phantom_samples(phantoms, seed), [], False
    groups = [s.group for s in samples]
    if len(set(groups)) < 2:
        raise ConfigError(f"only {len(samples)} image(s) of one patient matched a mask: too few to hold "
                          "any out")
    split = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(split.split(np.zeros(len(samples)), groups=groups))
    train = [samples[i] for i in train_idx] + extra
    val = [samples[i] for i in val_idx]
    segmenter = fit_unet(train, epochs=epochs, seed=seed, size=size, progress=progress)
    scores = [iou(segmenter(s.image), s.mask) for s in val]
    baseline = [iou(_contour_mask(s.image), s.mask) for s in val]
    result = LungsegResult(
        path=Path(out), n_train=len(train) - len(extra), n_val=len(val), n_phantoms=len(extra),
        val_iou=float(np.mean(scores)), val_iou_median=float(np.median(scores)),
        baseline_iou=float(np.mean(baseline)), epochs=epochs, seconds=time.perf_counter() - start,
        split="patient" if by_patient else "image", skipped=skipped,
    )
    with replaced_file(out, "the lung model ") as side:
        segmenter.save(side, val_iou=f"{result.val_iou:.4f}", n_train=str(result.n_train),
                       n_val=str(result.n_val), split=result.split, seed=str(seed), epochs=str(epochs),
                       masks_license=MASKS_LICENSE)
    return result
