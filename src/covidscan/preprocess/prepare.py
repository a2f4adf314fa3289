"""Model-input preparation: a decoded image becomes a float array at the model's input size, once.

The same :func:`prepare_image` serves training, evaluation and prediction (and the preview sheet uses the
same :func:`~covidscan.preprocess.preprocess`), so what a model is trained on and what it is served can
never drift apart. Images stay float32 from the decoder to the model: no round trip through uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from covidscan import CLASSES
from covidscan.data.fingerprints import perceptual_hash
from covidscan.errors import ImageRefusedError, InputError, ManifestError
from covidscan.io import ImageMeta, LoadedImage, gate, image_stats, pixel_hash, read_image
from covidscan.preprocess.config import PreprocessConfig
from covidscan.preprocess.pipeline import preprocess


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One image ready for a model: ``pixels`` is float32 (H, W) in [0, 1] at the model's input size.

    ``bbox`` (y0, x0, y1, x1) is the region of the original image that ``pixels`` shows (the lung crop, or
    the whole image), so maps computed on ``pixels`` can be drawn back onto the original. ``original`` and
    ``lung_mask`` (the crop's mask on the original) are kept only when asked for (explanations need them).
    ``warnings`` are notes for a reader ("code: details"); ``meta`` says where the image came from;
    ``stats`` are the decoded image's :func:`~covidscan.io.image_stats` (for the out-of-distribution score).
    """

    pixels: np.ndarray
    lungs_found: bool | None
    bbox: tuple[int, int, int, int]
    meta: ImageMeta | None = None
    original: np.ndarray | None = None
    lung_mask: np.ndarray | None = None
    warnings: tuple[str, ...] = ()
    pixel_hash: str | None = None  # of the decoded image (io.pixel_hash), when asked for
    perceptual_hash: np.ndarray | None = None  # 256-bit pHash of the decoded image, when asked for
    stats: np.ndarray | None = None


@dataclass
class PreparedSet:
    """Prepared images of a manifest, with their labels and patient ids, ready for a model."""

    images: np.ndarray  # float32 (N, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,), index into CLASSES
    patient_ids: list[str | None]
    paths: list[str]
    lungs_found: list[bool | None]
    pixel_hashes: list[str | None] | None = None
    perceptual_hashes: np.ndarray | None = None  # bool (N, 256): each decoded image's pHash
    stats: np.ndarray | None = None  # float32 (N, len(STAT_NAMES)): each decoded image's image_stats
    rows: np.ndarray | None = None  # positions of these images in the manifest they came from
    excluded: list[dict[str, str]] = field(default_factory=list)  # manifest rows left out, and why

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def groups(self) -> list[str | None] | None:
        """The patient ids, or None when no image has one (the bootstrap then resamples images)."""
        return self.patient_ids if any(g is not None for g in self.patient_ids) else None

    def subset(self, mask: np.ndarray) -> PreparedSet:
        """The rows where ``mask`` is true."""
        idx = np.flatnonzero(mask)
        return PreparedSet(
            images=self.images[idx],
            labels=self.labels[idx],
            patient_ids=[self.patient_ids[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            lungs_found=[self.lungs_found[i] for i in idx],
            pixel_hashes=None if self.pixel_hashes is None else [self.pixel_hashes[i] for i in idx],
            perceptual_hashes=None if self.perceptual_hashes is None else self.perceptual_hashes[idx],
            stats=None if self.stats is None else self.stats[idx],
            rows=None if self.rows is None else self.rows[idx],
        )


def prepare_image(
    image: LoadedImage | np.ndarray,
    cfg: PreprocessConfig,
    size: tuple[int, int],
    *,
    keep_original: bool = False,
    fingerprint: bool = False,
) -> PreparedImage:
    """Preprocess a decoded image (CLAHE, lung crop, masking as configured), resize it to ``size`` = (H, W).

    ``fingerprint`` also records the decoded image's :func:`~covidscan.io.pixel_hash` and perceptual hash
    (:mod:`covidscan.data.fingerprints`). When the masked mode
    finds no lungs, the whole unmasked image is used and ``warnings`` say so.
    """
    pixels, meta = (image.pixels, image.meta) if isinstance(image, LoadedImage) else (image, None)
    result = preprocess(pixels, cfg)
    region = result.image
    # INTER_AREA when shrinking keeps fine texture (ground glass) instead of aliasing it away.
    interp = cv2.INTER_AREA if region.shape[0] > size[0] else cv2.INTER_LINEAR
    resized = cv2.resize(region, (size[1], size[0]), interpolation=interp)
    crop = result.crop
    bbox = result.input_bbox(pixels.shape[:2])
    mask_failed = cfg.mask_outside_lungs and crop is not None and not crop.found
    notes = (f"unmasked: no lungs found ({crop.reason}), so nothing was masked and the model sees the whole "
             "image, borders and text included",) if mask_failed else ()
    return PreparedImage(
        pixels=np.clip(resized, 0.0, 1.0, out=resized).astype(np.float32, copy=False),
        lungs_found=None if crop is None else crop.found,
        bbox=bbox,
        meta=meta,
        original=pixels if keep_original else None,
        lung_mask=result.input_mask(pixels.shape[:2]) if keep_original else None,
        warnings=notes,
        pixel_hash=pixel_hash(pixels) if fingerprint else None,
        perceptual_hash=perceptual_hash(pixels) if fingerprint else None,
        stats=image_stats(pixels, meta),
    )


def to_model_batch(
    pixels: np.ndarray, mean: Sequence[float], std: Sequence[float], *, channels_last: bool = True
) -> torch.Tensor:
    """Float (N, H, W) in [0, 1] at model size -> normalised float (N, 3, H, W), channels_last unless
    ``channels_last=False`` (onnxruntime takes contiguous NCHW, and converting costs a copy of the batch).

    Equals ``eval_transform`` image by image (gray to 3 channels, normalise; no resize at model size)
    in a few vectorised ops instead of one torchvision pipeline per image.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).unsqueeze(1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def prepare_paths(
    paths: Sequence[str],
    cfg: PreprocessConfig,
    size: tuple[int, int],
    *,
    workers: int = 2,
    progress: bool = True,
    desc: str = "preprocess",
    fingerprint: bool = False,
) -> tuple[list[PreparedImage | None], list[InputError]]:
    """Read, check and prepare many files in threads (OpenCV and the decoders release the GIL).

    Every image passes the quality gate (:func:`covidscan.io.gate` for ``cfg.modality``) first. Returns
    one entry per path (None where it failed) and the errors of the files that were unreadable or refused.
    """

    def work(path: str) -> PreparedImage | InputError:
        try:
            loaded = read_image(path)
            gate(loaded, cfg.modality)
            return prepare_image(loaded, cfg, size, fingerprint=fingerprint)
        except InputError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(
            tqdm(pool.map(work, paths), total=len(paths), desc=desc, disable=not progress, leave=False)
        )
    errors = [r for r in results if isinstance(r, InputError)]
    prepared = [None if isinstance(r, InputError) else r for r in results]
    return prepared, errors


def prepare_manifest(
    df: pd.DataFrame,
    cfg: PreprocessConfig,
    size: tuple[int, int],
    *,
    workers: int = 2,
    progress: bool = True,
    fingerprint: bool = False,
    strict: bool = False,
) -> PreparedSet:
    """Prepare every row of a manifest. Unreadable or refused images are left out and listed in
    ``excluded`` (``path``, ``status``: unreadable or refused, ``reason``); ``strict`` makes any of them an
    error listing them all. ``rows`` are the kept rows' positions in ``df``.

    ``fingerprint`` keeps each decoded image's pixel and perceptual hash (to compare data sets without
    decoding again).
    """
    paths = df["path"].astype(str).tolist()
    labels = df["label"].map({name: i for i, name in enumerate(CLASSES)})
    if labels.isna().any():
        bad = sorted(set(df.loc[labels.isna(), "label"].astype(str)))
        raise ManifestError(f"labels {bad} are not among {list(CLASSES)}")
    prepared, errors = prepare_paths(paths, cfg, size, workers=workers, progress=progress,
                                     fingerprint=fingerprint)
    excluded = [
        {"path": str(e.path), "status": "refused" if isinstance(e, ImageRefusedError) else "unreadable",
         "reason": str(e)}
        for e in errors
    ]
    if excluded and (strict or len(excluded) == len(paths)):
        listing = "\n  ".join(e["reason"] for e in excluded[:10])
        more = f"\n  ... and {len(excluded) - 10} more" if len(excluded) > 10 else ""
        why = "--strict makes any of them an error" if strict else "none is left"
        raise ManifestError(
            f"{len(excluded)} of {len(paths)} images could not be read or were refused ({why}); fix or "
            f"remove them from the manifest and run again:\n  {listing}{more}"
        )
    rows = np.array([i for i, p in enumerate(prepared) if p is not None], dtype=np.int64)
    images = [prepared[i] for i in rows]
    pids = df["patient_id"] if "patient_id" in df else pd.Series([None] * len(df), index=df.index)
    pid_list = [None if pd.isna(p) or p == "" else str(p) for p in pids]
    return PreparedSet(
        images=np.stack([p.pixels for p in images]),
        labels=labels.to_numpy(dtype=np.int64)[rows],
        patient_ids=[pid_list[i] for i in rows],
        paths=[paths[i] for i in rows],
        lungs_found=[p.lungs_found for p in images],
        pixel_hashes=[p.pixel_hash for p in images] if fingerprint else None,
        perceptual_hashes=np.stack([p.perceptual_hash for p in images]) if fingerprint else None,
        stats=np.stack([p.stats for p in images]),
        rows=rows,
        excluded=excluded,
    )
