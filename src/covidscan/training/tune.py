"""Settings chosen by cross-validation (``covidscan tune``).

Every point of a grid of settings (the cartesian product of ``--grid key=v1,v2`` axes) is scored by
patient-grouped, stratified k-fold cross-validation on the **train and validation rows only**: the test
rows are dropped before any image is read, so the test split is scored once, by the run trained with the
chosen setting (``--train-best``, or ``covidscan train OUT/best.yaml``).

Each fold trains the head exactly as ``covidscan train`` does with a frozen base: on cached features of
``train.views`` augmented copies of each training image (:func:`~covidscan.training.engine.embed`,
:class:`~covidscan.training.engine.CachedFeatures`), keeping the weights of the epoch with the lowest loss
on an inner validation part (one of 5 patient-grouped inner folds of the fold's training patients), and
scores the held-out fold's un-augmented features.

Features are extracted once per *feature key*: everything in the config except the settings that only
shape or train the head (:data:`HEAD_ONLY`), plus the identity of the images, the weights file and the
lung model (path, size, modification time). They are stored as ``<key>.pt`` in a cache folder
(``$COVIDSCAN_CACHE/features`` by default), so a grid over dropout, learning rate, epochs, weight decay or
hidden sizes costs one extraction per backbone, and a later ``tune`` over the same data none. Any backbone
name works: a setting not known to be head-only is treated as changing the features.

The figure of merit is the mean ROC AUC over the folds, with a 95% Student-t interval over the k fold
AUCs (each fold's AUC is computed on its own held-out patients, so no score scales of different models
are mixed); the best setting is the one with the highest mean. Because every setting sees the same folds,
each one's difference to the best is also given as a paired t interval over the folds: where it holds 0,
cross-validation cannot tell the two apart.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.table import Table
from scipy import stats
from scipy.special import expit
from sklearn.metrics import average_precision_score, roc_auc_score

from covidscan import CLASSES
from covidscan.config import ExperimentConfig, dump_config, load_config
from covidscan.data import check_trainable
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation.metrics import aggregate_by_patient
from covidscan.models import build_model
from covidscan.models.classifier import check_combination
from covidscan.models.config import POOLED_HEADS
from covidscan.outputs import check_folder, check_output, replaced_file, write_csv, write_text
from covidscan.preprocess import PreparedSet, eval_transform, prepare_manifest, train_transform
from covidscan.system import cache_dir, resolve_device
from covidscan.training.crossval import head_logits, one_thread, patient_counts, patient_folds, patient_groups
from covidscan.training.engine import CachedFeatures, embed, fit_head
from covidscan.training.run import TrainResult, config_inputs, load_dataset, train_experiment

log = logging.getLogger(__name__)

HEAD_ONLY = (
    "model.hidden",
    "model.dropout",
    "model.standardize",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.weight_decay",
    "train.early_stopping",
    "train.device",
)
"""Settings that shape or train the head but leave the cached features as they are."""
REFUSED = {
    "name": "it names the experiment",
    "description": "it describes the experiment",
    "published": "it holds a paper's figures",
    "data": "it decides the split, and the folds are made from the train and validation rows it gives",
    "evaluation": "it chooses the threshold and calibration after training, which the ROC AUC compared "
    "here does not depend on",
    "model.train_mode": "tune trains heads on cached frozen features (fine-tuning is chosen with train)",
    "train.cache_features": "tune always trains heads on cached features",
}
"""Settings a grid may not vary, and why (their prefixes match sub-settings too)."""
INNER_FOLDS = 5
"""Each fold's training patients are split 4:1 into fit and inner validation (best epoch, as in train)."""
METRICS = ("roc_auc", "patient_roc_auc", "pr_auc")
"""Per-fold figures: image ROC AUC (the one settings are chosen by), patient ROC AUC (mean slice
probability per patient), average precision."""


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid``: the settings it varies together and, per grid value, their values (as typed)."""

    keys: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]

    def assignments(self, value: tuple[str, ...]) -> list[str]:
        """``key=value`` overrides of one of this axis's values."""
        return [f"{k}={v}" for k, v in zip(self.keys, value, strict=True)]


@dataclass
class Setting:
    """One grid point: its ``key=value`` assignments and the validated config they give."""

    assignments: tuple[str, ...]
    config: ExperimentConfig
    folds: list[dict[str, float | None]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """``model.dropout=0.3 train.lr=0.001`` (or ``(preset)`` for an empty grid)."""
        return " ".join(self.assignments) or "(preset)"

    def summary(self, metric: str) -> dict[str, float | None]:
        """Mean, standard deviation and 95% t interval of ``metric`` over the folds where it is defined."""
        return mean_ci([f[metric] for f in self.folds])


@dataclass
class FeatureEntry:
    """One cached feature set: the settings that made it and whether this call extracted or loaded it."""

    key: str
    file: Path
    describe: dict[str, Any]
    extracted: bool
    seconds: float
    n_images: int
    dim: int


@dataclass
class TuneResult:
    """Every setting's fold figures, the features used, and which setting is best."""

    settings: list[Setting]
    features: list[FeatureEntry]
    best: int
    n_folds: int
    n_images: int
    n_patients: int
    has_patients: bool
    excluded: list[dict[str, str]]
    out: Path | None = None

    @property
    def best_setting(self) -> Setting:
        """The setting with the highest mean fold ROC AUC."""
        return self.settings[self.best]

    def paired_difference(self, index: int) -> dict[str, float | None]:
        """The best setting's fold ROC AUC minus this one's, paired by fold: mean and 95% t interval."""
        best, other = self.best_setting.folds, self.settings[index].folds
        return mean_ci(
            [
                None if b["roc_auc"] is None or o["roc_auc"] is None else b["roc_auc"] - o["roc_auc"]
                for b, o in zip(best, other, strict=True)
            ]
        )


def mean_ci(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, sample standard deviation and 95% Student-t interval of the defined ``values``."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if not v.size:
        return {"mean": None, "sd": None, "low": None, "high": None, "n": 0}
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "sd": None, "low": None, "high": None, "n": int(v.size)}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, v.size - 1)) * sd / math.sqrt(v.size)
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "n": int(v.size)}


# ---------------------------------------------------------------- the grid
def _split_values(text: str) -> list[str]:
    """``0.1,0.3`` -> [0.1, 0.3]; commas inside brackets or quotes stay (``[256],[512,128]``)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def parse_grid(specs: Sequence[str]) -> list[GridAxis]:
    """``key=v1,v2`` specs into axes; ``key1,key2=[a1,a2],[b1,b2]`` varies two settings together (a
    backbone and its weights file). A malformed spec, a key given twice or one a grid may not vary is a
    ConfigError naming it."""
    axes: list[GridAxis] = []
    for spec in specs:
        lhs, sep, raw = spec.partition("=")
        keys = tuple(k.strip() for k in lhs.split(","))
        values = [_split_values(raw)] if sep else []
        if len(keys) > 1 and values:  # linked settings: every value is a [v1,v2,...] of len(keys)
            values = [
                _split_values(v[1:-1]) if v.startswith("[") and v.endswith("]") else [v] for v in values[0]
            ]
            if any(len(v) != len(keys) for v in values):
                raise ConfigError(
                    f"--grid {spec}: give each value as [{','.join(keys)}] "
                    f"({len(keys)} values in brackets), e.g. {lhs}=[a,b],[c,d]"
                )
        elif values:
            values = [[v] for v in values[0]]
        if not all(keys) or not values or any("" in v for v in values):
            raise ConfigError(f"--grid {spec!r} must look like key=value1,value2, e.g. model.dropout=0.1,0.3")
        for key in keys:
            refused = next(
                (why for prefix, why in REFUSED.items() if key == prefix or key.startswith(prefix + ".")),
                None,
            )
            if refused:
                raise ConfigError(f"--grid {spec}: {key} cannot be tuned: {refused}")
            if sum(k == key for a in axes for k in a.keys) or keys.count(key) > 1:
                raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid {key}=a,b")
        if len({tuple(v) for v in values}) < len(values):
            raise ConfigError(f"--grid {spec}: a value is listed twice")
        axes.append(GridAxis(keys, tuple(tuple(v) for v in values)))
    return axes


def grid_settings(preset: str | Path, overrides: Sequence[str], axes: Sequence[GridAxis]) -> list[Setting]:
    """Every point of the grid as a validated config; the first bad value or combination is a ConfigError
    naming its ``--grid``."""
    settings = []
    for values in itertools.product(*(a.values for a in axes)):
        assignments = tuple(x for a, v in zip(axes, values, strict=True) for x in a.assignments(v))
        cfg = load_config(preset, overrides, grid=assignments)
        try:
            check_combination(cfg.model)
        except ConfigError as exc:
            raise ConfigError(f"--grid {' '.join(assignments)}: {exc}") from None
        if cfg.model.train_mode != "frozen" or not cfg.train.cache_features:
            raise ConfigError(
                f"{' '.join(assignments) or preset}: tune trains heads on cached frozen features; set "
                "model.train_mode=frozen and train.cache_features=true (fine-tuning is chosen with train)"
            )
        settings.append(Setting(assignments, cfg))
    return settings


# ---------------------------------------------------------------- features, extracted once per key
def _file_identity(path: str | Path) -> list[Any]:
    try:
        info = Path(path).stat()
    except OSError:
        return [str(path), None]
    return [str(path), info.st_size, info.st_mtime_ns]


def _dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat |= _dotted(value, f"{prefix}{name}.")
        else:
            flat[prefix + name] = value
    return flat


def feature_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings that decide the cached features: all but :data:`HEAD_ONLY` and the descriptive ones.

    Heads that take the pooled feature map share its cache: ``model.head`` is ``pooled`` for all of them.
    """
    skip = (*HEAD_ONLY, "name", "description", "published", "evaluation")
    settings = {
        k: v
        for k, v in _dotted(cfg.model_dump(mode="json")).items()
        if not any(k == s or k.startswith(s + ".") for s in skip)
    }
    if settings["model.head"] in POOLED_HEADS:
        settings["model.head"] = "pooled"
    return settings


def feature_key(cfg: ExperimentConfig, paths: Sequence[str]) -> str:
    """A digest of :func:`feature_settings`, the weights and lung model files and every image file."""
    identity = {
        "settings": feature_settings(cfg),
        "inputs": [_file_identity(p) for p in config_inputs(cfg)],
        "images": [_file_identity(p) for p in paths],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class Features:
    """Cached features of the kept images: ``aug`` (N, views, D) augmented, ``clean`` (N, D) not."""

    paths: list[str]
    aug: torch.Tensor
    clean: torch.Tensor


class FeatureStore:
    """Features on disk, one ``<key>.pt`` per feature key; extracts what is missing (counted in
    ``extractions``). The images prepared last are kept in memory, so backbones that share preprocessing
    and input size (the X-ray lung U-Net is slow) prepare them once."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir("features")
        self.extractions = 0
        self._prepared: tuple[str, PreparedSet] | None = None

    def get(
        self, cfg: ExperimentConfig, df: pd.DataFrame, *, strict: bool, progress: bool
    ) -> tuple[Features, FeatureEntry, list[dict[str, str]]]:
        """The features of ``df``'s images under ``cfg``, loaded or extracted (and then stored)."""
        key = feature_key(cfg, df["path"].astype(str).tolist())
        file = self.folder / f"{key}.pt"
        describe = {k: v for k, v in feature_settings(cfg).items() if not k.startswith("data.")}
        start = time.perf_counter()
        stored = self._load(file)
        extracted = stored is None
        if stored is None:
            stored = self._extract(cfg, df, strict=strict, progress=progress)
            feats, excluded = stored
            self.folder.mkdir(parents=True, exist_ok=True)
            with replaced_file(file, "cached features to ") as side:
                torch.save(
                    {"paths": feats.paths, "aug": feats.aug, "clean": feats.clean, "excluded": excluded}, side
                )
            self.extractions += 1
        feats, excluded = stored
        entry = FeatureEntry(
            key,
            file,
            describe,
            extracted,
            time.perf_counter() - start,
            len(feats.paths),
            int(feats.clean.shape[1]),
        )
        return feats, entry, excluded

    @staticmethod
    def _load(file: Path) -> tuple[Features, list[dict[str, str]]] | None:
        if not file.is_file():
            return None
        try:
            data = torch.load(file, weights_only=True)
            return Features(list(data["paths"]), data["aug"], data["clean"]), list(data["excluded"])
        except Exception as exc:  # a truncated or foreign file: extract again and replace it
            log.warning("cached features %s cannot be read (%s); extracting them again", file, exc)
            return None

    def _prepare(
        self, cfg: ExperimentConfig, df: pd.DataFrame, size: tuple[int, int], *, strict: bool, progress: bool
    ) -> PreparedSet:
        key = json.dumps([cfg.preprocess.model_dump(mode="json"), size, df["path"].astype(str).tolist()])
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = None  # free the last set before preparing the next
            self._prepared = key, prepare_manifest(df, cfg.preprocess, size, progress=progress, strict=strict)
        return self._prepared[1]

    def _extract(
        self, cfg: ExperimentConfig, df: pd.DataFrame, *, strict: bool, progress: bool
    ) -> tuple[Features, list[dict[str, str]]]:
        """Prepare and embed every image as ``train`` would: ``views`` augmented copies, and one clean."""
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        device = resolve_device(cfg.train.device)
        model.to(device)
        prepared = self._prepare(cfg, df, model.input_size, strict=strict, progress=progress)
        size, mean, std = model.input_size, model.mean, model.std
        views = cfg.train.views if cfg.train.augment else 1
        bs, seed = cfg.train.batch_size, cfg.train.seed
        aug = embed(
            model,
            prepared.images,
            train_transform(cfg.train.augment, size, mean=mean, std=std),
            views=views,
            seed=seed,
            batch_size=bs,
            device=device,
            progress=progress,
            desc=f"{cfg.model.backbone} features",
        )
        if not cfg.train.augment:  # the one "augmented" view is the plain image: a slow backbone runs once
            return Features(prepared.paths, aug, aug[:, 0]), prepared.excluded
        clean = embed(
            model,
            prepared.images,
            eval_transform(size, mean=mean, std=std),
            batch_size=bs,
            device=device,
            progress=progress,
            desc=f"{cfg.model.backbone} features",
        )[:, 0]
        return Features(prepared.paths, aug, clean), prepared.excluded


# ---------------------------------------------------------------- cross-validation
@dataclass(frozen=True)
class Fold:
    """Row positions: ``fit`` trains the head, ``val`` picks its epoch, ``test`` is scored."""

    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[Fold]:
    """``k`` patient-grouped stratified folds, each with a patient-grouped inner validation part."""
    counts = patient_counts(y, groups)
    if min(counts.values()) < k:
        raise ManifestError(
            f"{k}-fold cross-validation needs at least {k} patients of each class in the train and "
            f"validation rows, found {counts}; use fewer --folds"
        )
    folds = []
    for train, test in patient_folds(y, groups, k, seed):
        inner = patient_folds(y[train], groups[train], INNER_FOLDS, seed)
        if not inner:  # too few patients for an inner split: train on all, keep the last epoch
            folds.append(Fold(train, train[:0], test))
        else:
            fit_part, val_part = inner[0]
            folds.append(Fold(train[fit_part], train[val_part], test))
    return folds


def fold_metrics(y: np.ndarray, z: np.ndarray, groups: np.ndarray | None) -> dict[str, float | None]:
    """Ranking figures of one held-out fold (None where one class is missing)."""
    if y.min() == y.max():
        return dict.fromkeys(METRICS)
    patient = None
    if groups is not None:
        agg = aggregate_by_patient(y, expit(z), groups)
        patient = float(roc_auc_score(agg.y, agg.p)) if agg.y.min() != agg.y.max() else None
    return {
        "roc_auc": float(roc_auc_score(y, z)),
        "patient_roc_auc": patient,
        "pr_auc": float(average_precision_score(y, z)),
    }


def cross_validate(
    setting: Setting, feats: Features, y: np.ndarray, groups: np.ndarray | None, folds: Sequence[Fold]
) -> np.ndarray:
    """Train ``setting``'s head in every fold on cached features; fills ``setting.folds``, returns the
    out-of-fold logits."""
    cfg = setting.config
    device = resolve_device(cfg.train.device)
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)  # the head starts as `train` would start it
    initial = build_model(cfg.model).head_tail
    z = np.full(len(y), np.nan)
    setting.folds = []
    for fold in folds:
        head = copy.deepcopy(initial)
        val = CachedFeatures(feats.clean[fold.val][:, None], y[fold.val]) if len(fold.val) else None
        fit_head(
            head,
            CachedFeatures(feats.aug[fold.fit], y[fold.fit], cfg.train.seed),
            val,
            cfg.train,
            standardize=cfg.model.standardize,
            device=device,
            progress=False,
        )
        z[fold.test] = head_logits(head.cpu(), feats.clean[fold.test])
        setting.folds.append(
            fold_metrics(y[fold.test], z[fold.test], None if groups is None else groups[fold.test])
        )
    setting.seconds = time.perf_counter() - start
    return z


def _train_val_rows(cfg: ExperimentConfig, data: str | Path) -> pd.DataFrame:
    """The manifest's train and validation rows (split as ``train`` splits it); the test rows never leave."""
    df = load_dataset(data, cfg)
    check_trainable(df)
    rows = df[df["split"].isin(["train", "val"])].reset_index(drop=True)
    if rows.empty:
        raise ManifestError(f"{data} has no train or validation rows to cross-validate on")
    return rows


def tune(
    preset: str | Path,
    data: str | Path,
    grid: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    folds: int = 5,
    seed: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    cache: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
) -> TuneResult:
    """Score every grid point by patient-grouped ``folds``-fold cross-validation on train + validation.

    ``seed`` (default: the preset's ``train.seed``) draws the folds, the same for every setting. With
    ``out``, writes ``tune.json``, ``tune.csv``, ``oof.csv`` (out-of-fold logits) and ``best.yaml`` (the
    chosen config, for ``covidscan train``). Bad grid keys or values fail before any image is read.
    """
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    settings = grid_settings(preset, overrides, parse_grid(grid))
    base = settings[0].config
    df = _train_val_rows(base, data)
    if out is not None:
        out = Path(out)
        inputs = [data, preset, *df["path"], *(p for s in settings for p in config_inputs(s.config))]
        check_output(out, [p for p in inputs if Path(p).exists()])
        check_folder(out, overwrite)
    store = FeatureStore(Path(cache) if cache is not None else None)
    fold_seed = base.train.seed if seed is None else seed
    # One set of folds for every setting, made before any image is read; images the quality gate leaves
    # out under some preprocessing only drop out of their fold, so the settings stay paired by fold.
    y = df["label"].map(CLASSES.index).to_numpy(np.int64)
    groups, has_patients = patient_groups(df)
    folds_made = make_folds(y, groups, folds, fold_seed)
    fold_of = np.empty(len(y), np.int64)
    for f, fold in enumerate(folds_made):
        fold_of[fold.test] = f
    position = {p: i for i, p in enumerate(df["path"].astype(str))}

    by_key: dict[str, list[int]] = {}
    for i, s in enumerate(settings):
        by_key.setdefault(feature_key(s.config, list(position)), []).append(i)
    entries: list[FeatureEntry] = []
    oof: list[pd.DataFrame] = []
    excluded: dict[str, dict[str, str]] = {}
    for members in by_key.values():
        feats, entry, dropped = store.get(settings[members[0]].config, df, strict=strict, progress=progress)
        entries.append(entry)
        excluded |= {e["path"]: e for e in dropped}
        kept = np.array([position[p] for p in feats.paths], np.int64)
        remap = np.full(len(df), -1)
        remap[kept] = np.arange(len(kept))
        kept_folds = [
            Fold(*(remap[idx][remap[idx] >= 0] for idx in (f.fit, f.val, f.test))) for f in folds_made
        ]
        with one_thread():
            for i in members:
                z = cross_validate(
                    settings[i], feats, y[kept], groups[kept] if has_patients else None, kept_folds
                )
                log.info("%s: ROC AUC %.3f", settings[i].label, settings[i].summary("roc_auc")["mean"] or 0)
                oof.append(
                    pd.DataFrame(
                        {
                            "setting": i,
                            "path": df["path"].to_numpy()[kept],
                            "patient_id": groups[kept],
                            "label": df["label"].to_numpy()[kept],
                            "fold": fold_of[kept],
                            "logit": z,
                        }
                    )
                )
    means = [s.summary("roc_auc")["mean"] for s in settings]
    best = int(np.argmax([-np.inf if m is None else m for m in means]))
    result = TuneResult(
        settings,
        entries,
        best,
        len(folds_made),
        len(df),
        len(set(groups)),
        has_patients,
        list(excluded.values()),
    )
    if out is not None:
        result.out = write_tune(
            result, out, pd.concat(oof, ignore_index=True), preset, data, grid, overrides, fold_seed
        )
    return result


# ---------------------------------------------------------------- reporting
def _record(result: TuneResult, index: int) -> dict[str, Any]:
    s = result.settings[index]
    record: dict[str, Any] = {
        "setting": index,
        "assignments": list(s.assignments),
        "best": index == result.best,
    }
    for metric in METRICS:
        record[metric] = s.summary(metric)
    record["roc_auc_below_best"] = None if index == result.best else result.paired_difference(index)
    record["folds"] = s.folds
    record["seconds"] = round(s.seconds, 2)
    return record


def write_tune(
    result: TuneResult,
    out: Path,
    oof: pd.DataFrame,
    preset: str | Path,
    data: str | Path,
    grid: Sequence[str],
    overrides: Sequence[str],
    seed: int,
) -> Path:
    """``tune.json`` (everything), ``tune.csv`` (one row per setting), ``oof.csv``, ``best.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    records = [_record(result, i) for i in range(len(result.settings))]
    summary = {
        "preset": str(preset),
        "data": str(data),
        "overrides": list(overrides),
        "grid": list(grid),
        "folds": result.n_folds,
        "fold_seed": seed,
        "inner_validation": f"1 of {INNER_FOLDS} patient-grouped "
        "inner folds of each fold's training patients (best epoch by validation loss, as train)",
        "ci": "95% Student-t interval over the folds' values; roc_auc_below_best: the best setting's fold "
        "ROC AUC minus this one's, paired by fold",
        "n_images": result.n_images,
        "n_patients": result.n_patients,
        "grouped_by_patient": result.has_patients,
        "test_rows": "not read",
        "excluded": result.excluded,
        "features": [
            {
                "key": e.key,
                "file": str(e.file),
                "extracted": e.extracted,
                "seconds": round(e.seconds, 1),
                "images": e.n_images,
                "dim": e.dim,
                "settings": e.describe,
            }
            for e in result.features
        ],
        "best": records[result.best]["assignments"],
        "settings": records,
    }
    write_text(out / "tune.json", json.dumps(summary, indent=2))
    rows = []
    for r in records:
        row: dict[str, Any] = {"setting": r["setting"]}
        row |= dict(a.split("=", 1) for a in r["assignments"])
        for metric in METRICS:
            row |= {f"{metric}_{k}": r[metric][k] for k in ("mean", "low", "high", "sd")}
        below = r["roc_auc_below_best"] or {}
        row |= {
            "below_best": below.get("mean"),
            "below_best_low": below.get("low"),
            "below_best_high": below.get("high"),
            "seconds": r["seconds"],
            "best": r["best"],
        }
        rows.append(row)
    write_csv(pd.DataFrame(rows), out / "tune.csv")
    write_csv(oof, out / "oof.csv")
    dump_config(result.best_setting.config, out / "best.yaml")
    return out


def _ci_text(summary: dict[str, float | None]) -> str:
    if summary["mean"] is None:
        return "n/a"
    if summary["low"] is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ({summary['low']:.3f}–{summary['high']:.3f})"


def format_tune(result: TuneResult) -> Table:
    """The console table: one row per setting, the best marked, 95% CIs over the folds."""
    table = Table(
        title=f"{result.n_folds}-fold cross-validation on {result.n_images} train+validation images "
        f"({result.n_patients} {'patients' if result.has_patients else 'images, no patient ids'})"
        "; mean over folds (95% t interval)"
    )
    keys = [a.split("=", 1)[0] for a in result.settings[0].assignments]
    for key in ["#", *keys]:
        table.add_column(key, overflow="fold")
    for name in ("ROC AUC", "patient ROC AUC", "PR AUC", "below best (paired)", "s"):
        table.add_column(name, justify="right", overflow="fold")
    table.add_column("")
    for i, s in enumerate(result.settings):
        below = "—" if i == result.best else _ci_text(result.paired_difference(i))
        table.add_row(
            str(i),
            *(a.split("=", 1)[1] for a in s.assignments),
            *(_ci_text(s.summary(m)) for m in METRICS),
            below,
            f"{s.seconds:.0f}",
            "best" if i == result.best else "",
            style="bold" if i == result.best else None,
        )
    return table


def train_best(
    result: TuneResult,
    data: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the chosen setting the normal way (``covidscan train``): its test split is scored here, once."""
    return train_experiment(
        result.best_setting.config, data, out, overwrite=overwrite, strict=strict, progress=progress
    )
