"""Build an ensemble run from trained runs (``covidscan ensemble RUN_A RUN_B ... --out RUN``).

The members must be alike where it matters for one model: the same classes, modality, preprocessing and
input size, and the same images in the same splits (the same data and validation split: the ensemble is
calibrated on that validation split and tested on that test split, so a member trained on another split
could have seen the test images). What differs is refused with an error naming the run and the difference.

The ensemble is then finished like any trained run (:func:`covidscan.training.run.finish_run`): its
averaged logits are calibrated on the validation split (temperature, threshold), it gets its own OOD
detector (on the members' pooled features side by side), it is tested on the test split, and metrics.json,
report.md and model_card.md are written. The run directory is self-contained: ``model.safetensors`` holds
every member's weights, and ``members/NAME/`` keeps each member's config.yaml (which re-creates it),
checkpoint.json (its own calibration) and metrics.json.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covidscan.config import ExperimentConfig
from covidscan.data import read_manifest
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import Calibration
from covidscan.models import PIXELS, EnsembleClassifier, EnsembleConfig, EnsembleMember
from covidscan.models.ensemble import MEMBERS_DIR
from covidscan.outputs import read_csv, run_inputs, staged_folder
from covidscan.preprocess import prepare_manifest
from covidscan.runs import LoadedRun, load_run
from covidscan.system import resolve_device
from covidscan.training.run import finish_run, prepare_run_dir

MEMBER_FILES = ("config.yaml", "checkpoint.json", "metrics.json", "history.json", "model_card.md")
"""What ``members/NAME/`` keeps of each member run (those it has): enough to re-create and judge it."""
_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


@dataclass
class EnsembleResult:
    """Where the ensemble run was written, its members' names and its test metrics."""

    run_dir: Path
    members: list[str]
    metrics: dict[str, Any]
    calibration: Calibration


def _splits(run: LoadedRun) -> pd.DataFrame:
    file = run.path / "splits.csv"
    if not file.is_file():
        raise ManifestError(
            f"{file} is missing: the images run {run.path} was trained and validated on are "
            "unknown, so it cannot be ensembled (train it again)"
        )
    return read_csv(file, dtype=str, keep_default_na=False)


def _split_difference(first: LoadedRun, run: LoadedRun) -> str | None:
    """How ``run``'s splits.csv differs from ``first``'s (images, labels or splits), or None."""
    ours, theirs = _splits(first), _splits(run)
    for split in ("val", "test", "train"):
        a = set(zip(*(ours.loc[ours["split"] == split, c] for c in ("path", "label")), strict=True))
        b = set(zip(*(theirs.loc[theirs["split"] == split, c] for c in ("path", "label")), strict=True))
        if a != b:
            only_b, only_a = sorted(b - a), sorted(a - b)
            example = (
                f"e.g. {only_b[0][0]} ({only_b[0][1]}) only in {run.path}"
                if only_b
                else f"e.g. {only_a[0][0]} ({only_a[0][1]}) only in {first.path}"
            )
            return (
                f"its {_SPLIT_WORDS[split]} split differs ({len(only_b)} images or labels only in it, "
                f"{len(only_a)} only in {first.path}; {example}): ensemble runs trained on the same "
                "data with the same split"
            )
    return None


def check_compatible(runs: Sequence[LoadedRun]) -> None:
    """Refuse members that cannot make one model, naming the run and what differs from the first."""
    if len(runs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 trained runs, got {len(runs)}")
    first = runs[0]
    seen: dict[str, Path] = {}
    for run in runs:
        ck = run.checkpoint
        if ck.ensemble is not None:
            raise ConfigError(f"{run.path} is itself an ensemble; give its members' runs instead")
        if run.model.backbone.name == PIXELS:
            raise ConfigError(f"{run.path} is a BPNN baseline (no backbone features): it cannot be ensembled")
        if ck.weights_sha256 in seen:
            raise ConfigError(
                f"{run.path} has the same weights as {seen[ck.weights_sha256]}: a run given "
                "twice adds nothing to an ensemble"
            )
        seen[ck.weights_sha256] = run.path
        if run is first:
            continue
        first_ck = first.checkpoint
        pre_a, pre_b = first_ck.preprocess.model_dump(), ck.preprocess.model_dump()
        differ = [
            (what, a, b)
            for what, a, b in (
                ("modality", first_ck.modality, ck.modality),
                ("input size", tuple(first_ck.input_size), tuple(ck.input_size)),
                *((f"preprocess.{k}", pre_a[k], pre_b[k]) for k in pre_a if k != "modality"),
                (
                    "feature map size (h, w)",
                    first.model.backbone.feature_shape[1:],
                    run.model.backbone.feature_shape[1:],
                ),
                ("X-ray lung model", first_ck.lung_model_sha256, ck.lung_model_sha256),
            )
            if a != b
        ]
        if differ:
            what = "; ".join(f"{name} {b!r} where {first.path} has {a!r}" for name, a, b in differ)
            raise ConfigError(
                f"cannot ensemble {run.path} with {first.path}: {what}; the members must be "
                "prepared alike (train them with the same preprocessing and input size)"
            )
        split = _split_difference(first, run)
        if split is not None:
            raise ConfigError(f"cannot ensemble {run.path} with {first.path}: {split}")
    if not (_splits(first)["split"] == "val").any():
        raise ConfigError(
            f"{first.path} has no validation split: an ensemble is calibrated on the members' "
            "shared validation split"
        )


def _member_names(runs: Sequence[LoadedRun]) -> list[str]:
    """``1-NAME``, ``2-NAME``, ...: each member's folder under ``members/`` (numbered: two runs of one preset
    may share a name)."""
    return [
        f"{i}-{re.sub(r'[^A-Za-z0-9._-]+', '_', run.path.resolve().name)}"
        for i, run in enumerate(runs, start=1)
    ]


def ensemble_config(runs: Sequence[LoadedRun], name: str | None = None) -> ExperimentConfig:
    """The ensemble run's config: the first member's data, preprocessing and evaluation settings, with the
    ``ensemble`` section listing every member."""
    members = tuple(
        EnsembleMember(
            name=member,
            model=run.checkpoint.model,
            run=str(run.path.resolve()),
            weights_sha256=run.checkpoint.weights_sha256,
        )
        for member, run in zip(_member_names(runs), runs, strict=True)
    )
    first = runs[0].config
    return first.model_copy(
        update={
            "name": name or f"ensemble-{len(runs)}-{first.name}",
            "description": "mean of the temperature-scaled logits of " + ", ".join(m.name for m in members),
            "ensemble": EnsembleConfig(members=members),
        }
    )


def _notes(runs: Sequence[LoadedRun], names: Sequence[str]) -> list[str]:
    rows = []
    for name, run in zip(names, runs, strict=True):
        auc = ((_metrics(run) or {}).get("metrics", {}).get("roc_auc") or {}).get("value")
        rows.append(
            f"{name} ({run.checkpoint.model_name}, temperature {run.calibration.temperature:.3g}"
            + (f", its own test ROC AUC {auc:.3f}" if auc is not None else "")
            + ")"
        )
    return [
        f"Ensemble of {len(runs)} trained runs: {'; '.join(rows)}. Each member's logit is divided by "
        "its own validation temperature, the results are averaged, and the average is calibrated once "
        "more on the shared validation split (temperature, threshold) and tested on the shared test "
        f"split. The members' config.yaml, checkpoint.json and metrics.json are in {MEMBERS_DIR}/."
    ]


def _metrics(run: LoadedRun) -> dict[str, Any] | None:
    try:
        return json.loads((run.path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_ensemble_run(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EnsembleResult:
    """Combine the trained runs in ``run_dirs`` into one ensemble run written to ``out``.

    Every member is loaded and checked (:func:`check_compatible`) before ``out`` is touched; the shared
    images are prepared once, scored by the ensemble, and the run is finished as ``train`` finishes one.
    ``out`` may not be or hold a member run or its images; it is written beside and swapped in when
    complete (``overwrite`` replaces an earlier one).
    """
    runs = [load_run(path) for path in run_dirs]
    check_compatible(runs)
    for run in runs:
        run.checkpoint.check_lung_model()
    cfg = ensemble_config(runs, name)
    assert cfg.ensemble is not None
    first = runs[0]
    out = Path(out)
    prepare_run_dir(out, overwrite, [p for run in runs for p in run_inputs(run.path)])
    df = read_manifest(first.path / "splits.csv", patient_column=cfg.data.patient_column)
    ck = first.checkpoint
    prepared = prepare_manifest(df, ck.preprocess, ck.input_size, progress=progress, fingerprint=True)
    if prepared.excluded:
        lost = prepared.excluded[0]
        raise ManifestError(
            f"{len(prepared.excluded)} of the {len(df)} images in {first.path / 'splits.csv'} cannot be used "
            f"now (e.g. {lost['path']}: {lost['reason']}); the ensemble needs every image its members were "
            "trained, validated and tested on: restore them where they were"
        )
    splits = df["split"].to_numpy()
    train_set, val_set, test_set = (prepared.subset(splits == s) for s in ("train", "val", "test"))
    weights = [1.0 / (len(runs) * run.calibration.temperature) for run in runs]
    model = EnsembleClassifier([run.model for run in runs], weights, cfg.ensemble)
    names = [m.name for m in cfg.ensemble.members]
    with staged_folder(out) as stage:
        stage.mkdir(parents=True, exist_ok=True)
        for file in ("splits.csv", "audit.json"):
            if (first.path / file).is_file():
                shutil.copy2(first.path / file, stage / file)
        for member, run in zip(names, runs, strict=True):
            folder = stage / MEMBERS_DIR / member
            folder.mkdir(parents=True)
            for file in MEMBER_FILES:
                if (run.path / file).is_file():
                    shutil.copy2(run.path / file, folder / file)
        metrics, calibration = finish_run(
            stage,
            cfg,
            model,
            (train_set, val_set, test_set),
            resolve_device(cfg.train.device),
            notes=_notes(runs, names),
        )
    return EnsembleResult(out, names, metrics, calibration)


__all__ = ["EnsembleResult", "build_ensemble_run", "check_compatible", "ensemble_config"]
