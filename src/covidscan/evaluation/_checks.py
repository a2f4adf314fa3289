"""Input checks shared by the evaluation modules: labels, probabilities, logits and patient ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from covidscan.errors import ConfigError, ManifestError


def as_labels(y_true: Sequence[int] | np.ndarray, name: str = "y_true") -> np.ndarray:
    """0/1 labels (1 = covid) as an int64 vector; anything else raises ManifestError."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ManifestError(f"{name} must be a non-empty 1-D array of 0/1 labels, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise ManifestError(
            f"{name} must hold 0/1 labels (1 = covid); got values like {y[:3].tolist()} "
            "(map label names with CLASSES.index first)"
        ) from None
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        raise ManifestError(
            f"{name} must hold only 0 (non_covid) and 1 (covid); {int(bad.sum())} entries are not, "
            f"e.g. {y[bad][:3].tolist()}"
        )
    return yf.astype(np.int64)


def as_floats(values: Sequence[float] | np.ndarray, n: int, name: str, *, unit_interval: bool) -> np.ndarray:
    """A finite float64 vector of length ``n`` (probabilities when ``unit_interval``)."""
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ManifestError(f"{name} must be numbers, got {type(values).__name__}") from None
    if v.shape != (n,):
        raise ManifestError(f"{name} has shape {v.shape} but the labels have {n} entries; pass one per image")
    if not np.isfinite(v).all():
        raise ManifestError(f"{name} has {int((~np.isfinite(v)).sum())} NaN/inf entries; drop those images")
    if unit_interval and ((v < 0).any() or (v > 1).any()):
        raise ManifestError(
            f"{name} must be probabilities in [0, 1]; got range [{v.min():.3g}, {v.max():.3g}] "
            "(pass sigmoid of the logit, or use the logit-based functions)"
        )
    return v


def group_codes(groups: Sequence[object] | np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Integer patient codes 0..G-1 for ``n`` images, and G.

    ``groups=None`` makes every image its own unit; a None/NaN id also makes that image its own group,
    because an unknown patient cannot be assumed to share anything with another one.
    """
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups, dtype=object)
    if g.shape != (n,):
        raise ManifestError(f"groups (patient ids) has shape {g.shape}; pass one id per image ({n})")
    codes, uniques = pd.factorize(pd.Series(g), use_na_sentinel=True)
    missing = codes < 0
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return codes.astype(np.int64), len(uniques) + int(missing.sum())


def check_choice(value: str, choices: Sequence[str], setting: str) -> str:
    """``value`` when it is one of ``choices``; ConfigError naming the setting otherwise."""
    if value not in choices:
        raise ConfigError(f"{setting}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value
