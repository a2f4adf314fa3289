"""Calibration: temperature scaling and the fitted :class:`Calibration` (temperature, thresholds, band).

Temperature scaling rescales the binary logit ``z = logit_covid - logit_non_covid`` to ``z / T``. With a
2-way softmax this is exactly the same as dividing both logits by ``T``. ``T`` is fitted on the validation
set only (minimum negative log-likelihood) and then applied unchanged to validation and test. How well a
model is calibrated (ECE, Brier, reliability bins) is measured in :mod:`covidscan.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import minimize_scalar
from scipy.special import expit

from covidscan import CLASSES
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation._checks import as_floats, as_labels
from covidscan.evaluation.metrics import aggregate_by_patient, choose_threshold

TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    # -log p(y | z/T) for a Bernoulli with logit s, written to stay finite for large |s|.
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperature(
    z_val: Sequence[float] | np.ndarray,
    y_val: Sequence[int] | np.ndarray,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """Temperature ``T`` in ``bounds`` minimising the NLL of ``sigmoid(z_val / T)`` on the validation set.

    ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one. The search runs
    over ``log T`` (bounded Brent), so the result always lies inside ``bounds``.
    """
    y = as_labels(y_val, "y_val")
    z = as_floats(z_val, y.size, "z_val", unit_interval=False)
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ConfigError(f"temperature bounds {bounds!r} must satisfy 0 < low < high")
    if np.unique(y).size < 2:
        raise ManifestError(
            "cannot fit a temperature: the validation labels hold only one class; "
            "use a validation set with both covid and non_covid images, or skip calibration"
        )
    result = minimize_scalar(
        lambda log_t: _nll(z, y, float(np.exp(log_t))),
        bounds=(np.log(lo), np.log(hi)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.clip(np.exp(result.x), lo, hi))


def apply_temperature(z: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated ``p(covid) = sigmoid(z / T)`` for binary logits ``z``."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ConfigError(
            f"temperature={temperature!r} must be a positive number (fit it with fit_temperature)"
        )
    zv = as_floats(z, np.size(z), "z", unit_interval=False)
    return expit(zv / temperature)


MIN_CALIBRATION_IMAGES = 20
"""Fewer validation images than this are too few to fit a temperature: probabilities stay unscaled."""
_BOUND_MARGIN = 0.01  # a fitted temperature within 1% of a search bound is treated as having hit it


def _as_array(values: Any) -> np.ndarray:
    """numpy, torch (any device or dtype) or a sequence -> float64 numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


class Calibration(BaseModel):
    """Temperature scaling plus the operating point, fitted on validation data only.

    ``proba(z)`` is ``sigmoid(z / temperature)`` for binary logits ``z = logit_covid - logit_non_covid``
    (numpy, torch or ONNX outputs alike); ``label(p)`` thresholds at ``threshold``; ``uncertain(p)`` marks
    probabilities within ``band / 2`` of it. ``patient_threshold`` applies to the mean probability of a
    patient or series with more than one image (their ``aggregate``, mean or max). ``notes`` say where
    fitting fell back to a safe default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, gt=0)
    threshold: float = Field(0.5, ge=0, le=1)
    patient_threshold: float | None = Field(None, ge=0, le=1)
    band: float = Field(0.1, ge=0, lt=1)
    aggregate: Literal["mean", "max"] = "mean"
    method: str = "fixed"
    notes: tuple[str, ...] = ()

    @classmethod
    def fit(
        cls,
        z_val: Sequence[float] | np.ndarray,
        y_val: Sequence[int] | np.ndarray,
        *,
        groups: Sequence[object] | None = None,
        calibrate: bool = True,
        method: str = "youden",
        fixed_threshold: float = 0.5,
        aggregate: str = "mean",
        band: float = 0.1,
    ) -> Calibration:
        """Fit the temperature (NLL), then the image and patient thresholds on calibrated validation data.

        Falls back instead of producing nonsense: fewer than ``MIN_CALIBRATION_IMAGES`` images, one class
        only, or a temperature that ends on its search bound keep ``temperature = 1``; one class only also
        fixes the threshold at ``fixed_threshold``. Each fallback is recorded in ``notes``.
        """
        y = as_labels(y_val, "y_val")
        z = as_floats(_as_array(z_val), y.size, "z_val", unit_interval=False)
        notes: list[str] = []
        one_class = np.unique(y).size < 2
        temperature = 1.0
        if calibrate and one_class:
            notes.append("validation holds one class only: no temperature scaling")
        elif calibrate and y.size < MIN_CALIBRATION_IMAGES:
            notes.append(
                f"validation has {y.size} images (< {MIN_CALIBRATION_IMAGES}): no temperature scaling"
            )
        elif calibrate:
            fitted = fit_temperature(z, y)
            low, high = TEMPERATURE_BOUNDS
            if fitted <= low * (1 + _BOUND_MARGIN):
                notes.append(
                    f"fitted temperature {fitted:.3g} hit its lower bound {low}: validation is perfectly "
                    "separated, so no temperature can be estimated from it; no temperature scaling"
                )
            elif fitted >= high * (1 - _BOUND_MARGIN):
                notes.append(
                    f"fitted temperature {fitted:.3g} hit its upper bound {high}: the validation logits "
                    "carry almost no information about the labels; no temperature scaling"
                )
            else:
                temperature = fitted
        if one_class and method != "fixed":
            notes.append(f"validation holds one class only: threshold fixed at {fixed_threshold}")
            method = "fixed"
        p = expit(z / temperature)
        threshold = choose_threshold(y, p, method, fixed_threshold)
        patient_threshold = None
        if groups is not None:
            patients = aggregate_by_patient(y, p, groups, how=aggregate)
            patient_threshold = choose_threshold(patients.y, patients.p, method, fixed_threshold)
        return cls(temperature=temperature, threshold=threshold, patient_threshold=patient_threshold,
                   band=band, aggregate=aggregate, method=method, notes=tuple(notes))

    def proba(self, z: Any) -> np.ndarray:
        """Calibrated P(covid) of binary logits (numpy, torch tensor or sequence)."""
        return expit(_as_array(z) / self.temperature)

    def label(self, p: Any, *, threshold: float | None = None) -> np.ndarray:
        """Class names (``covid`` where ``p >= threshold``, default the image threshold)."""
        cut = self.threshold if threshold is None else threshold
        return np.where(_as_array(p) >= cut, CLASSES[1], CLASSES[0])

    def uncertain(self, p: Any) -> np.ndarray:
        """True where ``p`` lies within ``band / 2`` of the threshold (never with ``band == 0``)."""
        return np.abs(_as_array(p) - self.threshold) < self.band / 2

    def group_threshold(self, n_images: int) -> float:
        """The threshold for a group's mean probability: a single image keeps the image threshold.

        A one-image "patient" is that image, so it must never get a label that contradicts its own.
        """
        if n_images > 1 and self.patient_threshold is not None:
            return self.patient_threshold
        return self.threshold
