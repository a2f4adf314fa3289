"""``covidscan shift``: does a group of images look like a run's validation images? (Before any verdict.)

:func:`run_reference` gives a run's reference shift features: those stored in the run
(``shift_reference.safetensors``) or, for a run written before covidscan stored them, those of the
validation images its ``splits.csv`` lists. :func:`shift_report` runs
the test (:mod:`covidscan.evaluation.shift`) on a folder or manifest and writes ``shift.json``,
``shift.csv`` and ``shift.png``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covidscan.errors import ConfigError, ManifestError, ResourceNotFoundError
from covidscan.evaluation.shift import MIN_IMAGES, MIN_REFERENCE, ShiftResult, ShiftTest
from covidscan.inference.predict import collect_inputs
from covidscan.inference.predictor import Prediction, Predictor
from covidscan.models import PIXELS, Precision
from covidscan.outputs import check_folder, check_output, read_csv, run_files, write_csv, write_text
from covidscan.runs import load_shift_reference

log = logging.getLogger(__name__)

COMPUTED = "validation split (computed from splits.csv: the run stores no reference)"


def run_reference(predictor: Predictor) -> tuple[np.ndarray, str]:
    """The run's reference shift features (N, D) and where they come from.

    Stored in the run since covidscan wrote ``shift_reference.safetensors``; for an older run computed from
    the validation images its ``splits.csv`` lists, when they can all be read (else ResourceNotFoundError
    saying so); a caller testing often (the review service) keeps the result rather than recomputing it.
    """
    stored = load_shift_reference(predictor.run_dir, predictor.checkpoint)
    if stored is not None:
        assert predictor.checkpoint.shift_reference is not None
        return stored, predictor.checkpoint.shift_reference.source
    run = predictor.run_dir
    if predictor.model.backbone.name == PIXELS:
        raise ConfigError(f"{run} is a BPNN baseline run: it has no backbone features to compare images "
                          "on; use a run with a pretrained backbone")
    older = f"{run} stores no shift reference (written by an older covidscan)"
    try:
        table = read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
        paths = table.loc[table["split"] == "val", "path"].tolist()
    except (OSError, KeyError, ValueError) as exc:
        raise ResourceNotFoundError(f"{older} and its splits.csv cannot be read ({exc}); train the run "
                                    "again to store one") from None
    missing = [p for p in paths if not Path(p).is_file()]
    if len(paths) < MIN_REFERENCE or missing:
        found = (f"{len(missing)} of its {len(paths)} validation images are not where splits.csv says "
                 f"(e.g. {missing[0]})" if missing else f"its splits.csv lists only {len(paths)} validation "
                 f"images (at least {MIN_REFERENCE} are needed)")
        raise ResourceNotFoundError(f"{older}, and {found}; put the images back there, or train the run "
                                    "again to store a reference")
    log.info("%s: computing the shift reference from %d validation images", older, len(paths))
    features = _features(predictor.predict(paths))
    if len(features) < MIN_REFERENCE:
        raise ResourceNotFoundError(f"{older}, and only {len(features)} of its {len(paths)} validation "
                                    "images can be read now; train the run again to store a reference")
    return features, COMPUTED


def _features(predictions: list[Prediction]) -> np.ndarray:
    """The shift features of the predictions that have them, stacked (N, D)."""
    rows = [p.features for p in predictions if p.features is not None]
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class ShiftReport:
    """A shift test of a folder or manifest: the result, one table row per image, the reference's source."""

    result: ShiftResult
    table: pd.DataFrame
    reference: str
    files: tuple[Path, ...] = ()


def shift_report(
    run: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    precision: Precision = "auto",
) -> ShiftReport:
    """Test whether the images in ``data`` (a folder or a manifest CSV) look like ``run``'s validation images.

    Images that cannot be read or that the quality gate refuses (another modality) are listed with their
    error and left out; fewer than :data:`~covidscan.evaluation.shift.MIN_IMAGES` usable images is a
    ManifestError. With ``out`` (a folder, never the run or the data) writes ``shift.json`` (the result),
    ``shift.csv`` (per image: its out-of-fold shift score, higher = less like the validation images) and
    ``shift.png`` (score distributions and the first two principal components).
    """
    data = Path(data)
    items = collect_inputs(data)
    if out is not None:
        check_output(out, [*run_files(run), data, *(item.path for item in items)])
        check_folder(out, overwrite=True)
    predictor = Predictor.from_run(run, engine="torch", precision=precision)
    reference, source = run_reference(predictor)
    readable = [i for i, item in enumerate(items) if item.error is None]
    predictions = dict(zip(readable, predictor.predict([items[i].path for i in readable]), strict=True))
    usable = [i for i in readable if predictions[i].features is not None]
    if len(usable) < MIN_IMAGES:
        raise ManifestError(_too_few(data, items, predictions, len(usable), predictor.modality))
    result = ShiftTest(seed=seed).fit(reference).test(np.stack([predictions[i].features for i in usable]))
    scores = dict(zip(usable, result.sample_scores, strict=True))
    table = pd.DataFrame({
        "path": [item.path for item in items],
        "shift_score": [round(float(scores[i]), 4) if i in scores else None for i in range(len(items))],
        "ood_score": [predictions[i].ood_score if i in predictions else None for i in range(len(items))],
        "error": [predictions[i].error if i in predictions else item.error for i, item in enumerate(items)],
    })
    files: tuple[Path, ...] = ()
    if out is not None:
        out = Path(out)
        summary = result.to_dict() | {"run": str(run), "data": str(data), "reference": source,
                                      "n_images": len(items), "n_left_out": len(items) - len(usable)}
        files = (write_text(out / "shift.json", json.dumps(summary, indent=2) + "\n"),
                 write_csv(table, out / "shift.csv"), plot_shift(result, out / "shift.png"))
    return ShiftReport(result, table, source, files)


def _too_few(data: Path, items: list[Any], predictions: dict[int, Prediction], n_usable: int,
             modality: str) -> str:
    errors = [predictions[i].error if i in predictions else item.error for i, item in enumerate(items)
              if i not in predictions or predictions[i].features is None]
    first = f"; the first: {errors[0]}" if errors else ""
    return (f"{data}: {n_usable} of {len(items)} images can be used for the shift test, which needs at least "
            f"{MIN_IMAGES}{first}; give a group of at least {MIN_IMAGES} readable {modality} images")


def plot_shift(result: ShiftResult, path: str | Path) -> Path:
    """Out-of-fold classifier scores of reference vs sample, and the first two principal components."""
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    hist, scatter = fig.subplots(1, 2)
    n = result.n_reference
    groups = (("the run's reference", slice(0, n), "#4575b4"), ("these images", slice(n, None), "#d73027"))
    bins = np.histogram_bin_edges(result.scores, bins=25)
    for name, rows, colour in groups:
        hist.hist(result.scores[rows], bins=bins, alpha=0.6, color=colour, label=name, density=True)
        scatter.scatter(*result.components[rows].T[:2], s=10, alpha=0.7, color=colour, label=name)
    hist.set_xlabel("out-of-fold classifier score (higher: more like these images)")
    hist.set_ylabel("density")
    low, high = result.auc_ci or (None, None)
    ci = f" ({low:.2f}-{high:.2f})" if low is not None else ""
    hist.set_title(f"ROC AUC {result.auc:.2f}{ci}, p = {result.p_value:.3g}")
    scatter.set_xlabel("principal component 1")
    scatter.set_ylabel("principal component 2")
    scatter.set_title("not yet validated here" if result.alarm else "no shift found")
    scatter.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = ["ShiftReport", "plot_shift", "run_reference", "shift_report"]
