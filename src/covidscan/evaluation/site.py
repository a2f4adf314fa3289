"""How well a run works at one site, from that site's signed cases: local figures with patient-bootstrap
95% CIs, their course as verdicts accumulate, the site's status, and which unsigned cases teach most.

Every figure is the run's output (calibrated ``p`` and its label at the run's threshold) against the
doctors' signed findings (``y``); ``agreement`` compares the model's label with the doctor's *first* read
(reader-first: the finding recorded before the model was shown), so it measures a read the model did not
influence. The units are the signed images (or cases), resampled by patient as in
:func:`covidscan.evaluation.metrics.confidence_intervals`, which also decides when there are too few.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation._checks import as_floats, as_labels, group_codes
from covidscan.evaluation.metrics import check_threshold, confidence_intervals, point_metrics
from covidscan.evaluation.report import format_value_ci

FIGURES: tuple[str, ...] = ("sensitivity", "specificity", "roc_auc", "ppv", "npv", "ece", "agreement")
"""The local figures, in the order pages show them."""
LABELS: dict[str, str] = {"sensitivity": "sensitivity", "specificity": "specificity", "roc_auc": "ROC AUC",
                          "ppv": "PPV", "npv": "NPV", "ece": "calibration error (ECE)",
                          "agreement": "agreement with the first read"}
SiteStatus = Literal["new", "shifted", "validating", "validated", "degraded"]
SITE_STATUSES: tuple[str, ...] = ("new", "shifted", "validating", "validated", "degraded")

Array = Sequence[Any] | np.ndarray


@dataclass(frozen=True)
class LocalFigures:
    """The run's figures on one site's signed cases: metrics.json entries (``value``, ``ci95``,
    ``ci_method``, ``ci_n``, ``ci_unit``) keyed by :data:`FIGURES`, and what they rest on."""

    n_patients: int
    n_images: int
    n_covid_patients: int
    n_non_covid_patients: int
    threshold: float
    metrics: dict[str, dict[str, Any]]

    def value(self, name: str) -> float | None:
        """The point value of figure ``name`` (None when undefined, e.g. no covid case signed yet)."""
        return self.metrics[name]["value"]

    def low(self, name: str) -> float | None:
        """The lower 95% bound of figure ``name`` (None when there is no interval)."""
        return self.metrics[name]["ci95"][0]

    def high(self, name: str) -> float | None:
        """The upper 95% bound of figure ``name`` (None when there is no interval)."""
        return self.metrics[name]["ci95"][1]

    def text(self, name: str) -> str:
        """``0.910 (95% CI 0.80–0.97, 25 patients)``, the project's one way of writing a figure."""
        return format_value_ci(self.metrics[name])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the API's and the site page's ``local_figures``)."""
        return {"n_patients": self.n_patients, "n_images": self.n_images,
                "n_covid_patients": self.n_covid_patients, "n_non_covid_patients": self.n_non_covid_patients,
                "threshold": self.threshold, "metrics": {k: dict(v) for k, v in self.metrics.items()}}


def _signed(y: Array, p: Array, patient_ids: Array, first_read: Array | None) -> tuple[np.ndarray, ...]:
    yv = as_labels(y, "y")
    pv = as_floats(p, yv.size, "p", unit_interval=True)
    ids = np.asarray(patient_ids, dtype=object)
    if ids.shape != (yv.size,):
        raise ManifestError(f"patient_ids has {ids.size} entries for {yv.size} signed cases: one per case")
    read = yv if first_read is None else as_labels(first_read, "first_read")
    if read.size != yv.size:
        raise ManifestError(f"first_read has {read.size} entries for {yv.size} signed cases: one per case")
    return yv, pv, ids, read


def local_figures(
    y: Array,
    p: Array,
    patient_ids: Array,
    threshold: float,
    *,
    first_read: Array | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LocalFigures:
    """The run's figures on a site's signed cases, each with a patient-bootstrap 95% CI.

    ``y``: the signed finding (1 = covid) per image or case; ``p``: the run's calibrated p(covid);
    ``patient_ids``: the bootstrap's units; ``threshold``: the run's operating point (label covid when
    ``p >= threshold``); ``first_read``: the doctor's finding before seeing the model (default ``y``:
    agreement then equals accuracy). Sensitivity, specificity, PPV, NPV and agreement are proportions and
    get Wilson intervals on few patients; ROC AUC and ECE get none below the project's minimum
    (``ci_method`` "too few"). A figure undefined on the cases (e.g. sensitivity with no covid case) is None.
    """
    yv, pv, ids, read = _signed(y, p, patient_ids, first_read)
    cut = check_threshold(threshold)
    labels = (pv >= cut).astype(np.float64)

    def with_ci(truth: np.ndarray, scores: np.ndarray, at: float) -> dict[str, dict[str, Any]]:
        values = point_metrics(truth, scores, threshold=at)
        cis = confidence_intervals(truth, scores, threshold=at, groups=ids, n_boot=n_boot, seed=seed)
        return {name: cis[name].entry(values[name]) for name in values}

    model = with_ci(yv, pv, cut)
    # NPV is the precision of "non_covid" (truth and labels flipped); agreement the accuracy of the model's
    # labels against the first read. The same seed draws the same patients for all three.
    flipped = with_ci(1 - yv, 1.0 - labels, 0.5)
    agreement = with_ci(read, labels, 0.5)
    metrics = {"sensitivity": model["recall"], "specificity": model["specificity"],
               "roc_auc": model["roc_auc"], "ppv": model["precision"], "npv": flipped["precision"],
               "ece": model["ece"], "agreement": agreement["accuracy"]}
    codes, n_patients = group_codes(ids, yv.size)
    covid = np.bincount(codes, weights=yv, minlength=n_patients) > 0
    return LocalFigures(n_patients=n_patients, n_images=int(yv.size), n_covid_patients=int(covid.sum()),
                        n_non_covid_patients=int((~covid).sum()), threshold=cut, metrics=metrics)


def patient_order(patient_ids: Array) -> np.ndarray:
    """Each case's patient as its rank of first appearance (0 for the first patient signed, ...)."""
    ids = np.asarray(patient_ids, dtype=object)
    codes, _ = group_codes(ids, ids.size)
    first = np.full(codes.max() + 1 if codes.size else 0, ids.size)
    np.minimum.at(first, codes, np.arange(ids.size))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[codes]


def course(
    y: Array,
    p: Array,
    patient_ids: Array,
    threshold: float,
    *,
    first_read: Array | None = None,
    step: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[LocalFigures]:
    """:func:`local_figures` on the first ``step``, ``2 * step``, ... patients signed, and on all of them.

    The cases are given in signing order; a patient counts from its first signed case on, with all its
    signed cases.
    """
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ConfigError(f"step={step!r} must be a positive number of patients")
    yv, pv, ids, read = _signed(y, p, patient_ids, first_read)
    rank = patient_order(ids)
    n = int(rank.max()) + 1 if rank.size else 0
    points = [*range(step, n, step), n] if n else []
    return [local_figures(yv[rank < k], pv[rank < k], ids[rank < k], threshold, first_read=read[rank < k],
                          n_boot=n_boot, seed=seed) for k in points]


def recent(y: Array, p: Array, patient_ids: Array, threshold: float, window: int, *,
           first_read: Array | None = None, n_boot: int = 1000, seed: int = 0) -> LocalFigures | None:
    """:func:`local_figures` on the last ``window`` patients signed (cases in signing order); None when
    fewer than ``window`` patients are signed."""
    yv, pv, ids, read = _signed(y, p, patient_ids, first_read)
    rank = patient_order(ids)
    n = int(rank.max()) + 1 if rank.size else 0
    if n < window:
        return None
    keep = rank >= n - window
    return local_figures(yv[keep], pv[keep], ids[keep], threshold, first_read=read[keep], n_boot=n_boot,
                         seed=seed)


COURSE_FIGURES: tuple[str, ...] = ("sensitivity", "specificity", "roc_auc")


def course_plot(points: Sequence[LocalFigures], *, rules: SiteRules | None = None,
                title: str = "Local validation") -> bytes:
    """PNG bytes: sensitivity, specificity and ROC AUC with their 95% CI bands against the number of
    signed patients; with ``rules`` the targets and the minimum number of patients as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ManifestError("no signed cases yet: there is no course to plot")
    fig = Figure(figsize=(11, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    targets = {} if rules is None else {"sensitivity": rules.sensitivity_target,
                                        "specificity": rules.specificity_target}
    x = np.array([f.n_patients for f in points])
    for ax, name, color in zip(fig.subplots(1, 3, sharey=True), COURSE_FIGURES,
                               ("#d73027", "#4575b4", "#1a9850"), strict=True):
        value = np.array([np.nan if f.value(name) is None else f.value(name) for f in points])
        low = np.array([np.nan if f.low(name) is None else f.low(name) for f in points])
        high = np.array([np.nan if f.high(name) is None else f.high(name) for f in points])
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0, label="95% CI")
        ax.plot(x, value, "-o", color=color, markersize=3, label=LABELS[name])
        if name in targets:
            ax.axhline(targets[name], color="black", linestyle="--", linewidth=1,
                       label=f"target {targets[name]:.2f} (lower bound must pass)")
        if name == "roc_auc":
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
        if rules is not None:
            ax.axvline(rules.min_patients, color="gray", linestyle="--", linewidth=1,
                       label=f"{rules.min_patients} patients needed")
        last = points[-1]
        ax.set_title(f"{LABELS[name]}: {_short(last, name)}", fontsize=10)
        ax.set_xlabel("signed patients")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, max(x.max(), rules.min_patients if rules else 0) * 1.03)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.axes[0].set_ylabel("value (95% CI)")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _short(figures: LocalFigures, name: str) -> str:
    value, low, high = figures.value(name), figures.low(name), figures.high(name)
    if value is None:
        return "n/a"
    return f"{value:.2f}" + ("" if low is None or high is None else f" ({low:.2f}–{high:.2f})")


class SiteRules(BaseModel):
    """What a site must show before it counts as validated (an admin sets them per site).

    Defaults: 50 signed patients, and the LOWER 95% bounds of sensitivity and specificity above 0.70. With
    ~25 patients per class a lower bound above 0.70 needs a point estimate near 0.88 (Wilson: 22 of 25 gives
    0.70-0.96), i.e. a model that misses about one covid patient in eight at most; a coin flip or a run
    whose operating point did not travel (issue 14: specificity 0.17 at a hidden hospital) never passes.
    ``recent_window``: the last patients whose figures say whether a validated site has ``degraded``.
    ``adapt_min_patients``: signed patients before a challenger run is trained for the site.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # 0.5 patients or True: refused

    min_patients: int = Field(50, ge=1)
    sensitivity_target: float = Field(0.70, ge=0, le=1)
    specificity_target: float = Field(0.70, ge=0, le=1)
    recent_window: int = Field(50, ge=1)
    adapt_min_patients: int = Field(50, ge=2)


def _passes(figures: LocalFigures, rules: SiteRules) -> bool:
    """Enough patients, and the lower CI bounds of sensitivity and specificity above their targets."""
    lows = figures.low("sensitivity"), figures.low("specificity")
    targets = rules.sensitivity_target, rules.specificity_target
    return figures.n_patients >= rules.min_patients and all(
        low is not None and low > target for low, target in zip(lows, targets, strict=True))


def _falls_below(figures: LocalFigures, rules: SiteRules) -> bool:
    """A full recent window whose sensitivity or specificity lies below its target."""
    values = figures.value("sensitivity"), figures.value("specificity")
    targets = rules.sensitivity_target, rules.specificity_target
    return figures.n_patients >= rules.recent_window and any(
        value is not None and value < target for value, target in zip(values, targets, strict=True))


def site_status(
    shift_alarm: bool | None,
    figures: LocalFigures | None,
    recent_figures: LocalFigures | None,
    rules: SiteRules,
    n_images_seen: int,
) -> SiteStatus:
    """The site's status, from what is known about it (a pure function; the service stores the result).

    - ``new``: nothing known -- no image seen, or no alarm (``shift_alarm`` False, or None: not tested yet)
      and no signed case;
    - ``shifted``: the shift alarm rang and no case is signed yet: "not yet validated here", never "wrong";
    - ``validating``: signed cases, but fewer than ``rules.min_patients`` patients or a lower CI bound of
      sensitivity or specificity not above its target;
    - ``validated``: at least ``min_patients`` signed patients and both lower bounds above their targets;
    - ``degraded``: validated on all signed cases, but the last ``recent_window`` patients
      (``recent_figures``) show sensitivity or specificity below its target. The point value decides, not
      the bound: a validated site leaves reader-first review as soon as its recent cases look worse, so a
      false "degraded" only costs a return to reader-first. A drop that pulls all signed cases below the
      rule makes the site ``validating`` again (equally reader-first).
    """
    if n_images_seen < 0:
        raise ConfigError(f"n_images_seen={n_images_seen} must be >= 0")
    if figures is None or figures.n_patients == 0:
        return "shifted" if shift_alarm and n_images_seen > 0 else "new"
    if not _passes(figures, rules):
        return "validating"
    if recent_figures is not None and _falls_below(recent_figures, rules):
        return "degraded"
    return "validated"


def teaching_order(
    p: Array,
    features: np.ndarray,
    signed_features: np.ndarray | None,
    threshold: float,
    *,
    uncertainty_weight: float = 0.5,
    batch: int = 50,
) -> np.ndarray:
    """Indices of the unsigned cases, the ones whose verdict should teach most first.

    A case teaches much when the run is unsure of it (``p`` near ``threshold``: 1 at the threshold, 0 at 0
    or 1) and when it is unlike every case signed so far (cosine distance of its pooled backbone
    ``features`` to the nearest signed one, over the largest such distance: 1 for the most novel case), so
    that the signed set covers the site rather than one corner of it. The score is
    ``uncertainty_weight * uncertainty + (1 - uncertainty_weight) * novelty``. The first ``batch`` are
    picked greedily: each pick counts as signed for the next, so a batch never holds near duplicates
    (slices of one scan); the rest follow by the same score against the signed cases and the batch.
    """
    pv = as_floats(p, np.size(p), "p", unit_interval=True)
    cut = check_threshold(threshold)
    if not 0.0 <= uncertainty_weight <= 1.0:
        raise ConfigError(f"uncertainty_weight={uncertainty_weight!r} must lie in [0, 1]")
    x = _unit_rows(features, "features")
    if x.shape[0] != pv.size:
        raise ManifestError(f"features has {x.shape[0]} rows for {pv.size} unsigned cases: give one per case")
    signed = np.empty((0, x.shape[1])) if signed_features is None else _unit_rows(signed_features,
                                                                                   "signed_features")
    if signed.shape[1] != x.shape[1]:
        raise ManifestError(f"signed_features has {signed.shape[1]} columns, features {x.shape[1]}: both "
                            "must be the same run's pooled features")
    n = pv.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uncertainty = 1.0 - np.abs(pv - cut) / max(cut, 1.0 - cut)
    nearest = (1.0 - signed @ x.T).min(axis=0) if len(signed) else np.full(n, np.inf)
    order: list[int] = []
    left = np.ones(n, dtype=bool)

    def score() -> np.ndarray:
        far = nearest[left].max()
        novelty = np.ones(n) if not np.isfinite(far) else nearest / far if far > 0 else np.zeros(n)
        return uncertainty_weight * uncertainty + (1 - uncertainty_weight) * novelty

    for _ in range(min(batch, n)):
        pick = int(np.argmax(np.where(left, score(), -np.inf)))
        order.append(pick)
        left[pick] = False
        nearest = np.minimum(nearest, 1.0 - x @ x[pick])
    if left.any():
        rest = np.flatnonzero(left)
        order += rest[np.argsort(-score()[rest], kind="stable")].tolist()
    return np.asarray(order, dtype=np.int64)


def _unit_rows(features: np.ndarray, name: str) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry); refuses anything but a finite 2-D array."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ManifestError(f"{name} must be a finite 2-D array (one pooled feature vector per case), "
                            f"got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


__all__ = ["COURSE_FIGURES", "FIGURES", "SITE_STATUSES", "LocalFigures", "SiteRules", "SiteStatus", "course",
           "course_plot", "local_figures", "patient_order", "recent", "site_status", "teaching_order"]
