"""Prediction with a trained run: the :class:`Predictor` and the ``covidscan predict`` driver over it."""

from __future__ import annotations

from covidscan.inference.evaluate import evaluate_many, evaluate_run
from covidscan.inference.predict import (
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
    "collect_inputs",
    "evaluate_many",
    "evaluate_run",
    "predict",
    "prediction_table",
    "write_predictions",
]
