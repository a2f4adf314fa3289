"""Calibration: reliability bins, expected calibration error (ECE) and temperature scaling.

Everything here treats the model as a binary classifier with ``p = p(covid)``:

* **ECE** uses ``n_bins`` equal-width bins over [0, 1] (bin k holds ``k/n <= p < (k+1)/n``; the last bin
  also holds ``p == 1``) and is ``sum_k (n_k / N) * |mean(y in bin k) - mean(p in bin k)|``. This is the
  binary ECE on the covid probability, not the "top-label confidence" ECE of Guo et al. (2017); for two
  classes the two differ, and this one keeps the direction of the covid probability readable.
* **Temperature scaling** rescales the binary logit ``z = logit_covid - logit_non_covid`` to ``z / T``.
  With a 2-way softmax this is exactly the same as dividing both logits by ``T``. ``T`` is fitted on the
  validation set only (minimum negative log-likelihood) and then applied unchanged to validation and test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.metrics import brier_score_loss

from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation._checks import as_floats, as_labels

DEFAULT_BINS = 15
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)


def check_bins(n_bins: int) -> int:
    """``n_bins`` as an int >= 1; ConfigError otherwise."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins={n_bins!r} must be a positive integer (15 is the usual choice)")
    return int(n_bins)


def bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability (0..n_bins-1); ``p == 1`` goes into the last bin."""
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, *, n_bins: int = DEFAULT_BINS
) -> dict[str, np.ndarray]:
    """Per-bin ``edges`` (n_bins+1), ``counts``, ``mean_p`` and ``frac_covid`` (NaN for empty bins)."""
    y = as_labels(y_true)
    pv = as_floats(p, y.size, "p", unit_interval=True)
    n_bins = check_bins(n_bins)
    idx = bin_index(pv, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=pv, minlength=n_bins) / counts
        frac = np.bincount(idx, weights=y, minlength=n_bins) / counts
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"edges": edges, "counts": counts, "mean_p": mean_p, "frac_covid": frac}


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray, *, n_bins: int = DEFAULT_BINS
) -> float:
    """Binary ECE of ``p(covid)`` with equal-width bins (see the module docstring)."""
    bins = reliability_bins(y_true, p, n_bins=n_bins)
    used = bins["counts"] > 0
    weights = bins["counts"][used] / bins["counts"].sum()
    return float(np.sum(weights * np.abs(bins["frac_covid"][used] - bins["mean_p"][used])))


def brier_score(y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Mean squared error between ``p(covid)`` and the 0/1 label (sklearn's ``brier_score_loss``)."""
    y = as_labels(y_true)
    pv = as_floats(p, y.size, "p", unit_interval=True)
    # labels=[0, 1] keeps the score defined on one-class sets (e.g. an all-non_covid external check).
    return float(brier_score_loss(y, pv, labels=[0, 1]))


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
