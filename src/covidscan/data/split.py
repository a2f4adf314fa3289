"""Train/val/test splits: patient-level (honest) by default, image-level (the papers' protocol) on request."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from covidscan.data.checks import PATIENT_OPTIONS, label_problems
from covidscan.data.labels import normalize_splits
from covidscan.errors import ConfigError, ManifestError

BY_IMAGE = "split by image knowing it can leak (`data split --by image`; train: `--set data.split_by=image`)"
MAX_FOLDS = 20
"""Splits are unions of stratified folds, so ratios are met to within about 1/MAX_FOLDS."""


def _split_names(ratios: Sequence[float]) -> tuple[str, ...]:
    """Check the ratios (2 = train/test, 3 = train/val/test, positive, summing to 1) and name the parts."""
    try:
        values = [float(r) for r in ratios]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"split ratios {ratios!r} must be numbers, e.g. 0.7,0.15,0.15") from exc
    if len(values) not in (2, 3):
        raise ConfigError(
            f"split ratios {ratios!r}: give 2 (train,test) or 3 (train,val,test) numbers, e.g. 0.7,0.15,0.15"
        )
    if not all(math.isfinite(r) and 0 < r < 1 for r in values) or abs(sum(values) - 1) > 1e-6:
        raise ConfigError(f"split ratios {ratios!r} must each lie between 0 and 1 and sum to 1")
    return ("train", "test") if len(values) == 2 else ("train", "val", "test")


def _fold_plan(ratios: Sequence[float], max_folds: int) -> list[int]:
    """How many of k equal folds each part gets: the smallest k that fits exactly, else the closest at max."""
    for k in range(len(ratios), max_folds + 1):
        if all(abs(r * k - round(r * k)) < 1e-6 and round(r * k) >= 1 for r in ratios):
            return [round(r * k) for r in ratios]
    counts = [1] * len(ratios)
    for _ in range(max_folds - len(ratios)):
        i = max(range(len(ratios)), key=lambda j: ratios[j] * max_folds - counts[j])
        counts[i] += 1
    return counts


def _assign(
    labels: pd.Series, groups: pd.Series | None, ratios: Sequence[float], names: Sequence[str], seed: int
) -> np.ndarray:
    """Split names for these rows: stratified folds (grouped when ``groups`` is given) unioned per part."""
    n_units = len(labels) if groups is None else groups.nunique()
    what = "images" if groups is None else "patients"
    # A fold needs at least one unit, and sklearn needs some class with at least k members. No more folds
    # than the rarer class has units, so that every part of a small set gets both classes where it can.
    per_class = labels.groupby(labels).size() if groups is None else groups.groupby(labels).nunique()
    k = min(sum(_fold_plan(ratios, MAX_FOLDS)), n_units, int(labels.value_counts().max()))
    k = min(k, max(len(names), int(per_class.min())))
    if k < len(names):
        raise ManifestError(
            f"only {n_units} {what} to split into {'/'.join(names)}: add data or use fewer parts "
            "(`data split --ratios 0.8,0.2`; train: `--set data.ratios=[0.8,0.2]`)"
        )
    plan = _fold_plan(ratios, k)
    splitter = (
        StratifiedKFold(sum(plan), shuffle=True, random_state=seed)
        if groups is None
        else StratifiedGroupKFold(sum(plan), shuffle=True, random_state=seed)
    )
    y = labels.astype(str).to_numpy()
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": expected for small sets, handled above
        warnings.simplefilter("ignore", UserWarning)
        folds = [test for _, test in splitter.split(np.zeros(len(y)), y, None if groups is None else groups)]
    out = np.empty(len(y), dtype=object)
    part_of_fold = [name for name, n in zip(names, plan, strict=True) for _ in range(n)]
    for fold, name in zip(folds, part_of_fold, strict=True):
        out[fold] = name
    return out


def split_manifest(
    df: pd.DataFrame,
    *,
    by: str = "patient",
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    keep_existing: bool = True,
) -> pd.DataFrame:
    """Return a copy of the manifest with a ``split`` column (train/val/test), stratified by label.

    ``by="patient"`` keeps each patient in one split; ``by="image"`` is the papers' random image split and
    warns when patient ids exist (``attrs["leakage_warning"]`` holds the text, else ``None``). With
    ``keep_existing`` rows that already have a split keep it, and unassigned images of a patient already
    placed follow that patient. Deterministic for a given seed. A one-class manifest or patients carrying
    both labels are warned about and listed in ``attrs["label_problems"]`` (``check_trainable`` refuses
    them).
    """
    names = _split_names(ratios)
    if by not in ("patient", "image"):
        raise ConfigError(f"split by {by!r}: use 'patient' (honest) or 'image' (the papers' protocol)")
    if "label" not in df.columns:
        raise ManifestError("cannot split: the manifest has no `label` column")
    out = df.copy()
    split = (
        normalize_splits(out["split"], where="manifest").to_numpy()
        if keep_existing and "split" in out.columns
        else np.full(len(out), None, dtype=object)
    )
    patients = _patient_ids(out)
    todo = pd.isna(split)
    warning = None
    if by == "patient" and todo.any():
        _require_patients(patients)
        placed = pd.Series(split[~todo], index=patients[~todo].to_numpy())
        placed = placed[~placed.index.duplicated()]
        follow = todo & patients.isin(placed.index).to_numpy()
        split[follow] = patients[follow].map(placed).to_numpy()
        todo = pd.isna(split)
    elif by == "image" and patients.notna().any():
        warning = (
            f"image-level split of {len(out)} images from {patients.nunique()} patients: images of one "
            "patient can land in both train and test, which inflates test scores. Split by patient for an "
            "honest estimate (`data split --by patient`; train: `--set data.split_by=patient`)."
        )
        warnings.warn(warning, UserWarning, stacklevel=2)
    if todo.any():
        groups = patients[todo] if by == "patient" else None
        split[todo] = _assign(out.loc[todo, "label"], groups, ratios, names, seed)
    out["split"] = split
    problems = label_problems(out)
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    out.attrs.update(split_by=by, split_seed=seed, split_ratios=list(ratios), leakage_warning=warning,
                     label_problems=problems)
    return out


def _patient_ids(df: pd.DataFrame) -> pd.Series:
    """Patient ids as strings (``None`` where empty), or all ``None`` when there is no column."""
    if "patient_id" not in df.columns:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    ids = df["patient_id"].astype(object)
    return ids.where(ids.notna() & (ids.astype(str).str.strip() != ""), None).map(
        lambda v: v if v is None else str(v)
    )


def _require_patients(patients: pd.Series) -> None:
    missing = int(patients.isna().sum())
    if missing == len(patients):
        raise ManifestError(
            f"cannot split by patient: the manifest has no patient ids. Give each image its patient with "
            f"{PATIENT_OPTIONS}, or {BY_IMAGE}."
        )
    if missing:
        raise ManifestError(
            f"cannot split by patient: {missing} of {len(patients)} rows have no patient_id. Fill them in "
            f"(one id per patient: {PATIENT_OPTIONS}), or {BY_IMAGE}."
        )
