"""Honest evaluation: metrics with patient-bootstrap confidence intervals, calibration, validation-chosen
thresholds, patient-level aggregation, metrics.json, figures and report.md.

Labels are 0/1 with 1 = covid; ``p`` is p(covid); ``z = logit_covid - logit_non_covid``.
"""

from __future__ import annotations

from covidscan.evaluation.calibration import (
    MIN_CALIBRATION_IMAGES,
    Calibration,
    apply_temperature,
    fit_temperature,
)
from covidscan.evaluation.evaluate import evaluate_calibrated, evaluate_from_logits, evaluate_predictions
from covidscan.evaluation.figures import (
    make_figures,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_sample_grid,
    plot_training_curves,
)
from covidscan.evaluation.metrics import (
    AGGREGATIONS,
    METRIC_NAMES,
    THRESHOLD_METHODS,
    BootstrapCI,
    PatientPredictions,
    aggregate_by_patient,
    bootstrap_ci,
    brier_score,
    choose_threshold,
    confusion,
    expected_calibration_error,
    point_metrics,
    reliability_bins,
)
from covidscan.evaluation.model_card import render_model_card, write_model_card
from covidscan.evaluation.report import (
    excluded_notes,
    format_metrics_table,
    format_value_ci,
    write_evaluation,
    write_report,
)
from covidscan.evaluation.schema import (
    MetricsSchemaError,
    read_metrics,
    to_jsonable,
    validate_metrics_schema,
    write_metrics,
)
from covidscan.evaluation.shift import (
    ALARM_LEVEL,
    ShiftResult,
    ShiftTest,
    shift_features,
    two_sample_test,
)
from covidscan.evaluation.site import (
    LocalFigures,
    SiteRules,
    course,
    course_plot,
    local_figures,
    site_status,
    teaching_order,
)

__all__ = [
    "AGGREGATIONS",
    "ALARM_LEVEL",
    "METRIC_NAMES",
    "MIN_CALIBRATION_IMAGES",
    "THRESHOLD_METHODS",
    "BootstrapCI",
    "Calibration",
    "LocalFigures",
    "MetricsSchemaError",
    "PatientPredictions",
    "ShiftResult",
    "ShiftTest",
    "SiteRules",
    "aggregate_by_patient",
    "apply_temperature",
    "bootstrap_ci",
    "brier_score",
    "choose_threshold",
    "confusion",
    "course",
    "course_plot",
    "evaluate_calibrated",
    "evaluate_from_logits",
    "evaluate_predictions",
    "excluded_notes",
    "expected_calibration_error",
    "fit_temperature",
    "format_metrics_table",
    "format_value_ci",
    "local_figures",
    "make_figures",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_roc",
    "plot_sample_grid",
    "plot_training_curves",
    "point_metrics",
    "read_metrics",
    "reliability_bins",
    "render_model_card",
    "shift_features",
    "site_status",
    "teaching_order",
    "to_jsonable",
    "two_sample_test",
    "validate_metrics_schema",
    "write_evaluation",
    "write_metrics",
    "write_model_card",
    "write_report",
]
