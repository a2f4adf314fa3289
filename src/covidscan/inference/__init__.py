"""Prediction with a trained run: images in, calibrated probabilities, labels and warnings out."""

from __future__ import annotations

from covidscan.inference.checks import input_warnings
from covidscan.inference.fast import FastClassifier, bf16_supported, check_bf16, to_batch
from covidscan.inference.predict import predict, write_predictions

__all__ = [
    "FastClassifier",
    "bf16_supported",
    "check_bf16",
    "input_warnings",
    "predict",
    "to_batch",
    "write_predictions",
]
