"""``covidscan evaluate``: a trained run on any labelled dataset (an external set), calibrated as trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidscan.config import load_config
from covidscan.data import read_manifest
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import evaluate_calibrated, write_evaluation
from covidscan.inference.predictor import Predictor
from covidscan.preprocess import prepare_manifest


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run on a manifest or folder (e.g. an external test set) with its own threshold.

    Images are prepared and scored exactly as ``covidscan predict`` does (one :class:`Predictor`).
    ``split`` picks rows of a manifest that has a split column (default: ``test`` when there is one,
    otherwise every row). Writes metrics.json, predictions.csv, figures and report.md into ``out``.
    """
    predictor = Predictor.from_run(run_dir, engine="torch")
    cfg = load_config(predictor.run_dir / "config.yaml")
    df = read_manifest(data, patient_column=cfg.data.patient_column)
    if split is None and "split" in df and df["split"].notna().all():
        split = "test"
    if split is not None:
        if "split" not in df:
            raise ConfigError(f"--split {split} given but {data} has no split column")
        df = df[df["split"] == split]
        if df.empty:
            raise ManifestError(f"{data} has no rows in split {split!r}")
    checkpoint = predictor.checkpoint
    prepared = prepare_manifest(df, checkpoint.preprocess, checkpoint.input_size, progress=progress)
    z = predictor.logits(prepared.images)
    metrics = evaluate_calibrated(
        predictor.calibration, prepared.labels, z, groups_test=prepared.groups,
        n_boot=cfg.evaluation.n_bootstrap, seed=cfg.train.seed,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.name} on {data}" + (f" ({split})" if split else "")
    write_evaluation(out, metrics, prepared, predictor.calibration.proba(z), title=title,
                     config=cfg.model_dump(mode="json"))
    return metrics
