"""One-call evaluations that produce the metrics.json dict (see ``covidscan.evaluation.schema``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit

from covidscan.evaluation._checks import as_floats, as_labels, check_choice, group_codes
from covidscan.evaluation.calibration import Calibration
from covidscan.evaluation.metrics import (
    AGGREGATIONS,
    DEFAULT_BINS,
    METRIC_NAMES,
    aggregate_by_patient,
    check_threshold,
    confidence_intervals,
    confusion,
    expected_calibration_error,
    point_metrics,
)

Array = Sequence[Any] | np.ndarray


def _block(y: np.ndarray, p: np.ndarray, groups: Array | None, n_patients: int | None, threshold: float,
           n_boot: int, seed: int, n_bins: int, unit: str | None = None) -> dict[str, Any]:
    values = point_metrics(y, p, threshold=threshold, n_bins=n_bins)
    cis = confidence_intervals(y, p, threshold=threshold, groups=groups, unit=unit, n_boot=n_boot, seed=seed,
                               n_bins=n_bins)
    return {
        "n_images": int(y.size),
        "n_patients": n_patients,
        "threshold": threshold,
        "metrics": {name: cis[name].entry(values[name]) for name in METRIC_NAMES},
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
    """Image-level (and, with patient ids, patient-level) metrics with 95% CIs from the patient bootstrap
    (see ``confidence_intervals``: Wilson intervals for proportions on few units, each with its count).

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
        level = _block(pat.y, pat.p, None, len(pat.y), p_threshold, n_boot, seed, n_bins, "patients")
        level["n_images"] = int(y.size)
        result["patient_level"] = level | {"aggregation": aggregate}
    return result


def evaluate_calibrated(
    calibration: Calibration,
    y_test: Array,
    z_test: Array,
    *,
    y_val: Array | None = None,
    z_val: Array | None = None,
    groups_test: Array | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Test metrics of binary logits under a :class:`Calibration` fitted elsewhere (on validation).

    Adds ``temperature``, ``threshold_method``, ``calibration`` (test ECE before scaling, validation ECE
    before/after when ``y_val``/``z_val`` are given, and the fitting ``notes``) and ``fitted_calibration``.
    """
    y_t = as_labels(y_test, "y_test")
    z_t = as_floats(z_test, y_t.size, "z_test", unit_interval=False)
    result = evaluate_predictions(
        y_t, calibration.proba(z_t), threshold=calibration.threshold, groups=groups_test, n_boot=n_boot,
        seed=seed, aggregate=calibration.aggregate, patient_threshold=calibration.patient_threshold,
        n_bins=n_bins,
    )
    ece: dict[str, Any] = {"ece_test_before": expected_calibration_error(y_t, expit(z_t), n_bins=n_bins)}
    if y_val is not None and z_val is not None:
        y_v = as_labels(y_val, "y_val")
        z_v = as_floats(z_val, y_v.size, "z_val", unit_interval=False)
        ece["ece_val_before"] = expected_calibration_error(y_v, expit(z_v), n_bins=n_bins)
        ece["ece_val_after"] = expected_calibration_error(y_v, calibration.proba(z_v), n_bins=n_bins)
    result["temperature"] = calibration.temperature
    result["threshold_method"] = calibration.method
    result["calibration"] = ece | {"notes": list(calibration.notes)}
    result["fitted_calibration"] = calibration.model_dump(mode="json")
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

    1. fit a :class:`Calibration` on validation (temperature, then image and, with ``groups_val``, patient
    thresholds on calibrated validation probabilities), 2. evaluate test with :func:`evaluate_calibrated`.
    Test labels are used in step 2 only. ``temperature`` is None when not calibrated.
    """
    grouped = groups_val is not None and groups_test is not None
    fitted = Calibration.fit(
        z_val, y_val, groups=groups_val if grouped else None, calibrate=calibrate, method=threshold_method,
        fixed_threshold=threshold_value, aggregate=aggregate,
    )
    result = evaluate_calibrated(fitted, y_test, z_test, y_val=y_val, z_val=z_val,
                                 groups_test=groups_test, n_boot=n_boot, seed=seed,
                                 n_bins=n_bins)
    if not calibrate:
        result["temperature"] = None
    return result
