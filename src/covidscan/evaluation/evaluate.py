"""One-call evaluations that produce the metrics.json dict (see ``covidscan.evaluation.schema``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit

from covidscan.evaluation._checks import as_floats, as_labels, check_choice, group_codes
from covidscan.evaluation.calibration import (
    DEFAULT_BINS,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from covidscan.evaluation.metrics import (
    AGGREGATIONS,
    METRIC_NAMES,
    aggregate_by_patient,
    bootstrap_ci,
    check_threshold,
    choose_threshold,
    confusion,
    point_metrics,
)

Array = Sequence[Any] | np.ndarray


def _block(y: np.ndarray, p: np.ndarray, groups: Array | None, n_patients: int | None, threshold: float,
           n_boot: int, seed: int, n_bins: int) -> dict[str, Any]:
    values = point_metrics(y, p, threshold=threshold, n_bins=n_bins)
    cis = bootstrap_ci(y, p, threshold=threshold, groups=groups, n_boot=n_boot, seed=seed, n_bins=n_bins)
    return {
        "n_images": int(y.size),
        "n_patients": n_patients,
        "threshold": threshold,
        "metrics": {
            name: {"value": values[name], "ci95": [cis[name].low, cis[name].high]} for name in METRIC_NAMES
        },
        "confusion_matrix": confusion(y, p, threshold).tolist(),
        "class_counts": {"non_covid": int((y == 0).sum()), "covid": int(y.sum())},
        "n_bootstrap_used": {name: cis[name].n_used for name in METRIC_NAMES},
    }


def evaluate_predictions(
    y_true: Array,
    p: Array,
    *,
    threshold: float,
    groups: Array | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    aggregate: str = "mean",
    patient_threshold: float | None = None,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Image-level (and, with patient ids, patient-level) metrics with patient-bootstrap 95% CIs.

    ``threshold`` must come from validation data (see ``choose_threshold``). With ``groups`` the bootstrap
    resamples patients and ``patient_level`` holds the metrics of per-patient probabilities combined by
    ``aggregate``, thresholded at ``patient_threshold`` (default: ``threshold``); without ``groups`` the
    images are the resampling units and ``patient_level`` is None. Returns the metrics.json dict, plus
    the extra keys ``n_bootstrap``, ``seed``, ``bootstrap_unit``, ``n_bins``, ``aggregation``,
    ``class_counts`` and ``n_bootstrap_used`` (per metric: resamples where it was defined).
    """
    y = as_labels(y_true)
    pv = as_floats(p, y.size, "p", unit_interval=True)
    threshold = check_threshold(threshold)
    check_choice(aggregate, AGGREGATIONS, "aggregate")
    n_patients = group_codes(groups, y.size)[1] if groups is not None else None
    result = _block(y, pv, groups, n_patients, threshold, n_boot, seed, n_bins)
    result |= {
        "patient_level": None,
        "n_bootstrap": int(n_boot),
        "seed": int(seed),
        "bootstrap_unit": "patient" if groups is not None else "image",
        "n_bins": int(n_bins),
        "aggregation": aggregate if groups is not None else None,
    }
    if groups is not None:
        pat = aggregate_by_patient(y, pv, groups, how=aggregate)
        p_threshold = threshold if patient_threshold is None else check_threshold(patient_threshold)
        level = _block(pat.y, pat.p, None, len(pat.y), p_threshold, n_boot, seed, n_bins)
        level["n_images"] = int(y.size)
        result["patient_level"] = level | {"aggregation": aggregate}
    return result


def evaluate_from_logits(
    y_val: Array,
    z_val: Array,
    y_test: Array,
    z_test: Array,
    *,
    groups_val: Array | None = None,
    groups_test: Array | None = None,
    calibrate: bool = True,
    threshold_method: str = "youden",
    threshold_value: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    aggregate: str = "mean",
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """The whole honest protocol from binary logits ``z = logit_covid - logit_non_covid``.

    1. fit a temperature on validation (``calibrate``), 2. apply it to validation and test, 3. choose the
    threshold on calibrated validation probabilities (and, with ``groups_val``, the patient-level
    threshold on aggregated validation patients), 4. evaluate test with ``evaluate_predictions``.
    Test labels are used in step 4 only. Adds ``temperature`` (None when not calibrated),
    ``threshold_method`` and ``calibration`` (ECE of validation before/after and test before scaling).
    """
    y_v = as_labels(y_val, "y_val")
    z_v = as_floats(z_val, y_v.size, "z_val", unit_interval=False)
    y_t = as_labels(y_test, "y_test")
    z_t = as_floats(z_test, y_t.size, "z_test", unit_interval=False)
    temperature = fit_temperature(z_v, y_v) if calibrate else 1.0
    p_val, p_test = apply_temperature(z_v, temperature), apply_temperature(z_t, temperature)
    threshold = choose_threshold(y_v, p_val, threshold_method, threshold_value)
    patient_threshold = None
    if groups_val is not None and groups_test is not None:
        val_pat = aggregate_by_patient(y_v, p_val, groups_val, how=aggregate)
        patient_threshold = choose_threshold(val_pat.y, val_pat.p, threshold_method, threshold_value)
    result = evaluate_predictions(
        y_t, p_test, threshold=threshold, groups=groups_test, n_boot=n_boot, seed=seed,
        aggregate=aggregate, patient_threshold=patient_threshold, n_bins=n_bins,
    )
    result["temperature"] = temperature if calibrate else None
    result["threshold_method"] = threshold_method
    result["calibration"] = {
        "ece_val_before": expected_calibration_error(y_v, expit(z_v), n_bins=n_bins),
        "ece_val_after": expected_calibration_error(y_v, p_val, n_bins=n_bins),
        "ece_test_before": expected_calibration_error(y_t, expit(z_t), n_bins=n_bins),
    }
    return result
