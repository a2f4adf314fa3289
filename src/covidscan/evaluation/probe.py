"""Shortcut probe: can the labels be told apart from what lies outside the lungs?

A linear probe (scikit-learn logistic regression on standardised, globally pooled features of a frozen
ImageNet backbone) is trained by patient-grouped cross-validation on three views of every image: the image
with its lungs blacked out (only what lies outside the lungs is left: text, markers, borders, the body, the
scanner's field of view), the lungs alone (everything outside them set to black), and the lung mask alone
(white lungs on black). The out-of-fold ROC AUCs, with patient-bootstrap 95% intervals, say how much of the
label is readable without looking at the lungs. A high outside-lungs AUC means a model can score well on
this data by learning the source, not the disease. The first two views both keep the lung silhouette; the
mask view is the control that says how much its shape, size and position alone give.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from covidscan import CLASSES
from covidscan.errors import ConfigError, ImageRefusedError, InputError, ManifestError
from covidscan.evaluation._checks import group_codes
from covidscan.evaluation.metrics import bootstrap_ci
from covidscan.io import gate, read_image
from covidscan.models import Backbone, build_backbone
from covidscan.preprocess import MODALITIES, apply_clahe, find_lungs, to_model_batch
from covidscan.preprocess.clahe import as_gray_float
from covidscan.preprocess.lungseg import lung_segmenter

OUTSIDE_AUC_WARN = 0.7
"""Outside-lungs ROC AUC from which the audit warns: 0.7 is the usual floor of "acceptable" discrimination,
so above it the outside alone predicts the labels about as well as a weak diagnostic test."""
NO_LUNGS_WARN = 0.2
"""Share of images without lungs found from which the audit warns that the masks may be unreliable."""
VIEWS = 3
"""Outside the lungs, lungs only, lung mask only: the order of the views everywhere below."""
PROBE_C = 1.0
"""Inverse L2 strength of the probe on standardised features (scikit-learn's default)."""


@dataclass(frozen=True)
class MaskMethod:
    """A lung segmenter for the probe: ``find(gray, modality)`` -> boolean lung mask of the gray image's
    shape, or None when it finds no lungs. Add one to :data:`MASK_METHODS` (or pass it) to swap masks."""

    name: str
    description: str
    find: Callable[[np.ndarray, str], np.ndarray | None]


def contour_lung_mask(gray: np.ndarray, modality: str) -> np.ndarray | None:
    """The lung crop's contour mask: :func:`~covidscan.preprocess.find_lungs` on the CLAHE image."""
    crop = find_lungs(apply_clahe(gray), modality=modality)
    return crop.mask if crop.found else None


def unet_lung_mask(gray: np.ndarray, modality: str) -> np.ndarray | None:
    """The X-ray lung U-Net's mask (``covidscan lungseg train``; the masked ``cxr`` mode's lungs)."""
    mask = lung_segmenter()(gray)
    return mask if mask.any() else None


MASK_METHODS: dict[str, MaskMethod] = {
    "contour": MaskMethod(
        "contour", "preprocess.find_lungs contours on the CLAHE image (the lung crop's masks)",
        contour_lung_mask,
    ),
    "unet": MaskMethod(
        "unet", "the X-ray lung U-Net of covidscan lungseg train (chest X-rays only)", unet_lung_mask,
    ),
}


@dataclass(frozen=True)
class ProbeScore:
    """Out-of-fold ROC AUC of one view with its 95% bootstrap interval (``None`` ends when undefined)."""

    value: float
    ci95: tuple[float | None, float | None]


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`shortcut_probe` measured; ``to_dict`` is the audit's ``probe`` section."""

    outside_lungs: ProbeScore
    lungs_only: ProbeScore
    mask_only: ProbeScore  # the control: the silhouette that both other views carry
    mask_method: str
    mask_description: str
    backbone: str
    weights: str
    size: tuple[int, int]
    folds: int
    unit: str  # what the folds and the bootstrap keep together: "patient" or "image"
    n_images: int  # rows of the manifest
    n_used: int  # images the probe was trained on
    n_patients: int | None
    n_boot: int
    excluded: list[dict[str, str]] = field(default_factory=list)  # path, status, reason

    def count(self, status: str) -> int:
        """Images left out with ``status``: ``unreadable``, ``refused`` or ``no_lungs``."""
        return sum(e["status"] == status for e in self.excluded)

    @property
    def n_checked(self) -> int:
        """Images read and accepted by the quality gate, in which the mask method looked for lungs."""
        return self.n_images - self.count("unreadable") - self.count("refused")

    @property
    def no_lungs_share(self) -> float:
        """Share of the checked images in which the mask method found no lungs."""
        return self.count("no_lungs") / self.n_checked if self.n_checked else 0.0

    @property
    def warnings(self) -> list[str]:
        """One line per problem the probe shows, most serious first."""
        out = []
        outside, lungs = self.outside_lungs.value, self.lungs_only.value
        if outside >= OUTSIDE_AUC_WARN:
            out.append(
                f"shortcut risk: the labels are predictable from outside the lungs alone (probe ROC AUC "
                f"{outside:.2f}, lungs only {lungs:.2f}, lung mask only {self.mask_only.value:.2f}); a model "
                "can learn the source instead of the disease"
            )
        if self.no_lungs_share > NO_LUNGS_WARN:
            out.append(
                f"shortcut probe: no lungs found ({self.mask_method} masks) in {self.count('no_lungs')} of "
                f"{self.n_checked} readable images ({self.no_lungs_share:.0%}), left out of the probe; check "
                "the masks with `covidscan preprocess preview`"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: AUC entries in metrics.json's ``{"value", "ci95"}`` shape, counts and the warnings."""
        d = asdict(self)
        d["ci_method"] = f"95% percentile bootstrap resampling {self.unit}s ({self.n_boot} resamples)"
        d["n_unreadable"], d["n_refused"], d["n_no_lungs"] = (
            self.count(s) for s in ("unreadable", "refused", "no_lungs"))
        d["no_lungs_share"] = round(self.no_lungs_share, 4)
        d["warnings"] = self.warnings
        return d


def _mask_method(mask: str | MaskMethod) -> MaskMethod:
    if isinstance(mask, MaskMethod):
        return mask
    if mask not in MASK_METHODS:
        raise ConfigError(f"unknown lung mask method {mask!r}; use one of {', '.join(MASK_METHODS)}")
    return MASK_METHODS[mask]


def _views(path: str, modality: str, method: MaskMethod, size: tuple[int, int]) -> np.ndarray | dict:
    """(3, H, W): the image with its lungs blacked out, the lungs alone, the mask; a dict says why not."""
    try:
        loaded = read_image(path)
        gate(loaded, modality)
    except InputError as exc:
        status = "refused" if isinstance(exc, ImageRefusedError) else "unreadable"
        return {"path": path, "status": status, "reason": str(exc)}
    gray = as_gray_float(loaded.pixels)
    lungs = method.find(gray, modality)
    if lungs is None or not lungs.any():
        return {"path": path, "status": "no_lungs", "reason": f"no lungs found by the {method.name} masks"}
    if lungs.shape != gray.shape:
        raise ConfigError(f"lung mask method {method.name!r} returned a {lungs.shape} mask for the "
                          f"{gray.shape} image {path}; a mask must have the image's shape")
    views = np.stack([np.where(lungs, 0.0, gray), np.where(lungs, gray, 0.0), lungs]).astype(np.float32)
    # Resizing after masking (area-averaged) blends the mask edge as a resized photograph would.
    interp = cv2.INTER_AREA if gray.shape[0] > size[0] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(v, (size[1], size[0]), interpolation=interp) for v in views])


@torch.inference_mode()
def _pooled(backbone: Backbone, pixels: np.ndarray) -> np.ndarray:
    """Globally averaged feature maps of a (N, H, W) batch in [0, 1]."""
    return backbone(to_model_batch(np.clip(pixels, 0.0, 1.0), backbone.mean, backbone.std)).mean(
        dim=(2, 3)).numpy()


def _features(
    paths: list[str], modality: str, method: MaskMethod, backbone: Backbone, *, batch_size: int,
    workers: int, progress: bool,
) -> Iterator[tuple[int, np.ndarray] | dict]:
    """(row, (VIEWS, C) features) per usable image, or the exclusion dict.

    Decoding and masking run in threads, one batch of paths at a time, so only one batch of views is ever
    held in memory however large the manifest.
    """
    size = backbone.input_size
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
        total=len(paths), desc="probe features", unit="img", disable=not progress, leave=False
    ) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            results = list(pool.map(lambda p: _views(p, modality, method, size), chunk))
            yield from (r for r in results if isinstance(r, dict))
            batch = [(start + i, r) for i, r in enumerate(results) if not isinstance(r, dict)]
            if batch:
                # all views of every image in one forward pass
                feats = _pooled(backbone, np.concatenate([v for _, v in batch]))
                yield from ((row, feats[VIEWS * i : VIEWS * (i + 1)]) for i, (row, _) in enumerate(batch))
            bar.update(len(chunk))


def _score(x: np.ndarray, y: np.ndarray, codes: np.ndarray, cv: StratifiedGroupKFold,
           groups: list[object] | None, n_boot: int, seed: int) -> ProbeScore:
    """Out-of-fold probe probabilities, their ROC AUC and its bootstrap interval."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=5000))
    p = cross_val_predict(probe, x, y, groups=codes, cv=cv, method="predict_proba")[:, 1]
    ci = bootstrap_ci(y, p, threshold=0.5, groups=groups, n_boot=n_boot, seed=seed)["roc_auc"]
    return ProbeScore(float(roc_auc_score(y, p)), (ci.low, ci.high))


def shortcut_probe(
    df: pd.DataFrame,
    *,
    modality: str | None,
    backbone: str = "mobilenet_v2",
    weights: str | Path = "imagenet",
    size: int = 224,
    mask: str | MaskMethod = "contour",
    folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = False,
) -> ProbeResult:
    """Linear-probe ROC AUCs of the outside of the lungs, the lungs alone and the lung mask, out of fold.

    ``df`` is a manifest (``path``, ``label`` in ``covidscan.CLASSES``, optional ``patient_id``);
    ``modality`` (``ct`` or ``cxr``) picks the lung finder and the quality gate. Images that are unreadable,
    refused by the gate or without lungs found by ``mask`` (a name in :data:`MASK_METHODS` or a
    :class:`MaskMethod`) are left out and listed in ``excluded``. Folds (at most ``folds``, at most the
    rarer class's patient count) keep each patient's images together, as does the bootstrap; images
    without a patient id are their own group. ``weights`` as in :func:`~covidscan.models.build_backbone`.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"the shortcut probe needs the modality (--modality), one of "
                          f"{', '.join(MODALITIES)}: it picks the lung finder; got {modality!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ConfigError(f"probe size={size!r} must be an integer number of pixels >= 32")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"probe folds={folds!r} must be an integer >= 2")
    method = _mask_method(mask)
    if method.name == "unet":
        if modality != "cxr":
            raise ConfigError("the unet lung mask is the X-ray lung model: use it with --modality cxr, or "
                              "the contour mask for CT")
        lung_segmenter()  # a missing or damaged lung model fails here, naming the command, before any work
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ManifestError(f"cannot probe: the manifest has no {', '.join(missing)} column")
    labels = df["label"].map({name: i for i, name in enumerate(CLASSES)})
    if labels.isna().any():
        bad = sorted(set(df.loc[labels.isna(), "label"].astype(str)))
        raise ManifestError(f"cannot probe: labels {bad} are not among {list(CLASSES)}")
    pids = df["patient_id"] if "patient_id" in df.columns else pd.Series([None] * len(df), index=df.index)
    pid_list = [None if pd.isna(p) or str(p).strip() == "" else str(p) for p in pids]

    net = build_backbone(backbone, weights, (size, size)).eval()
    paths = df["path"].astype(str).tolist()
    rows, feats, excluded = [], [], []
    for item in _features(paths, modality, method, net, batch_size=batch_size, workers=workers,
                          progress=progress):
        if isinstance(item, dict):
            excluded.append(item)
        else:
            rows.append(item[0])
            feats.append(item[1])
    y = labels.to_numpy(dtype=np.int64)[rows]
    group_ids = [pid_list[r] for r in rows]
    unit = "patient" if any(g is not None for g in group_ids) else "image"
    groups = group_ids if unit == "patient" else None
    codes, _ = group_codes(groups, len(rows))  # an image without a patient id is a group of its own
    per_class = [len(set(codes[y == c])) for c in (0, 1)]
    if min(per_class) < 2:
        raise ManifestError(
            f"cannot probe: {len(rows)} usable images hold {per_class[0]} {CLASSES[0]} and {per_class[1]} "
            f"{CLASSES[1]} {unit}s; cross-validation needs at least 2 of each ({len(excluded)} left out: "
            "unreadable, refused or no lungs found)"
        )
    k = min(folds, *per_class)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    x = np.stack(feats)
    outside, lungs, silhouette = (_score(x[:, v], y, codes, cv, groups, n_boot, seed) for v in range(VIEWS))
    return ProbeResult(
        outside_lungs=outside, lungs_only=lungs, mask_only=silhouette, mask_method=method.name,
        mask_description=method.description, backbone=backbone, weights=str(weights), size=(size, size),
        folds=k, unit=unit, n_images=len(df), n_used=len(rows),
        n_patients=len({g for g in group_ids if g is not None}) or None, n_boot=n_boot, excluded=excluded,
    )


def add_probe(report: dict[str, Any], result: ProbeResult) -> dict[str, Any]:
    """An :func:`~covidscan.data.audit_manifest` report with the probe as its ``probe`` section and the
    probe's warnings after the audit's own."""
    return {**report, "probe": result.to_dict(), "warnings": [*report["warnings"], *result.warnings]}
