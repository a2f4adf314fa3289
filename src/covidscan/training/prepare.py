"""Decode and preprocess a manifest's images once, in parallel, into a compact in-memory array.

Every epoch, feature extraction and evaluation then reads from this array instead of decoding and
re-running CLAHE and the lung crop each time.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidscan import CLASSES
from covidscan.errors import ImageReadError, ManifestError
from covidscan.io import read_image, to_uint8
from covidscan.preprocess import PreprocessConfig, preprocess


@dataclass(frozen=True)
class PreparedImage:
    """One preprocessed image: ``pixels`` is uint8 (H, W) at the model's input size.

    ``bbox`` (y0, x0, y1, x1) is the region of the original image that ``pixels`` shows (the lung crop,
    or the whole image), so maps computed on ``pixels`` can be drawn back onto the original.
    """

    pixels: np.ndarray
    lungs_found: bool | None
    bbox: tuple[int, int, int, int]
    original: np.ndarray | None = None  # the decoded image, kept only when asked for (keep_original=True)
    lung_mask: np.ndarray | None = None  # the lung crop's mask on the original, kept with it when found


@dataclass
class PreparedSet:
    """Preprocessed images of a manifest, with their labels and patient ids, ready for a model."""

    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,), index into CLASSES
    patient_ids: list[str | None]
    paths: list[str]
    lungs_found: list[bool | None]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask: np.ndarray) -> PreparedSet:
        """The rows where ``mask`` is true."""
        idx = np.flatnonzero(mask)
        return PreparedSet(
            images=self.images[idx],
            labels=self.labels[idx],
            patient_ids=[self.patient_ids[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            lungs_found=[self.lungs_found[i] for i in idx],
        )


def prepare_one(
    path: str,
    cfg: PreprocessConfig,
    size: tuple[int, int],
    window: tuple[float, float] | None = None,
    *,
    keep_original: bool = False,
) -> PreparedImage:
    """Read one file, apply the preset's preprocessing and resize to ``size`` = (height, width)."""
    return prepare_array(read_image(path, window=window).pixels, cfg, size, keep_original=keep_original)


def prepare_array(
    image: np.ndarray, cfg: PreprocessConfig, size: tuple[int, int], *, keep_original: bool = False
) -> PreparedImage:
    """Preprocess an already decoded gray float image and resize it to ``size`` = (height, width)."""
    pixels, crop = preprocess(image, cfg)
    # INTER_AREA when shrinking keeps fine texture (ground glass) instead of aliasing it away.
    interp = cv2.INTER_AREA if pixels.shape[0] > size[0] else cv2.INTER_LINEAR
    resized = cv2.resize(pixels, (size[1], size[0]), interpolation=interp)
    bbox = crop.bbox if crop is not None else (0, 0, *image.shape[:2])
    return PreparedImage(
        to_uint8(resized),
        None if crop is None else crop.found,
        tuple(int(v) for v in bbox),
        image if keep_original else None,
        crop.mask if keep_original and crop is not None and crop.found else None,
    )


def prepare_paths(
    paths: Sequence[str],
    cfg: PreprocessConfig,
    size: tuple[int, int],
    *,
    workers: int = 2,
    progress: bool = True,
    desc: str = "preprocess",
) -> tuple[list[PreparedImage | None], list[ImageReadError]]:
    """Prepare many files in threads (OpenCV and the decoders release the GIL); bad files are collected."""

    def work(path: str) -> PreparedImage | ImageReadError:
        try:
            return prepare_one(path, cfg, size)
        except ImageReadError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(
            tqdm(pool.map(work, paths), total=len(paths), desc=desc, disable=not progress, leave=False)
        )
    errors = [r for r in results if isinstance(r, ImageReadError)]
    prepared = [None if isinstance(r, ImageReadError) else r for r in results]
    return prepared, errors


def prepare_manifest(
    df: pd.DataFrame, cfg: PreprocessConfig, size: tuple[int, int], *, workers: int = 2, progress: bool = True
) -> PreparedSet:
    """Prepare every row of a manifest; any unreadable file stops with an error listing them all."""
    paths = df["path"].astype(str).tolist()
    prepared, errors = prepare_paths(paths, cfg, size, workers=workers, progress=progress)
    if errors:
        listing = "\n  ".join(str(e) for e in errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ManifestError(
            f"{len(errors)} of {len(paths)} images could not be read; fix or remove them from the "
            f"manifest and run again:\n  {listing}{more}"
        )
    labels = df["label"].map({name: i for i, name in enumerate(CLASSES)})
    if labels.isna().any():
        bad = sorted(set(df.loc[labels.isna(), "label"].astype(str)))
        raise ManifestError(f"labels {bad} are not among {list(CLASSES)}")
    pids = df["patient_id"] if "patient_id" in df else pd.Series([None] * len(df), index=df.index)
    return PreparedSet(
        images=np.stack([p.pixels for p in prepared if p is not None]),
        labels=labels.to_numpy(dtype=np.int64),
        patient_ids=[None if pd.isna(p) or p == "" else str(p) for p in pids],
        paths=paths,
        lungs_found=[p.lungs_found for p in prepared if p is not None],
    )
