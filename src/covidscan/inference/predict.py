"""``covidscan predict``: files, folders and manifests in, one table of predictions out (CSV or JSON).

A short driver over :class:`~covidscan.inference.Predictor`: it expands the inputs, lets the Predictor
prepare, score and aggregate them, and turns the typed predictions into a table at the edge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from covidscan.data import read_manifest
from covidscan.inference.predictor import Engine, GroupPrediction, Prediction, Predictor
from covidscan.io import list_images
from covidscan.models import Precision
from covidscan.outputs import (
    check_output,
    check_predictions_file,
    readable,
    run_files,
    write_atomic,
    write_csv,
    writing,
)


@dataclass(frozen=True)
class InputItem:
    """One image to predict, with what the inputs said about it."""

    path: str
    group_id: str | None = None  # a manifest's patient id
    true_label: str | None = None
    error: str | None = None  # known before reading (e.g. an empty folder)


def collect_inputs(inputs: str | Path | Sequence[str | Path]) -> list[InputItem]:
    """Expand files, folders (recursively) and manifest CSVs into one list of images."""
    items: list[InputItem] = []
    for raw in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = list_images(path)
            items += [InputItem(str(p)) for p in found] or [InputItem(str(path), error=(
                f"no images found in folder {path} (PNG, JPEG, BMP, TIFF or DICOM files)"))]
        elif path.suffix.lower() == ".csv" and path.is_file():
            df = read_manifest(path, for_prediction=True)
            groups = df["patient_id"] if "patient_id" in df else [None] * len(df)
            items += [
                InputItem(p, None if pd.isna(g) else str(g), None if pd.isna(label) else label)
                for p, g, label in zip(df["path"], groups, df["label"], strict=True)
            ]
        else:
            items.append(InputItem(str(path)))
    return items


def predict(
    run_dir: str | Path | Predictor,
    inputs: str | Path | Sequence[str | Path],
    *,
    engine: Engine = "auto",
    onnx_path: str | Path | None = None,
    band: float | None = None,
    cam_dir: str | Path | None = None,
    workers: int = 2,
    batch_size: int = 32,
    fast: bool = True,
    precision: Precision = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every image of ``inputs`` (files, folders searched recursively, manifest CSVs) with a run.

    One row per image, in input order:

    * ``path``; ``p_covid``: calibrated P(covid) = sigmoid(z / T) with the run's temperature (empty on error);
    * ``label``: ``covid`` when ``p_covid >= threshold`` (the run's), else ``non_covid``;
    * ``uncertain``: ``|p_covid - threshold| < band / 2`` -- a zone of total width ``band`` (default: the
      run's) around the threshold where the label should not be trusted on its own (``band=0``: off);
    * ``lungs_found``: whether the lung crop found lungs (empty when the run does no lung crop);
    * ``warnings``: ``;``-separated notes when the input looks unlike the training data;
    * ``error``: why the file could not be read (other columns then empty); ``true_label`` for manifests;
    * ``group_id``: the manifest's patient id, else the DICOM SeriesInstanceUID, else the DICOM PatientID;
      ``group_n``, ``group_p_covid`` and ``group_label`` (see :meth:`Predictor.aggregate`);
    * ``cam_png``: the Grad-CAM overlay written into ``cam_dir`` (only when ``cam_dir`` is given).

    ``run_dir`` may also be a loaded :class:`Predictor` (then ``engine``, ``onnx_path``, ``band``, ``fast``,
    ``precision``, ``workers`` and ``batch_size`` are its own). Settings used are in ``df.attrs["predict"]``.
    """
    if isinstance(run_dir, Predictor):
        predictor = run_dir
    else:
        predictor = Predictor.from_run(run_dir, engine=engine, onnx_path=onnx_path, band=band, fast=fast,
                                       precision=precision, batch_size=batch_size, workers=workers)
    items = collect_inputs(inputs)
    if cam_dir is not None:
        raw = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        check_output(cam_dir, [*run_files(predictor.run_dir), *raw, *(item.path for item in items)],
                     option="--cam")
    known = {i: item.error for i, item in enumerate(items) if item.error}
    todo = [i for i in range(len(items)) if i not in known]
    with tqdm(total=len(items), desc="predict", disable=not progress, leave=False) as bar:
        bar.update(len(known))
        scored = predictor.predict(
            [items[i].path for i in todo], group_ids=[items[i].group_id for i in todo], cam_dir=cam_dir,
            progress=lambda _: bar.update(),
        )
    preds = [Prediction(source=item.path, error=known.get(i)) for i, item in enumerate(items)]
    for i, pred in zip(todo, scored, strict=True):
        preds[i] = pred
    df = prediction_table(preds, predictor.aggregate(preds), [item.true_label for item in items])
    cal = predictor.calibration
    df.attrs["predict"] = {
        "run": str(predictor.run_dir), "modality": predictor.modality, "engine": predictor.engine,
        "precision": predictor.precision, "threshold": cal.threshold,
        "patient_threshold": cal.patient_threshold, "temperature": cal.temperature, "band": cal.band,
        "images": len(df), "errors": int((df["error"] != "").sum()),
    }
    return df


def prediction_table(
    predictions: Sequence[Prediction],
    groups: Sequence[GroupPrediction],
    true_labels: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """The typed predictions as one row each, with their group's columns (and ``true_label`` if known)."""
    rows = []
    for pred in predictions:
        row = pred.to_dict()
        row["path"] = row.pop("source")
        row["warnings"] = "; ".join(pred.warnings)
        row["error"] = pred.error or ""
        rows.append(row)
    columns = ["path", "p_covid", "label", "uncertain", "lungs_found", "ood_score", "warnings", "error",
               "group_id"]
    df = pd.DataFrame(rows, columns=[*columns, "cam_png"])
    df["p_covid"] = df["p_covid"].astype(float)
    df["ood_score"] = df["ood_score"].astype(float)
    for col in ("uncertain", "lungs_found"):
        df[col] = df[col].astype("boolean")
    if true_labels is not None and any(label is not None for label in true_labels):
        df.insert(columns.index("error") + 1, "true_label", list(true_labels))
    by_group = {g.group_id: g for g in groups}
    df["group_n"] = pd.array([by_group[g].n_images if g in by_group else None for g in df["group_id"]],
                             dtype="Int64")
    df["group_p_covid"] = [by_group[g].p_covid if g in by_group else float("nan") for g in df["group_id"]]
    df["group_label"] = [by_group[g].label if g in by_group else None for g in df["group_id"]]
    cam = df.pop("cam_png")
    if cam.notna().any():
        df["cam_png"] = cam
    return df


def write_predictions(df: pd.DataFrame, out: str | Path) -> Path:
    """Write predictions as ``.csv`` (the table as is) or ``.json``.

    JSON layout::

        {"settings": {run, modality, engine, precision, threshold, patient_threshold, temperature, band,
                      images, errors},
         "images": [{path, p_covid, label, uncertain, lungs_found, ood_score, warnings, error, [true_label],
                     group_id, group_n, group_p_covid, group_label, [cam_png]}, ...],
         "groups": [{group_id, n_images, p_covid, label}, ...]}

    Missing values (the probability of an unreadable file, the group of an ungrouped image) are ``null``;
    in JSON, the bytes of a file name that is not valid UTF-8 are written as ``\\xNN``. The file is written
    whole or not at all; CSV cells are escaped as :func:`covidscan.outputs.write_csv` says. It may not
    replace the run's files or an image predicted.
    """
    out = check_predictions_file(out, df.attrs.get("predict", {}).get("run"), df["path"].tolist())
    if out.suffix.lower() == ".csv":
        return write_csv(df, out, "predictions to ")
    with writing(out, "predictions to "):
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = df.attrs.get("predict", {})
        df = readable(df)  # JSON is UTF-8 text: the bytes of an undecodable file name are shown as \xNN
        groups = (
            df.loc[df["group_n"].notna(), ["group_id", "group_n", "group_p_covid", "group_label"]]
            .drop_duplicates("group_id")
            .rename(columns={"group_n": "n_images", "group_p_covid": "p_covid", "group_label": "label"})
        )
        doc: dict[str, Any] = {
            "settings": settings,
            "images": json.loads(df.to_json(orient="records")),
            "groups": json.loads(groups.to_json(orient="records")),
        }
        write_atomic(out, json.dumps(doc, indent=2))
    return out
