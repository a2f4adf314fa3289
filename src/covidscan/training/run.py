"""Train an experiment end to end: split, prepare, train, calibrate on validation, test, write the run."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from covidscan.config import ExperimentConfig
from covidscan.data import audit_manifest, check_trainable, read_manifest, split_manifest
from covidscan.data.fingerprints import Fingerprints
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import (
    Calibration,
    evaluate_calibrated,
    excluded_notes,
    write_evaluation,
    write_model_card,
)
from covidscan.evaluation.metrics import point_metrics
from covidscan.evaluation.shift import shift_features
from covidscan.inference import Predictor
from covidscan.models import (
    PIXELS,
    Classifier,
    OODDetector,
    PrecisionVerdict,
    bf16_supported,
    bf16_verdict,
    build_model,
)
from covidscan.outputs import check_folder, check_output, staged_folder, write_csv
from covidscan.preprocess import (
    PreparedSet,
    eval_transform,
    prepare_manifest,
    to_model_batch,
    train_transform,
)
from covidscan.preprocess.lungseg import lung_model_path
from covidscan.runs import draft_checkpoint, save_run
from covidscan.system import resolve_device
from covidscan.training.checkpointing import TrainingState, data_fingerprint, state_path
from covidscan.training.distributed import check_nproc
from covidscan.training.engine import (
    AugmentedImages,
    CachedFeatures,
    EmbedSet,
    FitResult,
    embed_sets,
    fit,
    fit_head,
)
from covidscan.training.ood import fit_ood, ood_share

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the run was written and its headline numbers."""

    run_dir: Path
    metrics: dict[str, Any]
    fit: FitResult
    calibration: Calibration


def load_dataset(data: str | Path, cfg: ExperimentConfig) -> pd.DataFrame:
    """Read a manifest or class-folder tree and make sure every row has a split (train/val/test)."""
    df = read_manifest(data, patient_column=cfg.data.patient_column, split_column=cfg.data.split_column)
    if cfg.data.resplit or "split" not in df or df["split"].isna().any():
        df = split_manifest(
            df,
            by=cfg.data.split_by,
            ratios=cfg.data.ratios,
            seed=cfg.data.seed,
            keep_existing=not cfg.data.resplit,
        )
    return df


def _transforms(cfg: ExperimentConfig, model: Classifier):
    size = model.input_size
    evaluate = eval_transform(size, mean=model.mean, std=model.std)
    train = train_transform(cfg.train.augment, size, mean=model.mean, std=model.std)
    return train, evaluate


def prepare_run_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``out`` that is or holds one of the ``inputs``, and a non-empty one unless ``overwrite``.

    Nothing is deleted here: the run is written beside ``out`` and swapped in when complete
    (:func:`covidscan.outputs.staged_folder`).
    """
    check_output(out, inputs)
    check_folder(out, overwrite)


def config_inputs(cfg: ExperimentConfig) -> list[Path]:
    """Files a config reads besides the data (pretrained weights, the X-ray lung model), where they exist."""
    return [Path(cfg.model.weights).expanduser(), lung_model_path(cfg.preprocess.lung_model)]


def train_experiment(
    cfg: ExperimentConfig,
    data: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    inputs: Iterable[str | Path] = (),
    resume: bool = False,
    nproc: int = 1,
) -> TrainResult:
    """Split, preprocess, train, calibrate on validation, evaluate on test; write the run directory.

    Everything that can fail early (the data, the split, the weights) is checked before ``out`` is created.
    ``out`` may not be or hold the data, the images, the weights or any of ``inputs`` (e.g. the config
    file); the run is written beside it and only then replaces it (``overwrite``), so a failed run leaves
    no half-written folder and an earlier run intact. Images the quality gate refuses (or that cannot be
    read) are left out and listed in ``excluded.csv`` and the report; ``strict`` makes any of them an error
    instead.

    The training state is saved in ``out/.training`` after every epoch (removed when the run is complete):
    ``resume`` continues an interrupted run of the same data and config from its last epoch. ``nproc`` > 1
    trains in that many processes (:mod:`covidscan.training.distributed`): DistributedDataParallel when the
    backbone trains, sharded feature extraction when only the head does.
    """
    if cfg.ensemble is not None:
        raise ConfigError(f"the config of {cfg.name!r} is an ensemble's: train each member with its own "
                          "config (the ensemble run's members/*/config.yaml), then combine them with "
                          "`covidscan ensemble`")
    out = Path(out)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    df = load_dataset(data, cfg)
    _check_splits(df, data)
    check_nproc(nproc, device)
    model = build_model(cfg.model)
    interrupted = state_path(out).is_file()
    if resume and not interrupted:
        raise ConfigError(f"--resume {out}: no interrupted training there (no {state_path(out)}); train "
                          "without --resume")
    if interrupted and not (resume or overwrite):
        raise ConfigError(f"{out} holds an interrupted training; continue it with --resume {out}, or start "
                          "again with --overwrite")
    # The folder then holds only the state of the interrupted run (and what --overwrite will replace).
    prepare_run_dir(out, overwrite or resume, [data, *df["path"], *config_inputs(cfg), *inputs])
    with staged_folder(out) as stage:
        result = _train_into(stage, cfg, df, data, model, device, strict=strict, progress=progress,
                             resume=resume, state=state_path(out), nproc=nproc)
    return replace(result, run_dir=out)


def _train_into(
    out: Path, cfg: ExperimentConfig, df: pd.DataFrame, data: str | Path, model: Classifier,
    device: torch.device, *, strict: bool, progress: bool, resume: bool, state: Path, nproc: int,
) -> TrainResult:
    """The body of :func:`train_experiment`, writing the run into the (staged) folder ``out`` while the
    training ``state`` is kept in the final run folder (it must outlive a failed stage)."""
    train_t, eval_t = _transforms(cfg, model)
    prepared = prepare_manifest(df, cfg.preprocess, model.input_size, progress=progress, strict=strict,
                                fingerprint=True)
    if prepared.excluded:
        log.warning("%d of %d images left out by the quality gate (listed in the run's excluded.csv)",
                    len(prepared.excluded), len(df))
        df = df.iloc[prepared.rows].reset_index(drop=True)
        _check_splits(df, data)
    splits = df["split"].to_numpy()
    out.mkdir(parents=True, exist_ok=True)
    write_csv(df, out / "splits.csv")
    # Leakage, duplicates and shortcuts of the very splits trained on, for the model card.
    audit = audit_manifest(df, modality=cfg.preprocess.modality, progress=progress)
    (out / "audit.json").write_text(json.dumps(audit, indent=2), encoding="utf-8")
    if prepared.excluded:
        write_csv(pd.DataFrame(prepared.excluded), out / "excluded.csv")
    train_set, val_set, test_set = (prepared.subset(splits == s) for s in ("train", "val", "test"))
    has_val = len(val_set) > 0
    bs, seed = cfg.train.batch_size, cfg.train.seed
    use_cache = cfg.model.train_mode == "frozen" and cfg.train.cache_features
    fingerprint = data_fingerprint(train_set.images, train_set.labels, val_set.images, val_set.labels)
    training_state = TrainingState(state, fingerprint, cfg.model_dump(mode="json"), resume)
    training_state.load()  # a resume of other data or config is refused now, before any features are computed
    model.to(device)

    val_data: Dataset | None = None
    if use_cache:
        views = cfg.train.views if cfg.train.augment else 1
        sets = [EmbedSet(train_set.images, train_t, views, seed)]
        if has_val:
            sets.append(EmbedSet(val_set.images, eval_t, desc="validation features"))
        feats = embed_sets(model, sets, batch_size=bs, device=device, progress=progress, nproc=nproc)
        train_data: Dataset = CachedFeatures(feats[0], train_set.labels, seed)
        if has_val:
            val_data = CachedFeatures(feats[1], val_set.labels)
        module: torch.nn.Module = model.head_tail
    else:
        train_data = AugmentedImages(train_set.images, train_set.labels, train_t, seed)
        if has_val:
            val_data = AugmentedImages(val_set.images, val_set.labels, eval_t)
        module = model

    if use_cache:
        # Cached features make the head's fit cheap: it runs here, in one process, even with nproc > 1.
        result = fit_head(module, train_data, val_data, cfg.train, standardize=cfg.model.standardize,
                          device=device, progress=progress, training_state=training_state)
    else:
        result = fit(module, train_data, val_data, cfg.train, device=device, progress=progress,
                     training_state=training_state, nproc=nproc)
    notes = _protocol_notes(cfg, df, has_val, result) + excluded_notes(prepared.excluded)
    metrics, calibration = finish_run(out, cfg, model, (train_set, val_set, test_set), device, notes=notes,
                                      history=result.history)
    return TrainResult(out, metrics, result, calibration)


def finish_run(
    out: Path, cfg: ExperimentConfig, model: Classifier, sets: tuple[PreparedSet, PreparedSet, PreparedSet],
    device: torch.device, *, notes: list[str], history: list[dict[str, float]] | None = None,
) -> tuple[dict[str, Any], Calibration]:
    """Calibrate a fitted ``model`` on the validation set, test it, fit its OOD detector and write the run
    (weights, checkpoint, metrics, report, model card) into ``out``; returns the metrics and calibration.

    Every run is finished this way: ``train`` after fitting, ``ensemble`` after combining trained runs.
    ``sets`` are the prepared (train, validation, test) images; ``notes`` go into the report, before the
    calibration's and the OOD detector's own.
    """
    train_set, val_set, test_set = sets
    has_val = len(val_set) > 0
    bs, seed = cfg.train.batch_size, cfg.train.seed
    ev = cfg.evaluation
    # Scored exactly as `covidscan evaluate --precision fp32` will score the saved run: the same numbers.
    scorer = Predictor.from_model(model.eval(), draft_checkpoint(cfg, model), engine="torch", device=device,
                                  precision="fp32", batch_size=bs)
    z_test, f_test = scorer.logits_and_features(test_set.images)
    groups_test = test_set.groups
    z_val = f_val = None
    if has_val:
        z_val, f_val = scorer.logits_and_features(val_set.images)
        groups_val = val_set.groups
        calibration = Calibration.fit(
            z_val, val_set.labels, groups=groups_val if groups_test is not None else None,
            calibrate=ev.calibrate, method=ev.threshold, fixed_threshold=ev.fixed_threshold,
            aggregate=ev.aggregate, band=ev.band,
        )
    else:
        log.warning(
            "no validation split: threshold fixed at %.2f, no temperature scaling", ev.fixed_threshold
        )
        calibration = Calibration(
            threshold=ev.fixed_threshold, band=ev.band, aggregate=ev.aggregate,
            notes=("no validation split: threshold fixed, no temperature scaling",),
        )
    metrics = evaluate_calibrated(
        calibration, test_set.labels, z_test, y_val=val_set.labels if has_val else None, z_val=z_val,
        groups_test=groups_test, n_boot=ev.n_bootstrap, seed=seed,
    )
    if z_val is not None:
        # What settings are chosen on (presets, ensembles): never the test figures above.
        metrics["validation"] = point_metrics(val_set.labels, calibration.proba(z_val),
                                              threshold=calibration.threshold)
    ood = None
    if f_val is not None:
        ood = fit_ood(scorer, train_set, val_set, f_val, seed=seed)
    if ood is not None:
        metrics["ood_share"] = ood_share(ood[0], f_test, test_set)
    model.cpu()
    verdict = measure_bf16(model, test_set, calibration, bs)
    # What evaluate and adapt recognise as this run's own images, wherever they are moved or re-saved.
    seen = Fingerprints.of(train_set, "train") + Fingerprints.of(val_set, "val")
    save_run(out, cfg, model, calibration, bf16=verdict, ood=ood, fingerprints=seen,
             shift_reference=_shift_reference(model, f_val, val_set))
    if history is not None:
        (out / "history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
    write_evaluation(
        out,
        metrics,
        test_set,
        calibration.proba(z_test),
        title=f"{cfg.name}: test split",
        config=cfg.model_dump(mode="json"),
        history=history,
        notes=notes + [f"Calibration: {note}." for note in calibration.notes] + _ood_notes(ood, metrics),
    )
    write_model_card(out)
    return metrics, calibration


def _shift_reference(
    model: Classifier, f_val: np.ndarray | None, val_set: PreparedSet
) -> tuple[np.ndarray, str] | None:
    """The validation images' shift features, the reference of ``covidscan shift`` (None without a
    validation split, and for the BPNN baseline, whose "backbone features" are its pixels' mean)."""
    if f_val is None or not len(val_set) or model.backbone.name == PIXELS:
        return None
    assert val_set.stats is not None
    return shift_features(f_val, val_set.stats), "validation split"


def _check_splits(df: pd.DataFrame, data: str | Path) -> None:
    """Both classes overall and in every split, no patient with both labels, train and test present."""
    check_trainable(df)
    splits = set(df["split"])
    if not {"train", "test"} <= splits:
        raise ManifestError(
            f"{data}: need train and test rows, found splits {sorted(splits)}; check the split column or "
            "the ratios (--set data.ratios=[0.7,0.15,0.15])"
        )


def measure_bf16(
    model: Classifier, test_set: PreparedSet, calibration: Calibration, batch_size: int
) -> PrecisionVerdict | None:
    """bf16 vs fp32 labels and ROC AUC on the test split, measured once here so that serving never has to."""
    if not bf16_supported():
        return None  # cannot be measured without native bf16; serving then stays in fp32
    batches = (to_model_batch(test_set.images[i : i + batch_size], model.mean, model.std)
               for i in range(0, len(test_set), batch_size))
    return bf16_verdict(model, batches, calibration.proba, calibration.threshold, test_set.labels)


def _ood_notes(ood: tuple[OODDetector, int, int] | None, metrics: dict[str, Any]) -> list[str]:
    if ood is None:
        return ["No out-of-distribution detector (fewer than 20 validation images, or the BPNN baseline, "
                "which has no backbone features): predictions carry no ood_score."]
    detector, n_train, n_val = ood
    return [f"Out-of-distribution detector (ood.safetensors): k-NN on pooled backbone features of {n_train} "
            f"training images plus an image-statistics envelope; threshold {detector.threshold_:.2f} = the "
            f"{detector.quantile_:.0%} quantile of {n_val} validation images; {metrics['ood_share']:.0%} of "
            "the test images are flagged unlike_training_data."]


def _protocol_notes(cfg: ExperimentConfig, df: pd.DataFrame, has_val: bool, fitted: FitResult) -> list[str]:
    counts = df.groupby("split")["label"].value_counts().unstack(fill_value=0)
    notes = [f"Split sizes (images): {counts.to_dict(orient='index')}"]
    if has_val:
        notes.append(f"Weights of epoch {fitted.best_epoch} (lowest validation loss) of "
                     f"{len(fitted.history)} trained.")
    if cfg.data.split_by == "image" and "patient_id" in df and df["patient_id"].notna().any():
        notes.append(
            "WARNING: images were split at random, not by patient. Slices of one patient can sit in both "
            "train and test, which inflates every figure below (the published papers' protocol)."
        )
    if not has_val:
        notes.append("No validation split: the threshold is fixed and probabilities are not calibrated.")
    if cfg.model.standardize:
        notes.append("The head learned on the cached features standardised by the training features' mean "
                     "and standard deviation; that map is folded into its first linear layer.")
    return notes
