"""Predict COVID-19 probability for new images with a trained run: fast, robust to bad files, checkable.

Decoding and preprocessing run in a thread pool ahead of the model (OpenCV, PIL and pydicom release the
GIL), so while batch k goes through the network, batch k+1 is being read. Unreadable files become rows
with an ``error`` instead of stopping the others.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from covidscan import CLASSES
from covidscan.data import read_manifest
from covidscan.errors import ConfigError, CovidscanError, ImageReadError
from covidscan.inference.checks import input_warnings
from covidscan.inference.fast import FastClassifier, bf16_supported, binary_logits, check_bf16, to_batch
from covidscan.io import list_images, read_image
from covidscan.runs import LoadedRun, load_run, probabilities
from covidscan.training.prepare import PreparedImage, prepare_array

log = logging.getLogger(__name__)

Engine = Literal["torch", "onnx"]
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class _Input:
    path: str
    group_id: str | None = None  # a manifest's patient id
    true_label: str | None = None
    error: str | None = None  # known before reading (e.g. an empty folder)


@dataclass(frozen=True)
class _Decoded:
    prepared: PreparedImage
    warnings: list[str]
    group_id: str | None


@dataclass(frozen=True)
class _Model:
    """How a batch becomes binary logits, and in which precision."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    precision: str


def _collect(inputs: str | Path | Sequence[str | Path]) -> list[_Input]:
    """Expand files, folders (recursively) and manifest CSVs into one list of images."""
    items: list[_Input] = []
    for raw in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = list_images(path)
            items += [_Input(str(p)) for p in found] or [_Input(str(path), error=(
                f"no images found in folder {path} (PNG, JPEG, BMP, TIFF or DICOM files)"))]
        elif path.suffix.lower() == ".csv" and path.is_file():
            df = read_manifest(path)
            groups = df["patient_id"] if "patient_id" in df else [None] * len(df)
            items += [
                _Input(p, None if pd.isna(g) else str(g), label)
                for p, g, label in zip(df["path"], groups, df["label"], strict=True)
            ]
        else:
            items.append(_Input(str(path)))
    return items


def _ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], *, workers: int, ahead: int) -> Iterator[_R]:
    """``map`` in a thread pool, in order, keeping at most ``ahead`` results in flight (bounded memory)."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(ahead), it, strict=False))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


def _torch_model(run: LoadedRun, fast: bool) -> _Model:
    if not fast:
        return _Model(lambda x: binary_logits(run.model, x.contiguous()), "fp32")
    bf16 = bf16_supported() and check_bf16(run)["allowed"]
    model = FastClassifier(run.model, torch.bfloat16 if bf16 else torch.float32)
    return _Model(lambda x: binary_logits(model, x), "bf16" if bf16 else "fp32")


def _onnx_model(run: LoadedRun, onnx_path: str | Path | None) -> _Model:
    from covidscan.export import OnnxModel, export_onnx  # onnxruntime only loads when asked for

    path = Path(onnx_path) if onnx_path is not None else run.path / "model.onnx"
    if onnx_path is None and not path.is_file():
        export_onnx(run.path, path)
    session = OnnxModel(path, threads=torch.get_num_threads())
    meta = session.metadata
    ours = {"input_size": list(run.model.input_size), "temperature": run.temperature,
            "threshold": run.threshold}
    differs = {k: meta.get(k) for k, v in ours.items() if k in meta and meta[k] != v}
    if differs:
        raise ConfigError(
            f"ONNX model {path} does not belong to run {run.path}: it has {differs}, the run {ours}; "
            "export it again with export_onnx(run_dir, out)"
        )

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = torch.from_numpy(np.asarray(session(x.contiguous().numpy()), dtype=np.float32))
        return logits[:, 1] - logits[:, 0]

    return _Model(forward, "fp32")


def _check_args(engine: str, band: float, batch_size: int, workers: int) -> None:
    if engine not in ("torch", "onnx"):
        raise ConfigError(f"engine must be 'torch' or 'onnx', got {engine!r}")
    if not 0.0 <= band < 1.0:
        raise ConfigError(f"band (width of the uncertain zone around the threshold) must be in [0, 1), "
                          f"got {band}")
    if batch_size < 1 or workers < 1:
        raise ConfigError(f"batch_size and workers must be >= 1, got {batch_size} and {workers}")


def predict(
    run_dir: str | Path | LoadedRun,
    inputs: str | Path | Sequence[str | Path],
    *,
    engine: Engine = "torch",
    onnx_path: str | Path | None = None,
    band: float = 0.1,
    cam_dir: str | Path | None = None,
    workers: int = 2,
    batch_size: int = 32,
    fast: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every image of ``inputs`` (files, folders searched recursively, manifest CSVs) with a run.

    One row per image, in input order:

    * ``path``; ``p_covid``: calibrated P(covid) = sigmoid(z / T) with the run's temperature (empty on error);
    * ``label``: ``covid`` when ``p_covid >= threshold`` (the run's), else ``non_covid``;
    * ``uncertain``: ``|p_covid - threshold| < band / 2`` -- a zone of total width ``band`` around the
      threshold where the label should not be trusted on its own (``band=0`` turns it off);
    * ``lungs_found``: whether the lung crop found lungs (empty when the run does no lung crop);
    * ``warnings``: ``;``-separated notes when the input looks unlike the training data (see
      :mod:`covidscan.inference.checks`: tiny, blank, other_modality, no_lungs, inverted);
    * ``error``: why the file could not be read (other columns then empty); ``true_label`` for manifests;
    * ``group_id``: the manifest's patient id, else the DICOM SeriesInstanceUID, else the DICOM PatientID;
      ``group_n``, ``group_p_covid`` (mean p of the group's readable images) and ``group_label`` (at the run's
      patient threshold when it has one, else its image threshold);
    * ``cam_png``: the Grad-CAM overlay written into ``cam_dir`` (only when ``cam_dir`` is given).

    ``engine="onnx"`` runs ``onnx_path`` (default ``model.onnx`` in the run, exported on first use) with
    onnxruntime. ``fast=True`` folds BatchNorm, uses channels_last and bf16 when the run's bf16 check
    allows it (see :mod:`covidscan.inference.fast`); ``fast=False`` is the plain fp32 model. Settings used
    are in ``df.attrs["predict"]``. ``run_dir`` may also be a run already loaded with ``load_run``.
    """
    _check_args(engine, band, batch_size, workers)
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir)
    items = _collect(inputs)
    model = _onnx_model(run, onnx_path) if engine == "onnx" else _torch_model(run, fast)
    cfg, size, modality = run.config.preprocess, run.model.input_size, run.meta["modality"]
    cams = Path(cam_dir) if cam_dir is not None else None

    def decode(item: _Input) -> _Decoded | CovidscanError:
        if item.error:
            return ImageReadError(item.path, item.error)
        try:
            loaded = read_image(item.path)
            prepared = prepare_array(loaded.pixels, cfg, size, keep_original=cams is not None)
        except CovidscanError as exc:  # unreadable file (or an image the preprocessing refuses)
            return exc
        meta = loaded.meta
        found = input_warnings(loaded.pixels, meta, prepared.lungs_found, modality)
        return _Decoded(prepared, found, item.group_id or meta.series_uid or meta.patient_id)

    rows: list[dict[str, Any]] = []
    batch: list[tuple[dict[str, Any], _Decoded]] = []

    def flush() -> None:
        x = to_batch(np.stack([d.prepared.pixels for _, d in batch]), run.model.mean, run.model.std)
        p = probabilities(model.forward(x), run.temperature).numpy().astype(float)
        for (row, _), pi in zip(batch, p, strict=True):
            row.update(p_covid=pi, label=CLASSES[int(pi >= run.threshold)],
                       uncertain=bool(abs(pi - run.threshold) < band / 2))
        if cams is not None:
            _save_cams(run, x, batch, cams)
        batch.clear()

    bar = tqdm(total=len(items), desc="predict", disable=not progress, leave=False)
    decoded = _ordered_map(decode, items, workers=workers, ahead=2 * batch_size + workers)
    for i, (item, result) in enumerate(zip(items, decoded, strict=True)):
        row: dict[str, Any] = {
            "path": item.path, "p_covid": np.nan, "label": None, "uncertain": None, "lungs_found": None,
            "warnings": "", "error": "", "true_label": item.true_label, "group_id": item.group_id, "index": i,
        }
        rows.append(row)
        if isinstance(result, CovidscanError):
            row["error"] = str(result)
        else:
            row.update(lungs_found=result.prepared.lungs_found, warnings="; ".join(result.warnings),
                       group_id=result.group_id)
            batch.append((row, result))
            if len(batch) == batch_size:
                flush()
        bar.update()
    if batch:
        flush()
    bar.close()

    patient_threshold = run.meta.get("patient_threshold")
    group_threshold = run.threshold if patient_threshold is None else float(patient_threshold)
    df = _table(rows, group_threshold)
    df.attrs["predict"] = {
        "run": str(run.path), "modality": modality, "engine": engine, "precision": model.precision,
        "threshold": run.threshold, "group_threshold": group_threshold,
        "temperature": run.temperature, "band": band, "images": len(df),
        "errors": int((df["error"] != "").sum()),
    }
    return df


def _save_cams(
    run: LoadedRun, x: torch.Tensor, batch: list[tuple[dict[str, Any], _Decoded]], out: Path
) -> None:
    """One Grad-CAM overlay PNG per image: the map drawn back onto the original, its region outlined."""
    from covidscan.explain import explain_prepared  # pytorch_grad_cam only loads when asked for

    names = [out / f"{row['index']:05d}_{Path(row['path']).stem}.png" for row, _ in batch]
    titles = [f"p(covid) {row['p_covid']:.2f}: {row['label']}" + (", uncertain" if row["uncertain"] else "")
              for row, _ in batch]
    explained = explain_prepared(run, [d.prepared for _, d in batch], x.contiguous(), names, titles=titles)
    for (row, _), result in zip(batch, explained, strict=True):
        row["cam_png"] = result["cam_png"]


def _table(rows: list[dict[str, Any]], group_threshold: float) -> pd.DataFrame:
    df = pd.DataFrame(rows).drop(columns="index")
    for col in ("uncertain", "lungs_found"):
        df[col] = df[col].astype("boolean")
    if df["true_label"].isna().all():
        df = df.drop(columns="true_label")
    stats = df[df["p_covid"].notna()].groupby("group_id")["p_covid"].agg(["size", "mean"])
    df["group_n"] = df["group_id"].map(stats["size"]).astype("Int64")
    df["group_p_covid"] = df["group_id"].map(stats["mean"]).astype(float)
    df["group_label"] = [
        None if pd.isna(p) else CLASSES[int(p >= group_threshold)] for p in df["group_p_covid"]
    ]
    cam = ["cam_png"] if "cam_png" in df else []
    return df[[c for c in df.columns if c not in cam] + cam]


def write_predictions(df: pd.DataFrame, out: str | Path) -> Path:
    """Write predictions as ``.csv`` (the table as is) or ``.json``.

    JSON layout::

        {"settings": {run, modality, engine, precision, threshold, group_threshold, temperature, band,
                      images, errors},
         "images": [{path, p_covid, label, uncertain, lungs_found, warnings, error, [true_label],
                     group_id, group_n, group_p_covid, group_label, [cam_png]}, ...],
         "groups": [{group_id, n_images, p_covid, label}, ...]}

    Missing values (the probability of an unreadable file, the group of an ungrouped image) are ``null``.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ConfigError(f"cannot write predictions to {out}: use a .csv or .json file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            df.to_csv(out, index=False)
            return out
        groups = (
            df.loc[df["group_id"].notna(), ["group_id", "group_n", "group_p_covid", "group_label"]]
            .drop_duplicates("group_id")
            .rename(columns={"group_n": "n_images", "group_p_covid": "p_covid", "group_label": "label"})
        )
        doc = {
            "settings": df.attrs.get("predict", {}),
            "images": json.loads(df.to_json(orient="records")),
            "groups": json.loads(groups.to_json(orient="records")),
        }
        out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    except OSError as exc:
        raise CovidscanError(f"cannot write predictions to {out}: {exc.strerror or exc}") from exc
    return out
