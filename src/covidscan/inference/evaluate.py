"""``covidscan evaluate``: a trained run on any labelled dataset (an external set), calibrated as trained."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from covidscan.config import load_config
from covidscan.data import read_manifest
from covidscan.data.fingerprints import describe_overlap
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import (
    evaluate_calibrated,
    excluded_notes,
    format_value_ci,
    to_jsonable,
    write_evaluation,
)
from covidscan.inference.predictor import Predictor
from covidscan.models import Precision
from covidscan.outputs import check_output, run_files, run_inputs, write_csv
from covidscan.preprocess import PreparedSet, prepare_manifest
from covidscan.runs import Checkpoint, seen_fingerprints


def training_overlap(run_dir: Path, checkpoint: Checkpoint, prepared: PreparedSet) -> list[dict[str, Any]]:
    """Images of ``prepared`` (prepared with ``fingerprint=True``) that the run was trained or validated
    on, by the fingerprints stored in the run (so they are found after the data moved or were re-saved):
    same path, same decoded pixels, or near-identical pixels (perceptual hash). One dict per shared image
    (:meth:`~covidscan.data.fingerprints.Fingerprints.matches`)."""
    return seen_fingerprints(run_dir, checkpoint).matches(prepared)


def _overlap_error(data: str | Path, overlap: list[dict[str, Any]], n: int) -> ManifestError:
    return ManifestError(
        f"{data} shares {len(overlap)} of {n} images with the run's own training/validation data "
        f"({describe_overlap(overlap)}). Evaluating on images the model has seen inflates every figure: "
        "evaluate on images it never saw, or pass --allow-overlap if you mean it"
    )


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    allow_overlap: bool = False,
    strict: bool = False,
    precision: Precision = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run on a manifest or folder (e.g. an external test set) with its own threshold.

    Images are prepared and scored exactly as ``covidscan predict`` does (one :class:`Predictor`).
    ``split`` picks rows of a manifest that has a split column (default: ``test`` when there is one,
    otherwise every row). Data that share images (same path or same decoded pixels) with the run's
    training or validation split are refused, unless ``allow_overlap`` (then the report says so). Images
    the quality gate refuses are left out and listed in ``excluded.csv`` (``strict``: an error instead).
    ``precision`` is the torch engine's (see :meth:`Predictor.from_run`; ``fp32`` reproduces the
    training-time scores of the test split). Writes metrics.json, predictions.csv, figures and report.md
    into ``out``, which may not be or hold the run, its files, the data or the images (outputs never
    replace inputs).
    """
    predictor = Predictor.from_run(run_dir, engine="torch", precision=precision)
    cfg = load_config(predictor.run_dir / "config.yaml")
    df = read_manifest(data, patient_column=cfg.data.patient_column)
    check_output(out, [*run_inputs(predictor.run_dir), data, *df["path"]])
    if split is None and "split" in df and df["split"].notna().all():
        split = "test"
    if split is not None:
        if "split" not in df:
            raise ConfigError(f"--split {split} given but {data} has no split column")
        df = df[df["split"] == split]
        if df.empty:
            raise ManifestError(f"{data} has no rows in split {split!r}")
    checkpoint = predictor.checkpoint
    prepared = prepare_manifest(df, checkpoint.preprocess, checkpoint.input_size, progress=progress,
                                fingerprint=True, strict=strict)
    overlap = training_overlap(predictor.run_dir, checkpoint, prepared)
    if overlap and not allow_overlap:
        raise _overlap_error(data, overlap, len(prepared))
    z, features = predictor.logits_and_features(prepared.images)
    metrics = evaluate_calibrated(
        predictor.calibration, prepared.labels, z, groups_test=prepared.groups,
        n_boot=cfg.evaluation.n_bootstrap, seed=cfg.train.seed,
    )
    notes = excluded_notes(prepared.excluded)
    metrics["excluded"] = len(prepared.excluded)
    metrics["precision"] = predictor.precision  # bf16 or fp32: the numbers differ in the last digits
    ood = predictor.ood_scores(features, prepared.stats)
    if ood is not None and predictor.ood is not None:
        flagged = predictor.ood.flag(ood[0])
        metrics["ood_share"] = float(flagged.mean())
        notes.append(f"{int(flagged.sum())} of {len(flagged)} images ({flagged.mean():.0%}) are flagged "
                     f"unlike the training data (OOD score above {predictor.ood.threshold_:.2f}).")
    if overlap:
        metrics["overlap_with_training"] = overlap
        notes.append(f"WARNING: {len(overlap)} of {len(prepared)} images were in the run's own training or "
                     "validation data (evaluated anyway, --allow-overlap): the figures below are inflated.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if prepared.excluded:
        write_csv(pd.DataFrame(prepared.excluded), out / "excluded.csv")
    title = f"{cfg.name} on {data}" + (f" ({split})" if split else "")
    write_evaluation(out, metrics, prepared, predictor.calibration.proba(z), title=title,
                     config=cfg.model_dump(mode="json"), notes=notes)
    return metrics


TABLE_METRICS = (("accuracy", "accuracy", "accuracy"), ("sensitivity", "recall", "sensitivity"),
                 ("specificity", "specificity", "specificity"), ("roc_auc", "roc_auc", "ROC AUC"))
"""(table.json key, metrics.json name, table.md heading) of the multi-set table's metric columns."""


GENERIC_STEMS = frozenset({"labels", "manifest", "metadata", "data", "index", "images"})
"""Manifest names that say nothing about the set: the folder's name is used instead."""


def _set_names(datasets: Sequence[Path]) -> list[str]:
    """One folder-safe name per data set: the file's stem (its folder's name for a generic stem such as
    ``labels``), prefixed with the folder's name where names repeat."""
    stems = [d.parent.name if d.stem.lower() in GENERIC_STEMS and d.parent.name else d.stem for d in datasets]
    names = [f"{d.parent.name}-{d.stem}" if stems.count(stem) > 1 else stem
             for d, stem in zip(datasets, stems, strict=True)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--data names the set(s) {repeated} more than once; give each external set once")
    return names


def _table_row(name: str, data: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"set": name, "data": str(data), "n_images": metrics["n_images"],
                           "n_patients": metrics["n_patients"]}
    for column, key, _ in TABLE_METRICS:
        row[column] = metrics["metrics"][key]
    row["ood_share"] = metrics.get("ood_share")  # None for runs without an OOD detector
    return row


def evaluate_many(
    run_dir: str | Path,
    datasets: Sequence[str | Path],
    out: str | Path,
    *,
    split: str | None = None,
    allow_overlap: bool = False,
    strict: bool = False,
    precision: Precision = "auto",
    progress: bool = True,
) -> Path:
    """:func:`evaluate_run` on several external sets: ``out/NAME/`` per set plus ``table.md``/``table.json``.

    The table has one row per set: images (those the quality gate kept), patients, accuracy, sensitivity,
    specificity and ROC AUC with 95% CIs, and the share flagged unlike the training data (empty for runs
    without an OOD detector). Returns the path of ``table.md``.
    """
    paths = [Path(d) for d in datasets]
    if not paths:
        raise ConfigError("give at least one --data set to evaluate on")
    out = check_output(out, [*run_files(run_dir), *paths])
    rows = [
        _table_row(name, data, evaluate_run(run_dir, data, out / name, split=split,
                                            allow_overlap=allow_overlap, strict=strict, precision=precision,
                                            progress=progress))
        for name, data in zip(_set_names(paths), paths, strict=True)
    ]
    text = json.dumps(to_jsonable({"run": str(run_dir), "sets": rows}), indent=2, allow_nan=False)
    (out / "table.json").write_text(text + "\n", encoding="utf-8")
    header = ["set", "images", "patients", *(heading for *_, heading in TABLE_METRICS), "OOD share"]
    lines = [f"# {Path(run_dir).name} on {len(rows)} sets (95% CIs)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        patients = "" if row["n_patients"] is None else str(row["n_patients"])
        ood = "" if row["ood_share"] is None else f"{row['ood_share']:.1%}"
        scores = [format_value_ci(row[column]) for column, *_ in TABLE_METRICS]
        cells = [row["set"], str(row["n_images"]), patients, *scores, ood]
        lines.append("| " + " | ".join(cells) + " |")
    table = out / "table.md"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table
