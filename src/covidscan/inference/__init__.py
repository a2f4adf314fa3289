"""Prediction with a trained run: the :class:`Predictor` and the ``covidscan predict`` driver over it."""

from __future__ import annotations

from covidscan.inference.evaluate import evaluate_run
from covidscan.inference.predict import (
    check_output,
    collect_inputs,
    predict,
    prediction_table,
    write_predictions,
)
from covidscan.inference.predictor import Engine, GroupPrediction, Prediction, Predictor, Source

__all__ = [
    "Engine",
    "GroupPrediction",
    "Prediction",
    "Predictor",
    "Source",
    "check_output",
    "collect_inputs",
    "evaluate_run",
    "predict",
    "prediction_table",
    "write_predictions",
]
