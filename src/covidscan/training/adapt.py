"""Adapt a trained run to a new site from that site's labelled cases (``covidscan adapt``).

The backbone stays frozen; what changes is either the calibration (``recalibrate``: temperature and
thresholds refitted on the local cases) or the head (``head``: a fresh head trained on the local images'
cached features, optionally mixed with the parent's own training features). ``auto`` compares, by
patient-grouped cross-validation on the local data, the parent as it is, ``recalibrate``, ``head`` and
``head+original`` and keeps the best, so the site sees out of fold what each would have given it.

The local data are a manifest (``path,label,patient_id``), the format the review service exports its
signed verdicts in: predict -> doctors sign -> adapt -> serve the adapted run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logit
from torch import nn

from covidscan import CLASSES
from covidscan.config import ExperimentConfig
from covidscan.data import check_trainable, read_manifest
from covidscan.data.fingerprints import Fingerprints, describe_overlap
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import (
    Calibration,
    evaluate_predictions,
    excluded_notes,
    format_value_ci,
    write_evaluation,
    write_model_card,
)
from covidscan.evaluation.shift import shift_features
from covidscan.inference import Predictor
from covidscan.models import PIXELS, OODDetector
from covidscan.outputs import read_csv, run_inputs, staged_folder, write_csv
from covidscan.preprocess import PreparedSet, eval_transform, prepare_manifest
from covidscan.runs import (
    LoadedRun,
    ParentRun,
    file_sha256,
    load_ood,
    load_run,
    run_split,
    save_run,
    seen_fingerprints,
)
from covidscan.training.crossval import (
    head_logits as _head_logits,
    one_thread as _one_thread,
    patient_counts as _patient_counts,
    patient_folds as _folds,
    patient_groups as _groups,
)
from covidscan.training.engine import CachedFeatures, embed, fit_head
from covidscan.training.run import measure_bf16, prepare_run_dir

Mode = Literal["auto", "recalibrate", "head"]
CANDIDATES = ("parent", "recalibrate", "head", "head+original")
"""Every mode ``auto`` can compare, simplest first (ties go to the simpler)."""
MIN_PATIENTS_PER_CLASS = 2
"""Cross-validation needs a patient of each class on both sides of every split."""
AUC_TIE = 0.01
"""Out-of-fold ROC AUCs this close count as equal; balanced accuracy, then simplicity, decide."""
MIN_HEAD_STEPS = 100
"""Adam steps a fresh head gets at least: the parent's epoch count assumes hundreds of images, and on a
local set of 50 it would stop the head after a couple of dozen steps, far from converged."""


@dataclass
class AdaptResult:
    """The adapted run, the mode kept, and the out-of-fold metrics.json dict of every mode compared."""

    run_dir: Path
    mode: str
    compared: dict[str, dict[str, Any]]

    @property
    def metrics(self) -> dict[str, Any]:
        """Out-of-fold metrics of the mode kept."""
        return self.compared[self.mode]


@dataclass
class _Local:
    """The local cases as the frozen backbone sees them."""

    prepared: PreparedSet
    features: torch.Tensor  # (N, D): the head's input, eval transform
    groups: np.ndarray  # patient ids, or one group per image when the manifest has none
    has_patients: bool

    @property
    def labels(self) -> np.ndarray:
        """0/1 labels (1 = covid)."""
        return self.prepared.labels


# A fitted mode: the binary logits of every local image and the calibration to serve them with.
Fitted = tuple[np.ndarray, Calibration, nn.Module | None]
Fitter = Callable[[np.ndarray], Fitted]


def _check_patients(df: pd.DataFrame, data: Path) -> None:
    """Refuse local cases with too few patients of a class to cross-validate."""
    y = df["label"].map(CLASSES.index).to_numpy(dtype=np.int64)
    groups, has_patients = _groups(df)
    counts = _patient_counts(y, groups)
    if min(counts.values()) < MIN_PATIENTS_PER_CLASS:
        unit = "patients" if has_patients else "images (no patient ids)"
        raise ManifestError(
            f"{data} has {counts} {unit}: adapting needs at least {MIN_PATIENTS_PER_CLASS} patients of each "
            "class to cross-validate, and a few dozen to gain anything; collect more signed cases first"
        )


def _read_local(data: Path, parent: LoadedRun) -> pd.DataFrame:
    """The local manifest: known labels, one label per patient, enough patients of each class."""
    df = read_manifest(data, patient_column=parent.config.data.patient_column)  # refuses unknown labels
    check_trainable(df.drop(columns="split", errors="ignore"))  # any split column is not used here
    _check_patients(df, data)
    return df


def _prepare_local(df: pd.DataFrame, data: Path, parent: LoadedRun, strict: bool, progress: bool) -> _Local:
    """Prepare the local cases as the parent was trained (the quality gate may leave some out), and embed
    them with its frozen backbone."""
    checkpoint = parent.checkpoint
    prepared = prepare_manifest(df, checkpoint.preprocess, checkpoint.input_size, progress=progress,
                                strict=strict, fingerprint=True)
    kept = df.iloc[prepared.rows].reset_index(drop=True)
    if prepared.excluded:
        _check_patients(kept, data)
    groups, has_patients = _groups(kept)
    return _Local(prepared, _embed(parent, prepared, progress, "local features"), groups, has_patients)


def _embed(parent: LoadedRun, prepared: PreparedSet, progress: bool, desc: str) -> torch.Tensor:
    model = parent.model
    transform = eval_transform(model.input_size, mean=model.mean, std=model.std)
    return embed(model, prepared.images, transform, batch_size=parent.config.train.batch_size,
                 progress=progress, desc=desc)[:, 0]


def parent_features(parent: LoadedRun, *image_sets: np.ndarray) -> list[np.ndarray]:
    """Pooled backbone features of each set of prepared images, scored by the parent as ``covidscan
    predict`` serves it (fp32: the same numbers on every CPU), with one Predictor for all the sets."""
    scorer = Predictor.from_model(parent.model, parent.checkpoint, run_dir=parent.path, engine="torch",
                                  precision="fp32", batch_size=parent.config.train.batch_size)
    found = []
    for images in image_sets:
        features = scorer.logits_and_features(images)[1]
        assert features is not None  # the torch engine always gives features
        found.append(features)
    return found


def _original_features(parent: LoadedRun, progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Features and labels of the parent's own training images (its splits.csv), eval transform."""
    prepared = run_split(parent, "train", progress=progress)
    return _embed(parent, prepared, progress, "original features"), prepared.labels


@dataclass
class OutOfFold:
    """Out-of-fold binary logits with the temperature and image threshold of the fold that scored each."""

    z: np.ndarray
    temperature: np.ndarray
    threshold: np.ndarray

    @property
    def p_labels(self) -> np.ndarray:
        """Calibrated probabilities re-centred on their fold's threshold: one cut at 0.5 gives every fold's
        labels (a shift of the logit, written out so that p near 0 or 1 stays finite)."""
        return expit(self.z / self.temperature - logit(self.threshold))

    def metrics(self, y: np.ndarray, groups: np.ndarray | None, n_boot: int, seed: int,
                aggregate: str) -> dict[str, Any]:
        """metrics.json of the pooled folds, each figure from the scores it is about.

        Labels (accuracy, sensitivity, ...) are each fold's own, at its threshold; ROC and PR AUC rank the
        logits, so that modes sharing the parent's logits (parent, recalibrate) rank identically instead of
        differing by how each fold happened to shift them; ECE and Brier are of the calibrated
        probabilities each fold would have served.
        """
        def run(p: np.ndarray) -> dict[str, Any]:
            return evaluate_predictions(y, p, threshold=0.5, groups=groups, n_boot=n_boot, seed=seed,
                                        aggregate=aggregate)

        result = run(self.p_labels)
        swaps = {("roc_auc", "pr_auc"): run(expit(self.z)),
                 ("ece", "brier"): run(expit(self.z / self.temperature))}
        for names, other in swaps.items():
            for block, source in ((result, other), (result["patient_level"], other["patient_level"])):
                if block is not None:
                    block["metrics"] |= {name: source["metrics"][name] for name in names}
        return result


class _Adapter:
    """Fits each mode on a subset of the local cases (given by index), the same way in CV and at the end."""

    def __init__(self, parent: LoadedRun, local: _Local, original: tuple[torch.Tensor, np.ndarray] | None,
                 folds: int, seed: int) -> None:
        self.parent, self.local, self.original = parent, local, original
        self.folds, self.seed = folds, seed
        self.z_parent = _head_logits(parent.model.head_tail, local.features)

    def fitter(self, mode: str) -> Fitter:
        """The function fitting ``mode`` on the local cases at the given indices."""
        return {
            "parent": lambda idx: (self.z_parent, self.parent.calibration, None),
            "recalibrate": lambda idx: (self.z_parent, self.calibrate(self.z_parent[idx], idx), None),
            "head": lambda idx: self.fit_head(idx, mix=False),
            "head+original": lambda idx: self.fit_head(idx, mix=True),
        }[mode]

    def calibrate(self, z: np.ndarray, idx: np.ndarray) -> Calibration:
        """A calibration fitted on logits ``z`` of the local cases ``idx``, with the parent's settings."""
        ev = self.parent.config.evaluation
        return Calibration.fit(
            z, self.local.labels[idx], groups=self.local.groups[idx] if self.local.has_patients else None,
            calibrate=ev.calibrate, method=ev.threshold, fixed_threshold=ev.fixed_threshold,
            aggregate=ev.aggregate, band=ev.band,
        )

    def train_head(self, idx: np.ndarray, mix: bool) -> nn.Module:
        """A fresh head (the parent's architecture) trained on the local cases ``idx``."""
        head = copy.deepcopy(self.parent.model.head_tail)
        torch.manual_seed(self.seed)
        for layer in head.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        x, y = self.local.features[idx], self.local.labels[idx]
        if mix:
            assert self.original is not None, "head+original is only fitted when the original features exist"
            # Repeat the local cases until they weigh as much as the original set: otherwise a few dozen
            # local images next to hundreds of original ones would barely move the head.
            repeat = max(1, round(len(self.original[1]) / len(idx)))
            x = torch.cat([self.original[0], x.repeat(repeat, 1)])
            y = np.concatenate([self.original[1], np.tile(y, repeat)])
        train = self.parent.config.train
        epochs = max(train.epochs, math.ceil(MIN_HEAD_STEPS / math.ceil(len(y) / train.batch_size)))
        schedule = train.model_copy(update={"epochs": epochs, "early_stopping": None})
        fit_head(head, CachedFeatures(x[:, None], y, self.seed), None, schedule,
                 standardize=self.standardize, progress=False)
        return head

    @property
    def standardize(self) -> bool | np.ndarray:
        """Whether the new head learns on standardised features: as the parent's did, member by member for
        an ensemble (a mask over the members' features side by side)."""
        ensemble = self.parent.config.ensemble
        if ensemble is None:
            return self.parent.config.model.standardize
        sizes = self.parent.model.head_tail.sizes
        return np.repeat([m.model.standardize for m in ensemble.members], sizes)

    def fit_head(self, idx: np.ndarray, mix: bool) -> Fitted:
        """A new head on ``idx``, calibrated on out-of-fold logits of heads trained within ``idx``.

        Its own training logits would give an overconfident temperature and a threshold tuned to images
        it memorised; inner cross-validation gives logits of unseen cases instead.
        """
        head = self.train_head(idx, mix)
        z = _head_logits(head, self.local.features)
        inner = _folds(self.local.labels[idx], self.local.groups[idx], self.folds, self.seed)
        if not inner:
            ev = self.parent.config.evaluation
            fixed = Calibration(threshold=ev.fixed_threshold, band=ev.band, aggregate=ev.aggregate, notes=(
                f"too few patients to calibrate the new head: threshold fixed at {ev.fixed_threshold}",))
            return z, fixed, head
        z_inner = np.empty(len(idx))
        for fit_part, held_out in inner:
            z_inner[held_out] = _head_logits(self.train_head(idx[fit_part], mix),
                                             self.local.features[idx[held_out]])
        return z, self.calibrate(z_inner, idx), head

    def out_of_fold(self, mode: str, splits: list[tuple[np.ndarray, np.ndarray]]) -> OutOfFold:
        """Every local image scored by ``mode`` fitted (and calibrated) without its patient."""
        fitter = self.fitter(mode)
        n = len(self.local.labels)
        z, temperature, cut = np.empty(n), np.empty(n), np.empty(n)
        for train, test in splits:
            z_all, calibration, _ = fitter(train)
            z[test], temperature[test] = z_all[test], calibration.temperature
            cut[test] = np.clip(calibration.threshold, 1e-6, 1 - 1e-6)
        return OutOfFold(z, temperature, cut)


def choose_mode(compared: dict[str, dict[str, Any]]) -> str:
    """Best out-of-fold ROC AUC; within ``AUC_TIE`` the best balanced accuracy, then the simpler mode."""
    def value(mode: str, name: str) -> float:
        found = compared[mode]["metrics"][name]["value"]
        return -math.inf if found is None else found

    best = max(value(mode, "roc_auc") for mode in compared)
    tied = [mode for mode in compared if value(mode, "roc_auc") >= best - AUC_TIE]
    balanced = {mode: (value(mode, "recall") + value(mode, "specificity")) / 2 for mode in tied}
    top = max(balanced.values())
    return next(mode for mode in tied if balanced[mode] >= top - 1e-9)  # `compared` is simplest first


def _summary(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The figures of one mode kept in the checkpoint's lineage."""
    m = metrics["metrics"]
    row: dict[str, float | None] = {}
    for name in ("roc_auc", "accuracy", "recall", "specificity", "brier"):
        row[name] = m[name]["value"]
        row[f"{name}_low"], row[f"{name}_high"] = m[name]["ci95"]
    return row


def _modes(mode: str, mix_original: bool, original_ok: bool) -> list[str]:
    if mode == "recalibrate":
        return ["recalibrate"]
    if mode == "head":
        return ["head+original" if mix_original else "head"]
    return [m for m in CANDIDATES if m != "head+original" or original_ok]


def format_comparison(compared: dict[str, dict[str, Any]], chosen: str) -> str:
    """Markdown table of every mode's out-of-fold metrics (95% CIs), the kept one marked."""
    names = ("roc_auc", "accuracy", "recall", "specificity")
    lines = ["| mode | ROC AUC | accuracy | sensitivity | specificity |", "|---|---|---|---|---|"]
    for mode, metrics in compared.items():
        mark = f"**{mode}** (kept)" if mode == chosen else mode
        cells = [format_value_ci(metrics["metrics"][name]) for name in names]
        lines.append(f"| {mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extended_ood(
    parent: LoadedRun, local: PreparedSet, local_feats: np.ndarray
) -> tuple[OODDetector, int, int] | None:
    """The parent's OOD detector with the local cases (their pooled ``local_feats``) added as training data
    (the backbone is unchanged, so the parent's features still apply); None when the parent has none."""
    detector, info = load_ood(parent.path, parent.checkpoint), parent.checkpoint.ood
    if detector is None or info is None:
        return None
    assert local.stats is not None
    return detector.extended(local_feats, local.stats), info.n_train + len(local), info.n_val


def adapt_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    mode: Mode = "auto",
    mix_original: bool = False,
    folds: int = 5,
    seed: int = 0,
    overwrite: bool = False,
    allow_overlap: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> AdaptResult:
    """Adapt the run in ``run_dir`` to the labelled cases in ``data``; write the adapted run to ``out``.

    ``mode``: ``recalibrate`` (new temperature and thresholds), ``head`` (a new head on the frozen
    backbone's features; with ``mix_original`` trained on the local and the parent's training images) or
    ``auto`` (patient-grouped ``folds``-fold cross-validation picks among the parent as is, recalibrate,
    head and, when the parent's training images are readable, head+original). Every mode compared is
    reported out of fold with patient-bootstrap CIs (metrics.json, report.md); the chosen one is then
    fitted on all local cases. The new run records its parent and the local data (``checkpoint.parent``),
    and stores the fingerprints of the local cases and of the parent's own images, so that ``evaluate``
    refuses both. Local cases that are the parent's training or validation images (same path, pixels or
    near-identical pixels) are refused, unless ``allow_overlap`` (then the report says so). Images the
    quality gate refuses are left out and listed in ``excluded.csv`` (``strict``: an error). ``out`` may not
    be or hold the parent run, its images or the local cases; the adapted run is written beside it and
    replaces it (``overwrite``) only when complete.
    """
    if mode not in ("auto", "recalibrate", "head"):
        raise ConfigError(f"mode must be auto, recalibrate or head, got {mode!r}")
    if folds < 2:
        raise ConfigError(f"folds must be at least 2, got {folds}")
    if mix_original and mode == "recalibrate":
        raise ConfigError("--mix-original trains a head; it does not go with mode recalibrate")
    out, data = Path(out), Path(data)
    if data.is_dir():
        raise ConfigError(f"--data {data} is a folder; give the manifest CSV (path,label,patient_id), whose "
                          "checksum the adapted run records (`covidscan data scan` writes one)")
    parent = load_run(run_dir)
    df = _read_local(data, parent)
    local = _prepare_local(df, data, parent, strict, progress)
    parent_seen = seen_fingerprints(parent.path, parent.checkpoint)
    notes = excluded_notes(local.prepared.excluded) + _check_overlap(
        parent_seen.matches(local.prepared), data, len(local.labels), allow_overlap)
    prepare_run_dir(out, overwrite, [*run_inputs(parent.path), data, *df["path"]])

    original = None
    if mix_original or mode == "auto":
        try:
            original = _original_features(parent, progress)
        except ManifestError as exc:
            if mix_original:
                raise ManifestError(f"--mix-original needs the parent's training images: {exc}") from None
            notes.append(f"head+original not compared: the parent's training images are not readable ({exc})")
    adapter = _Adapter(parent, local, original, folds, seed)
    splits = _folds(local.labels, local.groups, folds, seed)
    ev = parent.config.evaluation
    groups = local.groups if local.has_patients else None
    compared = {}
    p_oof = {}
    with _one_thread():
        for candidate in _modes(mode, mix_original, original is not None):
            scored = adapter.out_of_fold(candidate, splits)
            p_oof[candidate] = scored.p_labels
            compared[candidate] = scored.metrics(local.labels, groups, ev.n_bootstrap, seed, ev.aggregate)
        chosen = choose_mode(compared) if mode == "auto" else next(iter(compared))
        _, calibration, head = adapter.fitter(chosen)(np.arange(len(local.labels)))

    model = parent.model
    if head is not None:
        model = copy.deepcopy(model)
        model.head_tail.load_state_dict(head.state_dict())
    cfg: ExperimentConfig = parent.config.model_copy(update={"name": f"{parent.config.name}-adapted"})
    lineage = ParentRun(
        path=str(parent.path.resolve()), weights_sha256=parent.checkpoint.weights_sha256,
        data=str(data.resolve()), data_sha256=file_sha256(data), n_images=len(local.labels),
        n_patients=len(set(local.groups)) if local.has_patients else None, mode=chosen,
        cross_validation={m: _summary(metrics) for m, metrics in compared.items()},
    )
    verdict = measure_bf16(model, local.prepared, calibration, cfg.train.batch_size)
    notes += _notes(local, len(splits), chosen, mode, compared, calibration)
    report_metrics = compared[chosen] | {"adaptation": {"mode": chosen, "compared": compared},
                                         "excluded": len(local.prepared.excluded)}
    # The backbone is the parent's, so one pass gives the local cases' features for both files below.
    [local_feats] = parent_features(parent, local.prepared.images)
    assert local.prepared.stats is not None
    # The adapted run's figures are measured on the local cases: they are what "validated here" means.
    reference = shift_features(local_feats, local.prepared.stats), "adapted: the local cases"
    with staged_folder(out) as stage:
        save_run(stage, cfg, model, calibration, bf16=verdict, parent=lineage,
                 ood=_extended_ood(parent, local.prepared, local_feats),
                 fingerprints=parent_seen + Fingerprints.of(local.prepared, "train"),
                 shift_reference=reference if parent.model.backbone.name != PIXELS else None)
        _write_splits(parent, local, stage)
        if local.prepared.excluded:
            write_csv(pd.DataFrame(local.prepared.excluded), stage / "excluded.csv")
        report = write_evaluation(stage, report_metrics, local.prepared, p_oof[chosen],
                                  title=f"{cfg.name}: {chosen}, out of fold on {data}",
                                  config=cfg.model_dump(mode="json"), notes=notes)
        comparison = f"\n## Modes compared (out of fold, 95% CIs)\n\n{format_comparison(compared, chosen)}\n"
        report.write_text(report.read_text(encoding="utf-8") + comparison, encoding="utf-8")
        write_model_card(stage)
    return AdaptResult(out, chosen, compared)


def _check_overlap(overlap: list[dict[str, Any]], data: Path, n: int, allow_overlap: bool) -> list[str]:
    """Refuse local cases the parent was trained or validated on (``allow_overlap``: a report warning)."""
    if not overlap:
        return []
    if not allow_overlap:
        raise ManifestError(
            f"{data} shares {len(overlap)} of {n} local cases with the parent run's own training/validation "
            f"data ({describe_overlap(overlap)}). Images the parent has seen make every out-of-fold figure "
            "look better than it will be at your site: adapt on cases it never saw, or pass --allow-overlap "
            "if you mean it"
        )
    return [f"WARNING: {len(overlap)} of {n} local cases were in the parent run's own training or validation "
            "data (adapted anyway, --allow-overlap): the out-of-fold figures below are inflated."]


def _write_splits(parent: LoadedRun, local: _Local, out: Path) -> None:
    """The parent's splits plus the local cases as training rows: `evaluate` then refuses both as seen."""
    rows = pd.DataFrame({"path": local.prepared.paths, "label": [CLASSES[i] for i in local.labels],
                         "patient_id": local.prepared.patient_ids, "split": "train"})
    previous = parent.path / "splits.csv"
    if previous.is_file():
        rows = pd.concat([read_csv(previous, dtype=str, keep_default_na=False), rows], ignore_index=True)
    write_csv(rows, out / "splits.csv")


def _notes(local: _Local, n_folds: int, chosen: str, mode: str, compared: dict[str, dict[str, Any]],
           calibration: Calibration) -> list[str]:
    counts = {name: int((local.labels == i).sum()) for i, name in enumerate(CLASSES)}
    unit = "patient" if local.has_patients else "image"
    notes = [
        f"Local cases: {len(local.labels)} images {counts}; {n_folds}-fold cross-validation grouped by "
        f"{unit}. "
        "Every figure above is out of fold: each image was scored by a model (and calibration) fitted "
        "without its patient. Labels are each fold's own, at its threshold (so the threshold shown is 0.5 "
        "on probabilities re-centred on it, as in the figures); ROC and PR AUC rank the logits; ECE and "
        "Brier are of each fold's calibrated probabilities. The modes compared are tabled at the end.",
        f"Kept: {chosen}" + (" (best out-of-fold ROC AUC; within "
                             f"{AUC_TIE} the better balanced accuracy, then the simpler mode)."
                             if mode == "auto" else " (asked for)."),
    ]
    if not local.has_patients:
        notes.append("WARNING: the local manifest has no patient ids, so folds split images: slices of one "
                     "patient can sit on both sides, which makes these figures optimistic.")
    notes += [f"Calibration: {note}." for note in calibration.notes]
    return notes


__all__ = ["AUC_TIE", "CANDIDATES", "AdaptResult", "adapt_run", "choose_mode", "format_comparison"]
