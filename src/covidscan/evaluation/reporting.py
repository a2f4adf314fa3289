"""Write one evaluation's metrics.json, predictions.csv, figures and report.md into a folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from covidscan import CLASSES
from covidscan.evaluation.figures import make_figures
from covidscan.evaluation.report import write_report
from covidscan.evaluation.schema import write_metrics
from covidscan.outputs import write_csv

if TYPE_CHECKING:
    from covidscan.preprocess import PreparedSet

N_SAMPLES = 16


def write_evaluation(
    out: Path,
    metrics: dict[str, Any],
    prepared: PreparedSet,
    p: np.ndarray,
    *,
    title: str,
    config: dict[str, Any],
    history: list[dict[str, float]] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Everything a reader needs to check one evaluation; returns the report's path.

    ``config`` is the experiment config as a dict (shown in the report); ``p`` the test probabilities.
    """
    write_metrics(metrics, out / "metrics.json")
    write_csv(
        pd.DataFrame(
            {
                "path": prepared.paths,
                "label": [CLASSES[i] for i in prepared.labels],
                "patient_id": prepared.patient_ids,
                "p_covid": p,
                "lungs_found": prepared.lungs_found,
            }
        ),
        out / "predictions.csv",
    )
    # A fixed, class-balanced sample of test images with their probabilities (paper A's Fig. 7).
    rng = np.random.default_rng(0)
    picks = np.concatenate(
        [rng.permutation(np.flatnonzero(prepared.labels == c))[: N_SAMPLES // 2] for c in (0, 1)]
    )
    samples = [(prepared.images[i], CLASSES[prepared.labels[i]], float(p[i])) for i in picks]
    figures = make_figures(
        out / "figures", prepared.labels, p, threshold=metrics["threshold"], history=history, samples=samples
    )
    return write_report(
        out,
        title=title,
        metrics=metrics,
        figures=figures,
        config=config,
        notes=notes or [],
    )


def excluded_notes(excluded: list[dict[str, str]], *, listed_in: str = "excluded.csv") -> list[str]:
    """Report lines for images the quality gate left out (none when nothing was)."""
    if not excluded:
        return []
    refused = sum(e["status"] == "refused" for e in excluded)
    shown = "; ".join(e["reason"] for e in excluded[:5]) + ("; ..." if len(excluded) > 5 else "")
    n = len(excluded)
    images = "1 image was" if n == 1 else f"{n} images were"
    return [f"WARNING: {images} left out ({refused} refused by the quality gate, {n - refused} unreadable), "
            f"every one listed in {listed_in}: {shown}"]
