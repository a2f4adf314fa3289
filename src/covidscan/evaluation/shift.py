"""Does a group of images look like the run's own validation images? A two-sample test, before any verdict.

Each image is described by its *shift features* (:func:`shift_features`): the run's pooled backbone
features plus the image statistics of :func:`covidscan.io.image_stats`, the same two views the run's
out-of-distribution detector uses. One image of another hospital looks typical; a group of them does not.

:class:`ShiftTest` (or :func:`two_sample_test`) pools the reference (the run's validation images) and the
sample, standardises every column, keeps the first ``n_components`` principal components (whitened), and
trains a ridge-regression linear classifier to tell the two groups apart, ``folds``-fold cross-validated.
The out-of-fold ROC AUC is the *effect size*: 0.5 = indistinguishable, 1.0 = always told apart; its 95%
interval is an image bootstrap of the out-of-fold scores. The *p-value* comes from ``n_permutations``
label permutations of the same cross-validation (``method="classifier"``) or of a Gaussian-kernel MMD on
the same components (``method="mmd"``). The classifier is the default: on the same draws both had the
same power, but MMD raised far more false alarms on groups with no shift (at level 0.01: 40% on 100
training-style phantoms, 22.5% on 100 of the run's own pooled images; the classifier 12.5% and 7.5%).
A ridge classifier, not a logistic one, because its out-of-fold scores are linear in the labels: all
permutations are one matrix product, so a test of 100 against 100 images takes milliseconds, not the
minutes of refitting 5 x 1000 logistic models.

The alarm means "not yet validated here", never "wrong": a group can look unlike the validation images and
still be scored well (ucsd-ct's own official test split does); only local validation from signed cases
says how well the model works at a site.

Why these settings (``benchmarks/measure_shift.py``, results in ``benchmarks/measure_shift.json`` and the
README): see :data:`ALARM_LEVEL` and :class:`ShiftTest`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

from covidscan.errors import ConfigError
from covidscan.evaluation.metrics import bootstrap_ci
from covidscan.io.stats import STAT_NAMES

Method = Literal["classifier", "mmd"]
MIN_IMAGES = 30
"""Fewest sample images a shift test accepts (issue 14: the alarm is computed from 30 images on)."""
MIN_REFERENCE = 20
"""Fewest reference images: below this the run's validation split is too small to compare against."""
ALARM_LEVEL = 0.003
"""The alarm sounds when the permutation p-value is below this level: with the default 500 permutations,
only when no permuted labelling separates the groups as well as the real one (p = 1/501). Chosen on data
covidscan can see (``benchmarks/measure_shift.py``, 40 draws each): images are not independent (several
slices per patient), so the permutation p-value runs small on groups with no shift, and at 0.01 the
classifier raised 12.5% false alarms on 100 training-style phantoms and 7.5% on 50 or 100 of the run's own
validation + test images pooled; at 0.003 at most 5% everywhere, while still alarming on every draw of
30 scanner-b phantoms and (checked afterwards, not chosen on) of 30 LUNA16 slices."""
VERDICT_ALARM = "looks unlike the run's validation images: not yet validated here"
VERDICT_OK = "looks like the run's validation images: no shift found"


def shift_features(pooled: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Per image, pooled backbone features (N, C) and :func:`~covidscan.io.image_stats` (N, S) side by side:
    float32 (N, C + S), the vector a shift test compares."""
    pooled, stats = np.asarray(pooled, np.float32), np.asarray(stats, np.float32)
    if pooled.ndim != 2 or stats.shape != (len(pooled), len(STAT_NAMES)):
        raise ConfigError(f"shift features need pooled features (N, C) and image statistics (N, "
                          f"{len(STAT_NAMES)}); got shapes {pooled.shape} and {stats.shape}")
    return np.concatenate([pooled, stats], axis=1)


@dataclass(frozen=True)
class ShiftResult:
    """One shift test: effect size (out-of-fold ROC AUC, its 95% CI), permutation p-value and the alarm.

    ``scores`` are the classifier's out-of-fold scores (higher = more like the sample), reference rows
    first; ``components`` the first two principal components of the pooled features (for a plot). Both
    are left out of :meth:`to_dict`.
    """

    auc: float
    auc_ci: tuple[float, float] | None
    p_value: float
    n_reference: int
    n_sample: int
    alarm: bool
    level: float
    method: str
    n_permutations: int
    scores: np.ndarray = field(repr=False, compare=False)
    components: np.ndarray = field(repr=False, compare=False)

    @property
    def verdict(self) -> str:
        """The result in words: an alarm means "not yet validated here", never "wrong"."""
        return VERDICT_ALARM if self.alarm else VERDICT_OK

    @property
    def sample_scores(self) -> np.ndarray:
        """Out-of-fold scores of the sample images, in the order they were given."""
        return self.scores[self.n_reference:]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON (no per-image arrays)."""
        return {"auc": self.auc, "auc_ci": None if self.auc_ci is None else list(self.auc_ci),
                "p_value": self.p_value, "n_reference": self.n_reference, "n_sample": self.n_sample,
                "alarm": self.alarm, "level": self.level, "method": self.method,
                "n_permutations": self.n_permutations, "verdict": self.verdict}


def _matrix(x: Any, name: str, minimum: int, dims: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (images, features); got shape {arr.shape}")
    if len(arr) < minimum:
        raise ConfigError(f"{name} has {len(arr)} images; the shift test needs at least {minimum} "
                          f"(it judges a group, and fewer images give no reliable answer)")
    if dims is not None and arr.shape[1] != dims:
        raise ConfigError(f"{name} has {arr.shape[1]} features per image but the reference {dims}; "
                          "compute both with the same run")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def _components(x: np.ndarray, k: int) -> np.ndarray:
    """Columns standardised on the pooled rows, then the first ``k`` principal components, whitened."""
    sd = x.std(axis=0)
    xs = (x - x.mean(axis=0)) / np.where(sd > 1e-8, sd, 1.0)
    u, s, _ = np.linalg.svd(xs, full_matrices=False)
    k = min(k, int((s > 1e-8 * s[0]).sum()))
    return u[:, :k] * np.sqrt(len(x))


def _auc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of every column of ``scores`` (N, B) against the 0/1 columns of ``labels`` (N, B)."""
    n_pos = labels[:, 0].sum()
    n_neg = len(labels) - n_pos
    ranks = rankdata(scores, axis=0)
    return ((ranks * labels).sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class ShiftTest:
    """A two-sample shift test against a fixed reference, in the scikit-learn manner.

    ``fit(reference)`` keeps the reference shift features (the run's validation images); ``test(sample)``
    compares a group of at least :data:`MIN_IMAGES` images with it. ``n_components`` principal components,
    ``folds``-fold cross-validation of a ridge classifier with penalty ``ridge`` (times the number of
    training rows), ``n_permutations`` permutations, alarm below ``level``; ``seed`` fixes folds,
    permutations and the bootstrap, so the same groups always give the same answer. Defaults chosen by
    ``benchmarks/measure_shift.py`` (see the module docstring and the README).
    """

    def __init__(
        self,
        *,
        method: Method = "classifier",
        n_components: int = 10,
        folds: int = 5,
        ridge: float = 1.0,
        n_permutations: int = 500,
        level: float = ALARM_LEVEL,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> None:
        if method not in ("classifier", "mmd"):
            raise ConfigError(f"shift test method must be 'classifier' or 'mmd', got {method!r}")
        if n_components < 1 or folds < 2 or ridge <= 0 or n_permutations < 1 or not 0 < level < 1:
            raise ConfigError("shift test settings: n_components >= 1, folds >= 2, ridge > 0, "
                              f"n_permutations >= 1 and 0 < level < 1; got {n_components}, {folds}, "
                              f"{ridge}, {n_permutations}, {level}")
        if 1 / (n_permutations + 1) >= level:
            # the smallest permutation p-value is 1 / (n_permutations + 1): the alarm could never sound
            raise ConfigError(f"shift test: with {n_permutations} permutations no p-value falls below level "
                              f"{level:g}; use at least {int(np.ceil(1 / level))} permutations")
        self.method = method
        self.n_components = int(n_components)
        self.folds = int(folds)
        self.ridge = float(ridge)
        self.n_permutations = int(n_permutations)
        self.level = float(level)
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        self.reference_: np.ndarray | None = None

    def fit(self, reference: Any) -> ShiftTest:
        """Keep the reference shift features (N, D), at least :data:`MIN_REFERENCE` images."""
        self.reference_ = _matrix(reference, "the reference (the run's validation images)", MIN_REFERENCE)
        return self

    def test(self, sample: Any) -> ShiftResult:
        """Compare ``sample`` (M, D) shift features with the reference; M >= :data:`MIN_IMAGES`."""
        if self.reference_ is None:
            raise ConfigError("ShiftTest is not fitted yet; call .fit(reference) first")
        ref = self.reference_
        x = np.concatenate([ref, _matrix(sample, "the sample", MIN_IMAGES, ref.shape[1])])
        rng = np.random.default_rng(self.seed)
        z = _components(x, self.n_components)
        labels = np.zeros((len(x), 1 + self.n_permutations))
        labels[len(ref):, 0] = 1.0
        for b in range(1, labels.shape[1]):
            labels[:, b] = rng.permutation(labels[:, 0])
        scores = self._out_of_fold(z, labels, rng)
        auc_all = _auc_columns(scores, labels)
        stat = auc_all if self.method == "classifier" else _mmd_columns(z, labels)
        p_value = float((1 + np.sum(stat[1:] >= stat[0])) / len(stat))
        ci = bootstrap_ci(labels[:, 0], rankdata(scores[:, 0]) / len(x), threshold=0.5, n_boot=self.n_boot,
                          seed=self.seed)["roc_auc"]
        auc_ci = None if ci.low is None or ci.high is None else (round(ci.low, 4), round(ci.high, 4))
        return ShiftResult(
            auc=round(float(auc_all[0]), 4), auc_ci=auc_ci, p_value=round(p_value, 4), n_reference=len(ref),
            n_sample=len(x) - len(ref), alarm=p_value < self.level, level=self.level, method=self.method,
            n_permutations=self.n_permutations, scores=scores[:, 0], components=z[:, :2],
        )

    def _out_of_fold(self, z: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Out-of-fold ridge scores for every label column at once (N, B).

        Folds are drawn independently of the labels, so every permutation is scored by the same procedure.
        For a fold's training rows T the centred ridge fit is ``w = (Xc'Xc + lambda I)^-1 Xc' y``, so the
        held-out scores ``mean(y_T) + (X_S - mean(X_T)) w`` are one fixed matrix times ``y_T``.
        """
        fold = rng.permutation(len(z)) % self.folds
        scores = np.empty_like(labels)
        for f in range(self.folds):
            train, held = fold != f, fold == f
            xt = z[train]
            centre = xt.mean(axis=0)
            xc = xt - centre
            gram = xc.T @ xc + self.ridge * len(xt) * np.eye(z.shape[1])
            hat = (z[held] - centre) @ np.linalg.solve(gram, xc.T)
            y = labels[train]
            scores[held] = y.mean(axis=0) + hat @ y
        return scores


def _mmd_columns(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Biased squared MMD with a Gaussian kernel (median-distance bandwidth) for every label column."""
    sq = (z**2).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    kernel = np.exp(-dist / np.median(dist[np.triu_indices(len(z), 1)]))
    n_pos = labels[:, 0].sum()
    weights = labels / n_pos - (1 - labels) / (len(z) - n_pos)
    return (weights * (kernel @ weights)).sum(axis=0)


def two_sample_test(reference: Any, sample: Any, *, seed: int = 0, **settings: Any) -> ShiftResult:
    """:class:`ShiftTest` ``(seed=seed, **settings).fit(reference).test(sample)`` in one call."""
    return ShiftTest(seed=seed, **settings).fit(reference).test(sample)


__all__ = ["ALARM_LEVEL", "MIN_IMAGES", "MIN_REFERENCE", "ShiftResult", "ShiftTest", "shift_features",
           "two_sample_test"]
