"""Evaluation figures as PNG files (matplotlib Agg, 100 dpi). Every function takes an output path and
returns it. Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot, so nothing is
shown, no global figure state is kept and nothing needs closing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, roc_curve

from covidscan import CLASSES
from covidscan.errors import ManifestError
from covidscan.evaluation._checks import as_floats, as_labels
from covidscan.evaluation.metrics import (
    DEFAULT_BINS,
    check_threshold,
    confusion,
    expected_calibration_error,
    reliability_bins,
)

DPI = 100
_CORRECT, _WRONG = "#1a9850", "#d73027"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path, *,
                         title: str = "Training curves") -> Path:
    """Loss and accuracy per epoch, train vs validation, from dicts with ``epoch``, ``train_loss``,
    ``train_acc``, ``val_loss``, ``val_acc`` (missing or None values are left out)."""
    if not history:
        raise ManifestError("training history is empty: nothing to plot (train for at least one epoch)")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    fig = _figure(10, 4)
    for ax, (kind, label) in zip(fig.subplots(1, 2), [("loss", "Loss"), ("acc", "Accuracy")], strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            points = [(e, row[f"{split}_{kind}"]) for e, row in zip(epochs, history, strict=True)
                      if row.get(f"{split}_{kind}") is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, markersize=3,
                        label="train" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, path: str | Path, *,
                          title: str = "Confusion matrix") -> Path:
    """2x2 confusion matrix ``[[tn, fp], [fn, tp]]``: counts and the percentage of each true-class row."""
    m = np.asarray(cm)
    if m.shape != (2, 2) or (m < 0).any():
        raise ManifestError(
            f"confusion matrix must be 2x2 non-negative counts [[tn, fp], [fn, tp]], got {m.tolist()}"
        )
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)
    fig = _figure(5, 4.5)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(m[i, j])}\n({100 * share[i, j]:.1f}% of row)", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black", fontsize=12)
    ax.set_xticks([0, 1], CLASSES)
    ax.set_yticks([0, 1], CLASSES)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, path: str | Path, *,
             threshold: float | None = None, title: str = "ROC curve") -> Path:
    """ROC curve with its AUC and, when given, the operating point of ``threshold`` (chosen on validation).
    With a single class the ROC is undefined; the figure then says so instead of failing."""
    y = as_labels(y_true)
    pv = as_floats(p, y.size, "p", unit_interval=True)
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "--", color="gray", label="chance")
    if y.min() != y.max():
        fpr, tpr, _ = roc_curve(y, pv)
        ax.plot(fpr, tpr, color="C0", lw=2, label=f"ROC (AUC = {auc(fpr, tpr):.3f})")
        if threshold is not None:
            (tn, fp), (fn, tp) = confusion(y, pv, check_threshold(threshold))
            ax.plot(fp / (fp + tn), tp / (tp + fn), "o", color="C3", markersize=9,
                    label=f"threshold {threshold:.3f}: sens {tp / (tp + fn):.2f}, spec {tn / (tn + fp):.2f}")
    else:
        ax.text(0.5, 0.5, f"ROC undefined:\nonly {CLASSES[int(y[0])]} cases in this set", ha="center",
                va="center", fontsize=12, transform=ax.transAxes)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, path: str | Path, *,
                     n_bins: int = DEFAULT_BINS, title: str = "Reliability diagram") -> Path:
    """Observed covid fraction vs mean predicted p(covid) per equal-width bin (ECE in the title), above a
    histogram of how many images fall in each bin.

    Each point sits at its bin's mean predicted probability (where the images are, not the bin's centre),
    its area proportional to the bin's image count, so a sparse bin cannot look as solid as a full one.
    """
    bins = reliability_bins(y_true, p, n_bins=n_bins)
    ece = expected_calibration_error(y_true, p, n_bins=n_bins)
    edges = bins["edges"]
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    used = bins["counts"] > 0
    fig = _figure(5.5, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    sizes = 12 + 200 * bins["counts"][used] / bins["counts"].max()
    top.plot(bins["mean_p"][used], bins["frac_covid"][used], "-", color="C0", alpha=0.5)
    top.scatter(bins["mean_p"][used], bins["frac_covid"][used], s=sizes, color="C0", zorder=3,
                clip_on=False, label="observed covid fraction at the bin's mean p(covid)")
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("fraction of images that are covid")
    top.set_title(f"{title} (ECE = {ece:.3f}, {len(centers)} bins)")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centers, bins["counts"], width=width * 0.9, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("predicted p(covid)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return _save(fig, path)


def _label_index(label: object) -> int:
    if isinstance(label, str):
        if label not in CLASSES:
            raise ManifestError(f"sample label {label!r} is not one of {CLASSES}")
        return CLASSES.index(label)
    if label in (0, 1):
        return int(label)
    raise ManifestError(f"sample label {label!r} must be 0/1 or one of {CLASSES}")


def plot_sample_grid(samples: Sequence[tuple[np.ndarray, object, float]], path: str | Path, *,
                     threshold: float = 0.5, ncols: int = 4, title: str = "Sample predictions") -> Path:
    """Grid of (gray float image, true label, p(covid)) titled "true: covid / p(covid)=0.93"; the title
    is green when the prediction at ``threshold`` is right and red when it is wrong."""
    if not samples:
        raise ManifestError("no samples to plot: pass a list of (image, true label, p(covid)) tuples")
    threshold = check_threshold(threshold)
    ncols = max(1, min(int(ncols), len(samples)))
    nrows = -(-len(samples) // ncols)
    fig = _figure(2.6 * ncols, 2.8 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(samples):
            continue
        image, label, prob = samples[i]
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim != 2:
            raise ManifestError(f"sample {i}: image must be a 2-D gray float array, got shape {pixels.shape}")
        truth = _label_index(label)
        prob = float(as_floats([prob], 1, f"sample {i} p(covid)", unit_interval=True)[0])
        color = _CORRECT if (prob >= threshold) == bool(truth) else _WRONG
        ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(f"true: {CLASSES[truth]} / p(covid)={prob:.2f}", color=color, fontsize=9)
    fig.suptitle(f"{title} (green = correct, red = wrong at threshold {threshold:.2f})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def make_figures(out_dir: str | Path, y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, *,
                 threshold: float, history: Sequence[Mapping[str, Any]] | None = None,
                 samples: Sequence[tuple[np.ndarray, object, float]] | None = None,
                 n_bins: int = DEFAULT_BINS) -> dict[str, Path]:
    """All evaluation figures for one test set into ``out_dir``; returns ``{name: path}`` for the report."""
    out = Path(out_dir)
    y = as_labels(y_true)
    figures = {
        "confusion_matrix": plot_confusion_matrix(confusion(y, p, threshold), out / "confusion_matrix.png"),
        "roc": plot_roc(y, p, out / "roc.png", threshold=threshold),
        "reliability": plot_reliability(y, p, out / "reliability.png", n_bins=n_bins),
    }
    if history:
        figures["training_curves"] = plot_training_curves(history, out / "training_curves.png")
    if samples:
        figures["samples"] = plot_sample_grid(samples, out / "samples.png", threshold=threshold)
    return figures
