"""Train an experiment end to end and evaluate a trained run on any dataset."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidscan.config import ExperimentConfig
from covidscan.data import read_manifest, split_manifest
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import evaluate_from_logits, evaluate_predictions
from covidscan.models import Classifier, build_model
from covidscan.preprocess import eval_transform, train_transform
from covidscan.runs import load_run, probabilities, save_run
from covidscan.training.engine import FitResult, embed, fit, transform_batch
from covidscan.training.prepare import PreparedSet, prepare_manifest
from covidscan.training.reporting import write_evaluation

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the run was written and its headline numbers."""

    run_dir: Path
    metrics: dict[str, Any]
    fit: FitResult
    threshold: float
    temperature: float


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


@torch.inference_mode()
def predict_logits(model: Classifier, images: np.ndarray, transform, *, batch_size: int = 32) -> torch.Tensor:
    """Binary logits z = logit_covid - logit_non_covid for prepared uint8 images."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        idx = np.arange(start, min(start + batch_size, len(images)))
        logits = model(transform_batch(images, idx, transform, 0, 0))
        out.append(logits[:, 1] - logits[:, 0])
    return torch.cat(out) if out else torch.empty(0)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def train_experiment(
    cfg: ExperimentConfig, data: str | Path, out: str | Path, *, progress: bool = True
) -> TrainResult:
    """Split, preprocess, train, calibrate on validation, evaluate on test; write the run directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    df = load_dataset(data, cfg)
    df.to_csv(out / "splits.csv", index=False)
    splits = df["split"].to_numpy()
    if not (splits == "train").any() or not (splits == "test").any():
        raise ManifestError(
            f"{data}: need train and test rows, found splits {sorted(set(splits))}; "
            "check the split column or the ratios"
        )

    model = build_model(cfg.model)
    train_t, eval_t = _transforms(cfg, model)
    prepared = prepare_manifest(df, cfg.preprocess, model.input_size, progress=progress)
    train_set, val_set, test_set = (prepared.subset(splits == s) for s in ("train", "val", "test"))
    has_val = len(val_set) > 0
    y_train = torch.from_numpy(train_set.labels)
    y_val = torch.from_numpy(val_set.labels)
    bs = cfg.train.batch_size
    seed = cfg.train.seed
    use_cache = cfg.model.train_mode == "frozen" and cfg.train.cache_features

    if use_cache:
        views = cfg.train.views if cfg.train.augment else 1
        feats = embed(
            model, train_set.images, train_t, views=views, seed=seed, batch_size=bs, progress=progress
        )
        if has_val:
            val_feats = embed(model, val_set.images, eval_t, batch_size=bs, progress=progress)[:, 0]
        module: torch.nn.Module = model.head_tail

        def train_batches(epoch: int):
            rng = np.random.default_rng([seed, epoch])
            order = torch.from_numpy(rng.permutation(len(y_train)))
            pick = torch.from_numpy(rng.integers(views, size=len(y_train)))
            yield from _batches(feats[order, pick[order]], y_train[order], bs)

        def val_batches():
            return _batches(val_feats, y_val, bs)
    else:
        module = model

        def train_batches(epoch: int):
            order = np.random.default_rng([seed, epoch]).permutation(len(y_train))
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                yield transform_batch(train_set.images, idx, train_t, seed, epoch), y_train[idx]

        def val_batches():
            for start in range(0, len(y_val), bs):
                idx = np.arange(start, min(start + bs, len(y_val)))
                yield transform_batch(val_set.images, idx, eval_t, 0, 0), y_val[idx]

    result = fit(module, train_batches, val_batches if has_val else None, cfg.train, progress=progress)

    ev = cfg.evaluation
    z_test = predict_logits(model, test_set.images, eval_t, batch_size=bs)
    groups_test = _groups(test_set)
    if has_val:
        if use_cache:
            with torch.inference_mode():
                logits = model.head_tail.eval()(val_feats)
            z_val = logits[:, 1] - logits[:, 0]
        else:
            z_val = predict_logits(model, val_set.images, eval_t, batch_size=bs)
        metrics = evaluate_from_logits(
            val_set.labels,
            z_val.numpy(),
            test_set.labels,
            z_test.numpy(),
            groups_val=_groups(val_set),
            groups_test=groups_test,
            calibrate=ev.calibrate,
            threshold_method=ev.threshold,
            threshold_value=ev.fixed_threshold,
            n_boot=ev.n_bootstrap,
            seed=seed,
            aggregate=ev.aggregate,
        )
        temperature = metrics["temperature"] or 1.0
    else:
        log.warning(
            "no validation split: threshold fixed at %.2f, no temperature scaling", ev.fixed_threshold
        )
        temperature = 1.0
        metrics = evaluate_predictions(
            test_set.labels,
            probabilities(z_test, 1.0).numpy(),
            threshold=ev.fixed_threshold,
            groups=groups_test,
            n_boot=ev.n_bootstrap,
            seed=seed,
            aggregate=ev.aggregate,
        )
    patient_level = metrics.get("patient_level")
    save_run(
        out,
        cfg,
        model,
        threshold=metrics["threshold"],
        temperature=temperature,
        patient_threshold=patient_level["threshold"] if patient_level else None,
    )
    (out / "history.json").write_text(json.dumps(result.history, indent=2), encoding="utf-8")
    p_test = probabilities(z_test, temperature).numpy()
    write_evaluation(
        out,
        metrics,
        test_set,
        p_test,
        title=f"{cfg.name}: test split",
        config=cfg,
        history=result.history,
        notes=_protocol_notes(cfg, df, has_val),
    )
    return TrainResult(out, metrics, result, metrics["threshold"], temperature)


def _groups(prepared: PreparedSet) -> list[str | None] | None:
    return prepared.patient_ids if any(g is not None for g in prepared.patient_ids) else None


def _protocol_notes(cfg: ExperimentConfig, df: pd.DataFrame, has_val: bool) -> list[str]:
    counts = df.groupby("split")["label"].value_counts().unstack(fill_value=0)
    notes = [f"Split sizes (images): {counts.to_dict(orient='index')}"]
    if cfg.data.split_by == "image" and "patient_id" in df and df["patient_id"].notna().any():
        notes.append(
            "WARNING: images were split at random, not by patient. Slices of one patient can sit in both "
            "train and test, which inflates every figure below (the published papers' protocol)."
        )
    if not has_val:
        notes.append("No validation split: the threshold is fixed and probabilities are not calibrated.")
    return notes


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run on a manifest or folder (e.g. an external test set) with its own threshold.

    ``split`` picks rows of a manifest that has a split column (default: ``test`` when there is one,
    otherwise every row).
    """
    run = load_run(run_dir)
    df = read_manifest(data, patient_column=run.config.data.patient_column)
    if split is None and "split" in df and df["split"].notna().all():
        split = "test"
    if split is not None:
        if "split" not in df:
            raise ConfigError(f"--split {split} given but {data} has no split column")
        df = df[df["split"] == split]
        if df.empty:
            raise ManifestError(f"{data} has no rows in split {split!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_manifest(df, run.config.preprocess, run.model.input_size, progress=progress)
    _, eval_t = _transforms(run.config, run.model)
    cfg = run.config
    z = predict_logits(run.model, prepared.images, eval_t, batch_size=cfg.train.batch_size)
    p = probabilities(z, run.temperature).numpy()
    metrics = evaluate_predictions(
        prepared.labels,
        p,
        threshold=run.threshold,
        groups=_groups(prepared),
        n_boot=cfg.evaluation.n_bootstrap,
        seed=cfg.train.seed,
        aggregate=cfg.evaluation.aggregate,
        patient_threshold=run.meta.get("patient_threshold"),
    )
    metrics["temperature"] = run.temperature
    title = f"{cfg.name} on {data}" + (f" ({split})" if split else "")
    write_evaluation(out, metrics, prepared, p, title=title, config=cfg)
    return metrics
