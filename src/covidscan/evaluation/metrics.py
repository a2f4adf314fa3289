"""Binary metrics for covid (1) vs non_covid (0), patient-level aggregation, threshold choice, the patient
(cluster) bootstrap and the confidence intervals reported from it (:func:`confidence_intervals`).

Definitions follow scikit-learn; an image is predicted covid when ``p >= threshold``. A metric that is
undefined on the data (e.g. sensitivity with no covid cases, ROC AUC with one class) is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation._checks import as_floats, as_labels, check_choice, group_codes

DEFAULT_BINS = 15
"""Equal-width bins of the calibration error and the reliability diagram.

The ECE is ``sum_k (n_k / N) * |mean(y in bin k) - mean(p in bin k)|`` over ``n_bins`` equal-width bins of
[0, 1] (bin k holds ``k/n <= p < (k+1)/n``; the last bin also holds ``p == 1``): the binary ECE on the covid
probability, not the "top-label confidence" ECE of Guo et al. (2017); for two classes the two differ, and
this one keeps the direction of the covid probability readable.
"""


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
    """Binary ECE of ``p(covid)`` with equal-width bins (see ``DEFAULT_BINS``)."""
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


METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "roc_auc",
    "pr_auc",
    "ece",
    "brier",
)
PROPORTIONS: tuple[str, ...] = ("accuracy", "precision", "recall", "specificity")
"""Metrics that are a share of units (images or patients), which get binomial intervals when few."""
CI_METHODS: tuple[str, ...] = ("percentile", "wilson", "shifted percentile", "too few", "none")
"""How an interval in metrics.json was made (``ci_method``); see :func:`confidence_intervals`."""
MIN_BOOTSTRAP_UNITS = 30
"""A proportion over fewer units than this gets a Wilson interval: the percentile bootstrap is too narrow."""
MIN_INTERVAL_UNITS = 10
"""Fewer units than this (fewer than half as many of the smaller class for ROC/PR AUC) and F1, AUCs, ECE and
Brier get no interval ("too few") rather than one the bootstrap cannot support."""
THRESHOLD_METHODS: tuple[str, ...] = ("youden", "f1", "fixed")
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "noisy_or")
# Bootstrap work is done in chunks of resamples so that no (resamples x images) array exceeds this size.
_CHUNK_CELLS = 2_000_000


def check_threshold(threshold: float, setting: str = "threshold") -> float:
    """``threshold`` as a float in [0, 1]; ConfigError otherwise."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting}={threshold!r} must be a number in [0, 1]") from None
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"{setting}={threshold!r} must be a probability in [0, 1]")
    return t


Labels = Sequence[int] | np.ndarray
Probs = Sequence[float] | np.ndarray


def _inputs(y_true: Labels, p: Probs) -> tuple[np.ndarray, np.ndarray]:
    y = as_labels(y_true)
    return y, as_floats(p, y.size, "p", unit_interval=True)


def confusion(y_true: Labels, p: Probs, threshold: float) -> np.ndarray:
    """2x2 confusion matrix ``[[tn, fp], [fn, tp]]`` (sklearn convention, labels [0, 1])."""
    y, pv = _inputs(y_true, p)
    pred = (pv >= check_threshold(threshold)).astype(np.int64)
    return confusion_matrix(y, pred, labels=[0, 1])


def point_metrics(
    y_true: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, float | None]:
    """Every metric in METRIC_NAMES on the given images (no confidence interval); None when undefined."""
    y, pv = _inputs(y_true, p)
    pred = (pv >= check_threshold(threshold)).astype(np.int64)
    both_classes = y.min() != y.max()
    # zero_division=nan marks "undefined" (e.g. no predicted positives) instead of silently reporting 0.
    values: dict[str, float | None] = {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, labels=[0, 1], zero_division=np.nan),
        "recall": recall_score(y, pred, labels=[0, 1], zero_division=np.nan),
        "specificity": recall_score(y, pred, labels=[0, 1], pos_label=0, zero_division=np.nan),
        "f1": f1_score(y, pred, labels=[0, 1], zero_division=np.nan),
        "roc_auc": roc_auc_score(y, pv) if both_classes else None,
        "pr_auc": average_precision_score(y, pv) if both_classes else None,
        "ece": expected_calibration_error(y, pv, n_bins=n_bins),
        "brier": brier_score(y, pv),
    }
    return {k: (None if v is None or np.isnan(v) else float(v)) for k, v in values.items()}


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile 95% interval of one metric over the bootstrap resamples where it was defined."""

    low: float | None
    high: float | None
    n_used: int


class _ResampleStats:
    """Per-patient sums from which every metric of a resample follows by a weighted sum over patients.

    A cluster-bootstrap resample is a vector of patient multiplicities ``w`` (how often each patient was
    drawn). Threshold metrics, ECE and Brier are sums over images, so they only need ``w @ per_patient``.
    ROC AUC and average precision are computed from image weights ``w[patient]`` on the images sorted by
    score once; they equal sklearn's ``roc_auc_score`` / ``average_precision_score`` with
    ``sample_weight`` (tests check this), i.e. the metrics of the resampled images.
    """

    def __init__(self, y: np.ndarray, p: np.ndarray, codes: np.ndarray, n_groups: int, threshold: float,
                 n_bins: int) -> None:
        cell = 2 * y + (p >= threshold)  # 0 = tn, 1 = fp, 2 = fn, 3 = tp
        self.cells = np.bincount(codes * 4 + cell, minlength=4 * n_groups).reshape(n_groups, 4).astype(float)
        self.n_images = np.bincount(codes, minlength=n_groups).astype(float)
        # ECE of a resample is sum_k |sum_bin_k (y - p)| / N, so per-patient, per-bin sums of y - p suffice.
        self.bin_gap = np.bincount(
            codes * n_bins + bin_index(p, n_bins), weights=y - p, minlength=n_groups * n_bins
        ).reshape(n_groups, n_bins)
        self.sq_err = np.bincount(codes, weights=(p - y) ** 2, minlength=n_groups)
        order = np.argsort(-p, kind="stable")
        self.sorted_codes = codes[order]
        self.sorted_y = y[order].astype(float)
        sorted_p = p[order]
        self.level_starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])

    def metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Metric values (NaN where undefined) for resamples given as patient multiplicities ``w`` (B x G)."""
        tn, fp, fn, tp = (w @ self.cells).T
        n = w @ self.n_images
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {
                "accuracy": (tp + tn) / n,
                "precision": tp / (tp + fp),
                "recall": tp / (tp + fn),
                "specificity": tn / (tn + fp),
                "f1": 2 * tp / (2 * tp + fp + fn),
                "ece": np.abs(w @ self.bin_gap).sum(axis=1) / n,
                "brier": (w @ self.sq_err) / n,
            }
            out.update(self._ranking(w))
        return out

    def _ranking(self, w: np.ndarray) -> dict[str, np.ndarray]:
        image_w = w[:, self.sorted_codes]
        pos_w = image_w * self.sorted_y
        # Weights per distinct score, highest score first (tied scores form one ROC/PR step, as in sklearn).
        pos = np.add.reduceat(pos_w, self.level_starts, axis=1)
        neg = np.add.reduceat(image_w - pos_w, self.level_starts, axis=1)
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        neg_at_or_above = np.cumsum(neg, axis=1)
        tp_at = np.cumsum(pos, axis=1)
        # AUC = P(score_pos > score_neg) + 0.5 P(tie), the trapezoidal area under the ROC curve.
        below = n_neg[:, None] - neg_at_or_above
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        flagged = tp_at + neg_at_or_above
        precision = np.divide(tp_at, flagged, out=np.zeros_like(tp_at), where=flagged > 0)
        # Average precision = sum over score levels of (recall step) x (precision at that level).
        ap = (pos * precision).sum(axis=1) / n_pos
        undefined = (n_pos == 0) | (n_neg == 0)
        return {"roc_auc": np.where(undefined, np.nan, auc), "pr_auc": np.where(undefined, np.nan, ap)}

    def units(self) -> dict[str, int]:
        """How many units (patients or images) each metric is computed over: its denominator's units."""
        tn, fp, fn, tp = (self.cells > 0).T
        every = len(self.cells)
        return {"accuracy": every, "precision": int((tp | fp).sum()), "recall": int((tp | fn).sum()),
                "specificity": int((tn | fp).sum()), "f1": int((tp | fp | fn).sum()), "roc_auc": every,
                "pr_auc": every, "ece": every, "brier": every}

    def class_units(self) -> int:
        """Units in the smaller class (covid or non_covid): what limits ROC and PR AUC."""
        tn, fp, fn, tp = (self.cells > 0).T
        return int(min((tp | fn).sum(), (tn | fp).sum()))


def _resample(
    y_true: Labels, p: Probs, threshold: float, groups: Sequence[object] | np.ndarray | None, n_boot: int,
    seed: int, n_bins: int,
) -> tuple[_ResampleStats, dict[str, np.ndarray]]:
    """The patient bootstrap: the per-unit sums and every metric's values over the resamples (NaN dropped)."""
    y, pv = _inputs(y_true, p)
    codes, n_groups = group_codes(groups, y.size)
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ConfigError(f"n_boot={n_boot!r} must be a non-negative integer (0 switches intervals off)")
    stats = _ResampleStats(y, pv, codes, n_groups, check_threshold(threshold), check_bins(n_bins))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(y.size, n_groups))
    draws: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for start in range(0, int(n_boot), chunk):
        size = min(chunk, int(n_boot) - start)
        # Draw G patients with replacement per resample and count how often each patient was drawn
        # (one flat bincount; several times faster than rng.multinomial).
        drawn = rng.integers(0, n_groups, size=(size, n_groups)) + n_groups * np.arange(size)[:, None]
        w = np.bincount(drawn.ravel(), minlength=size * n_groups).reshape(size, n_groups).astype(float)
        for name, values in stats.metrics(w).items():
            draws[name].append(values)
    values = {name: np.concatenate(draws[name]) if draws[name] else np.empty(0) for name in METRIC_NAMES}
    return stats, {name: v[~np.isnan(v)] for name, v in values.items()}


def bootstrap_ci(
    y_true: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, BootstrapCI]:
    """Plain 95% percentile intervals for every metric, resampling patients (all images of a drawn patient).

    Without ``groups`` the images are the units. Resamples where a metric is undefined (e.g. one class
    only for ROC AUC) are skipped for that metric; ``n_used`` says how many were left. These raw intervals
    collapse on small sets (a perfect score gives 1.00-1.00); reports use :func:`confidence_intervals`.
    """
    _, draws = _resample(y_true, p, threshold, groups, n_boot, seed, n_bins)
    result = {}
    for name, values in draws.items():
        low, high = np.percentile(values, [2.5, 97.5]) if values.size else (None, None)
        result[name] = BootstrapCI(None if low is None else float(low), None if high is None else float(high),
                                   int(values.size))
    return result


def wilson_interval(share: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``share`` observed on ``n`` independent units.

    Unlike the percentile bootstrap it has width at 0/n and n/n (7 of 7 gives 0.65-1.00), and it keeps
    close to its nominal coverage on a handful of units.
    """
    z = float(norm.ppf(0.5 + confidence / 2))
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


@dataclass(frozen=True)
class MetricCI:
    """The 95% interval reported for one metric: bounds (None when none is given), how it was made
    (one of CI_METHODS), over how many units (``n``, in ``unit``: "patients" or "images") and how many
    bootstrap resamples were usable."""

    low: float | None
    high: float | None
    method: str
    n: int
    unit: str
    n_used: int

    def entry(self, value: float | None) -> dict[str, object]:
        """The metrics.json entry of a metric with this interval (see ``covidscan.evaluation.schema``)."""
        return {"value": value, "ci95": [self.low, self.high], "ci_method": self.method, "ci_n": self.n,
                "ci_unit": self.unit}


def confidence_intervals(
    y_true: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    *,
    threshold: float,
    groups: Sequence[object] | np.ndarray | None = None,
    unit: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, MetricCI]:
    """95% intervals for every metric that stay honest on small sets, each with the count it rests on.

    The units are patients with ``groups`` (the bootstrap draws whole patients), else the rows (images,
    or patients when the caller passes one row per patient with ``unit="patients"``). Per metric:

    - proportions (PROPORTIONS): the cluster-bootstrap percentile interval, except when its denominator
      has fewer than MIN_BOOTSTRAP_UNITS units, the share is 0 or 1, or the interval has no width; then
      the Wilson score interval of the observed share on the denominator's *units* (e.g. the covid
      patients for sensitivity) -- conservative for image-level shares, since a patient's images count once;
    - F1, ROC/PR AUC, ECE, Brier: the percentile interval shifted by the bootstrap's median bias
      (``value + q - median``, clipped to [0, 1]), so an estimate the resamples sit above -- ECE always
      grows under resampling -- lies inside its interval rather than on its edge; with fewer than
      MIN_INTERVAL_UNITS units (half that in the smaller class for the AUCs) or a zero-width bootstrap there
      is no interval, method "too few".

    ``n_boot=0`` switches intervals off, as does an undefined metric (method "none").
    """
    stats, draws = _resample(y_true, p, threshold, groups, n_boot, seed, n_bins)
    unit = unit or ("patients" if groups is not None else "images")
    values = {name: float(v[0]) for name, v in stats.metrics(np.ones((1, len(stats.cells)))).items()}
    units = stats.units()
    result = {}
    for name in METRIC_NAMES:
        n, boot, value = units[name], draws[name], values[name]
        if not n_boot or np.isnan(value):  # no resamples asked for, or the metric is undefined here
            result[name] = MetricCI(None, None, "none", n, unit, int(boot.size))
            continue
        q_low, q_mid, q_high = np.percentile(boot, [2.5, 50, 97.5]) if boot.size else (value,) * 3
        if name in PROPORTIONS:
            if n < MIN_BOOTSTRAP_UNITS or value in (0.0, 1.0) or q_high <= q_low:
                low, high, method = *wilson_interval(value, n), "wilson"
            else:
                low, high, method = float(q_low), float(q_high), "percentile"
        else:
            few = n < MIN_INTERVAL_UNITS or q_high <= q_low or (
                name in ("roc_auc", "pr_auc") and stats.class_units() < MIN_INTERVAL_UNITS // 2)
            if few:
                low, high, method = None, None, "too few"
            else:
                low = float(np.clip(value + q_low - q_mid, 0.0, 1.0))
                high = float(np.clip(value + q_high - q_mid, 0.0, 1.0))
                method = "shifted percentile"
        result[name] = MetricCI(low, high, method, n, unit, int(boot.size))
    return result


@dataclass(frozen=True)
class PatientPredictions:
    """One row per patient: the id (None for an image without one), label, aggregated p and image count."""

    patient_ids: list[object]
    y: np.ndarray
    p: np.ndarray
    n_images: np.ndarray


def aggregate_by_patient(
    y_true: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    groups: Sequence[object] | np.ndarray,
    *,
    how: str = "mean",
) -> PatientPredictions:
    """Combine image probabilities per patient; the patient label is the (shared) label of its images.

    ``how``: ``"mean"`` (default: slices of one scan are strongly correlated, and the mean keeps the
    probability on the image scale so an image-level threshold stays meaningful), ``"max"`` (flag the
    patient if any image looks like covid; more sensitive, less specific) or ``"noisy_or"``
    (``1 - prod(1 - p)``: assumes independent images, so it saturates towards 1 for patients with many
    images; choose its threshold on patient-level validation predictions). A patient whose images carry
    both labels raises ManifestError listing them, since "max of the labels" would hide a labelling error.
    Images without a patient id are patients of their own.
    """
    y, pv = _inputs(y_true, p)
    check_choice(how, AGGREGATIONS, "aggregate")
    codes, n_groups = group_codes(groups, y.size)
    counts = np.bincount(codes, minlength=n_groups)
    n_covid = np.bincount(codes, weights=y, minlength=n_groups).astype(np.int64)
    ids = np.asarray(groups, dtype=object)[np.unique(codes, return_index=True)[1]]
    ids = [None if (i is None or (isinstance(i, float) and np.isnan(i))) else i for i in ids]
    mixed = np.flatnonzero((n_covid > 0) & (n_covid < counts))
    if mixed.size:
        listed = "; ".join(
            f"{ids[g]!r}: {n_covid[g]} covid, {counts[g] - n_covid[g]} non_covid" for g in mixed[:5]
        )
        raise ManifestError(
            f"{mixed.size} patient(s) have images with both labels "
            f"({listed}{'; ...' if mixed.size > 5 else ''}); "
            "fix the labels or patient ids in the manifest, or evaluate at image level (groups=None)"
        )
    if how == "mean":
        agg = np.bincount(codes, weights=pv, minlength=n_groups) / counts
    elif how == "max":
        agg = np.zeros(n_groups)
        np.maximum.at(agg, codes, pv)
    else:
        with np.errstate(divide="ignore"):
            agg = 1.0 - np.exp(np.bincount(codes, weights=np.log1p(-pv), minlength=n_groups))
    return PatientPredictions(ids, (n_covid > 0).astype(np.int64), agg, counts)


def choose_threshold(
    y_val: Sequence[int] | np.ndarray,
    p_val: Sequence[float] | np.ndarray,
    method: str = "youden",
    value: float = 0.5,
) -> float:
    """Decision threshold from VALIDATION predictions only (never pass test data here).

    ``"youden"`` maximises sensitivity + specificity - 1 on the validation ROC curve, ``"f1"`` maximises
    F1, ``"fixed"`` returns ``value``. The result is a validation score, used as ``p >= threshold``; ties
    keep the highest such threshold (fewest positives).
    """
    y = as_labels(y_val, "y_val")
    pv = as_floats(p_val, y.size, "p_val", unit_interval=True)
    check_choice(method, THRESHOLD_METHODS, "threshold method")
    if method == "fixed":
        return check_threshold(value, "threshold value")
    if y.min() == y.max():
        raise ManifestError(
            f"cannot choose a threshold by {method!r}: the validation labels hold only one class; "
            "use a validation set with both classes or method='fixed'"
        )
    if method == "youden":
        fpr, tpr, thresholds = roc_curve(y, pv, drop_intermediate=False)
        # Index 0 is sklearn's "flag nothing" point (threshold inf), never a useful operating point.
        best = int(np.argmax((tpr - fpr)[1:])) + 1
    else:
        precision, recall, thresholds = precision_recall_curve(y, pv)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)[:-1]
        # precision_recall_curve lists thresholds ascending; take the last maximum = highest threshold.
        best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(thresholds[best])
