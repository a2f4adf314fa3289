"""Human-readable summaries of a metrics dict: a terminal/markdown table and a report.md for readers
who are not machine-learning people (sensitivity and specificity are also stated in words), and
:func:`write_evaluation`, which writes one evaluation's metrics.json, predictions.csv, figures and report.md
into a folder."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from covidscan import CLASSES
from covidscan.evaluation.figures import make_figures
from covidscan.evaluation.metrics import METRIC_NAMES, MIN_BOOTSTRAP_UNITS, MIN_INTERVAL_UNITS
from covidscan.evaluation.schema import to_jsonable, validate_metrics_schema, write_metrics
from covidscan.outputs import write_csv

if TYPE_CHECKING:
    from covidscan.preprocess import PreparedSet

METRIC_LABELS: dict[str, str] = {
    "accuracy": "accuracy",
    "precision": "precision (positive predictive value)",
    "recall": "sensitivity (recall)",
    "specificity": "specificity",
    "f1": "F1 score",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "ece": "ECE (calibration error, lower is better)",
    "brier": "Brier score (lower is better)",
}


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _count(entry: Mapping[str, Any]) -> str:
    """``7 patients`` / ``1 image``: the units an interval rests on (empty for files without the count)."""
    n, unit = entry.get("ci_n"), entry.get("ci_unit", "")
    return "" if n is None else f"{n} {unit[:-1] if n == 1 else unit}"


def _ci(entry: Mapping[str, Any]) -> str:
    """The interval column: ``0.646 – 1.000 (Wilson, 7 patients)``, ``n/a (too few: 4 patients)`` or n/a."""
    low, high = entry["ci95"]
    count = _count(entry)
    if low is None or high is None:
        return f"n/a (too few: {count})" if entry.get("ci_method") == "too few" else "n/a"
    method = {"wilson": "Wilson", "shifted percentile": "bootstrap, bias-shifted",
              "percentile": "bootstrap"}.get(entry.get("ci_method", ""), "")
    detail = ", ".join(part for part in (method, count) if part)
    return f"{low:.3f} – {high:.3f}" + (f" ({detail})" if detail else "")


def format_value_ci(entry: Mapping[str, Any]) -> str:
    """One metrics.json entry as ``1.000 (95% CI 0.646–1.000, 7 patients)``; ``n/a`` when undefined.

    An entry the evaluation gave no interval (too few units) reads ``0.085 (no CI: too few, 4 patients)``;
    entries of older metrics.json files, which lack the count, read ``0.912 (0.850 – 0.960)``.
    """
    if entry["value"] is None:
        return "n/a"
    low, high = entry["ci95"]
    count = _count(entry)
    if low is None or high is None:
        return _num(entry["value"]) + (f" (no CI: too few, {count})" if entry.get("ci_method") == "too few"
                                       else "")
    if not count:
        return f"{_num(entry['value'])} ({low:.3f} – {high:.3f})"
    return f"{_num(entry['value'])} (95% CI {low:.3f}–{high:.3f}, {count})"


def _metric_table(block: Mapping[str, Any]) -> str:
    rows = ["| metric | value | 95% CI |", "|---|---|---|"]
    for name in METRIC_NAMES:
        entry = block["metrics"][name]
        rows.append(f"| {METRIC_LABELS[name]} | {_num(entry['value'])} | {_ci(entry)} |")
    return "\n".join(rows)


def _confusion_table(cm: Sequence[Sequence[int]]) -> str:
    (tn, fp), (fn, tp) = cm
    return "\n".join([
        "| | predicted non_covid | predicted covid |",
        "|---|---|---|",
        f"| **true non_covid** | {tn} (true negatives) | {fp} (false alarms) |",
        f"| **true covid** | {fn} (missed) | {tp} (true positives) |",
    ])


def _heading(block: Mapping[str, Any], unit: str) -> str:
    patients = "" if block["n_patients"] is None else f", {block['n_patients']} patients"
    return f"{unit}: {block['n_images']} images{patients}, threshold p(covid) >= {block['threshold']:.3f}"


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown tables (metric, value, 95% CI and the confusion matrix; patient level when present)."""
    validate_metrics_schema(metrics)
    parts = [_heading(metrics, "Image level"), "", _metric_table(metrics), "", _confusion_table(
        metrics["confusion_matrix"])]
    patient = metrics["patient_level"]
    if patient is not None:
        unit = f"Patient level ({patient.get('aggregation', 'mean')} of images)"
        parts += ["", _heading(patient, unit), "", _metric_table(patient), "",
                  _confusion_table(patient["confusion_matrix"])]
    return "\n".join(parts)


def _per_100(entry: Mapping[str, Any]) -> tuple[int, str]:
    value, (low, high) = entry["value"], entry["ci95"]
    count = _count(entry)
    interval = "" if low is None or high is None else (
        f" (95% CI {round(100 * low)}–{round(100 * high)}{', ' + count if count else ''})")
    return round(100 * value), interval


def _plain_words(block: Mapping[str, Any], unit: str) -> list[str]:
    m = block["metrics"]
    (tn, fp), (fn, tp) = block["confusion_matrix"]
    lines = []
    if m["recall"]["value"] is None:
        lines.append(f"Sensitivity cannot be measured here: there are no COVID {unit} in this set.")
    else:
        n, ci = _per_100(m["recall"])
        lines.append(f"**Sensitivity:** out of 100 COVID {unit}, about **{n}** are flagged as COVID{ci} "
                     f"and about {100 - n} are missed ({tp} of {tp + fn} here).")
    if m["specificity"]["value"] is None:
        lines.append(f"Specificity cannot be measured here: there are no non-COVID {unit} in this set.")
    else:
        n, ci = _per_100(m["specificity"])
        lines.append(f"**Specificity:** out of 100 non-COVID {unit}, about **{n}** are correctly not flagged"
                     f"{ci} and about {100 - n} raise a false alarm ({fp} of {tn + fp} here).")
    if m["precision"]["value"] is not None:
        n, _ = _per_100(m["precision"])
        prevalence = round(100 * (tp + fn) / (tn + fp + fn + tp))
        lines.append(f"**When the model flags a case**, it is COVID about {n} times out of 100 in this set. "
                     f"This depends on how common COVID is ({prevalence}% of {unit} here): where COVID is "
                     "rarer, a larger share of flags will be false alarms.")
    ece = m["ece"]["value"]
    if ece is not None:
        lines.append(f"**Calibration:** the stated COVID probabilities are off by about {100 * ece:.0f} "
                     f"percentage points on average (ECE {ece:.3f}).")
    return lines


def _method_lines(metrics: Mapping[str, Any]) -> list[str]:
    method = metrics.get("threshold_method")
    how = f"chosen on the validation set by the {method!r} rule" if method else (
        "supplied by the caller (it must have been chosen on validation data, not on these images)")
    lines = [f"An image counts as COVID when p(covid) >= {metrics['threshold']:.3f}; this threshold was "
             f"{how}, never tuned on the test images."]
    n_boot = metrics.get("n_bootstrap")
    if n_boot:
        if metrics.get("bootstrap_unit", "image") == "patient":
            lines.append(f"95% confidence intervals come from a bootstrap with {n_boot} resamples of "
                         "patients (all images of a drawn patient are taken together, because images of "
                         "one patient are not independent).")
        else:
            lines.append(f"95% confidence intervals come from a bootstrap with {n_boot} resamples of images. "
                         "No patient ids were given, so if several images come from one patient these "
                         "intervals are too narrow.")
        if "ci_method" in metrics["metrics"]["accuracy"]:
            lines.append(
                "Each interval names the number of units it rests on. Shares (accuracy, sensitivity, "
                "specificity, precision) use the bootstrap's percentiles, except over fewer than "
                f"{MIN_BOOTSTRAP_UNITS} units, at 0% or 100%, or when the bootstrap has no spread: there "
                "they use the Wilson score interval on the units (a patient's images count once), which "
                "does not collapse to a point. F1, the AUCs, ECE and Brier use the bootstrap's spread around "
                "the estimate (percentiles shifted by the resamples' median bias, so the estimate is "
                f"inside), and no interval at all (\"too few\") over fewer than {MIN_INTERVAL_UNITS} units.")
        used = metrics.get("n_bootstrap_used", {})
        skipped = [f"{name} ({used[name]} of {n_boot})" for name in METRIC_NAMES
                   if name in used and used[name] < n_boot]
        if skipped:
            lines.append("Resamples where a metric was undefined (e.g. only one class drawn) were skipped; "
                         "resamples used: " + ", ".join(skipped) + ".")
    else:
        lines.append("No bootstrap was run, so no confidence intervals are given.")
    temperature = metrics.get("temperature")
    if temperature is not None:
        lines.append(f"Probabilities were calibrated by temperature scaling (T = {temperature:.3f}, fitted "
                     "on the validation set by minimising log-loss, then applied unchanged to validation "
                     "and test).")
    else:
        lines.append("No temperature scaling was applied (probabilities are the model's own).")
    lines.append(f"ECE uses {metrics.get('n_bins', 15)} equal-width bins of p(covid): the image-weighted "
                 "mean gap between predicted probability and observed COVID fraction per bin.")
    if metrics["patient_level"] is not None:
        aggregation = metrics["patient_level"].get("aggregation", "mean")
        lines.append(f"Patient level: the {aggregation} of a patient's image probabilities is that "
                     "patient's probability; the patient's label is the label of its images.")
    return lines


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    metrics: Mapping[str, Any],
    figures: Mapping[str, str | Path],
    config: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``out_dir/report.md``: plain-words summary, tables, figures (relative links), method, notes,
    config. Returns the report path."""
    metrics = to_jsonable(metrics)
    validate_metrics_schema(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patient = metrics["patient_level"]
    parts = [f"# {title}", "", _heading(metrics, "Test set") + ".", "", "## In plain words", ""]
    parts += [f"- {line}" for line in _plain_words(metrics, "images")]
    if patient is not None:
        parts += ["", "Per patient:", ""] + [f"- {line}" for line in _plain_words(patient, "patients")]
    parts += ["", "## Image-level results", "", _metric_table(metrics), "", "### Confusion matrix", "",
              _confusion_table(metrics["confusion_matrix"])]
    if patient is not None:
        parts += ["", "## Patient-level results", "", _heading(patient, "Patients") + ".", "",
                  _metric_table(patient), "", "### Confusion matrix (patients)", "",
                  _confusion_table(patient["confusion_matrix"])]
    if figures:
        parts += ["", "## Figures"]
        for name, fig_path in figures.items():
            link = Path(os.path.relpath(Path(fig_path).resolve(), out.resolve())).as_posix()
            missing = "" if Path(fig_path).is_file() else " (file missing)"
            parts += ["", f"### {name.replace('_', ' ')}{missing}", "", f"![{name}]({link})"]
    parts += ["", "## How this was evaluated", ""] + [f"- {line}" for line in _method_lines(metrics)]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    if config:
        parts += ["", "## Configuration", "", "```yaml",
                  yaml.safe_dump(to_jsonable(config), sort_keys=False).rstrip(), "```"]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


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
