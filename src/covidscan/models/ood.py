"""Out-of-distribution scores: how unlike the training images an input is (higher = more unusual).

Fitted objects in the scikit-learn manner. :class:`FeatureDensity` scores backbone features against the
training set, :class:`ImageStatsEnvelope` scores image statistics (:func:`covidscan.io.image_stats`), and
:class:`OODDetector` combines both, with a warning threshold fitted on validation images and a one-file
``save``/``load`` (safetensors arrays plus JSON metadata, no pickle).

The default is chosen by ``benchmarks/measure_ood.py``; its figures are in :class:`OODDetector`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.numpy
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import IsolationForest

from covidscan.errors import ConfigError
from covidscan.io.stats import STAT_NAMES

Method = Literal["knn", "mahalanobis"]
_FORMAT = "covidscan-ood/1"
REFUSAL_FACTOR = 3.0
"""An image whose content score (k-NN on backbone features, ``score_parts`` column 0) is above this many
times the run's threshold is refused (no probability, no label) instead of warned about.

Chosen with ``benchmarks/measure_ood_far.py`` (offline MobileNetV2 ImageNet features, detector fitted on
ucsd-ct resp. cxr-dev train, threshold from val): the largest content score of any real image of the run's
own modality is 2.23 times the threshold (ct-ext-luna16, another hospital's CT; cxr-ext-figure1: 1.56), so
3 leaves a third of headroom and refuses none of them, while 82% of the cxr-dev X-rays given to the CT run
(1st percentile 2.25, median 3.41) and 96% of the ucsd-ct slices given to the X-ray run lie above it. The
image-statistics part never refuses: a 16-bit, DICOM or colour file given to a run trained on 8-bit gray
PNGs scores very high there, yet is a chest image the model can judge."""


def _matrix(x: Any, name: str, dims: int | None = None, minimum: int = 1) -> np.ndarray:
    """A finite 2-D float64 array of at least ``minimum`` rows (and ``dims`` columns), else ConfigError."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (samples, features); got shape {arr.shape}")
    if len(arr) < minimum:
        raise ConfigError(f"{name} has {len(arr)} samples; at least {minimum} are needed to fit it")
    if dims is not None and arr.shape[1] != dims:
        raise ConfigError(
            f"{name} has {arr.shape[1]} features per sample but the detector was fitted on {dims}; "
            "use the same backbone and feature layer as at training time"
        )
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def _not_fitted(obj: object) -> ConfigError:
    return ConfigError(f"{type(obj).__name__} is not fitted yet; call .fit(...) first")


class FeatureDensity:
    """Distance of feature vectors from the training features; ``score`` is higher for more unusual inputs.

    ``method="knn"`` (default): cosine distance to the ``k``-th nearest training vector, on L2-normalised
    features (Sun et al., 2022); labels are not needed. ``method="mahalanobis"``: smallest Mahalanobis
    distance to a class mean, with one class-shared Ledoit-Wolf-shrunk covariance (Lee et al., 2018),
    optionally after PCA to ``n_components`` dimensions.
    """

    def __init__(self, method: Method = "knn", *, k: int = 5, n_components: int | None = None) -> None:
        if method not in ("knn", "mahalanobis"):
            raise ConfigError(f"FeatureDensity method {method!r} is not one of knn, mahalanobis")
        if k < 1:
            raise ConfigError(f"FeatureDensity k must be >= 1, got {k}")
        if n_components is not None and n_components < 1:
            raise ConfigError(f"FeatureDensity n_components must be >= 1 or None, got {n_components}")
        self.method = method
        self.k = int(k)
        self.n_components = n_components
        self.arrays_: dict[str, np.ndarray] | None = None

    @property
    def min_samples(self) -> int:
        """Fewest training samples ``fit`` accepts."""
        return self.k if self.method == "knn" else max(3, (self.n_components or 0) + 1)

    def fit(self, features: Any, labels: Any = None) -> FeatureDensity:
        """Fit on ``features`` (N, D); ``labels`` (N,) make the Mahalanobis variant class-conditional."""
        x = _matrix(features, "training features", minimum=self.min_samples)
        if self.method == "knn":
            self.arrays_ = {"train": _unit(x).astype(np.float32)}
            return self
        arrays: dict[str, np.ndarray] = {}
        if self.n_components is not None:
            if self.n_components > min(x.shape):
                raise ConfigError(
                    f"n_components={self.n_components} exceeds min(samples, features) = {min(x.shape)}"
                )
            centre = x.mean(axis=0)
            _, _, vt = np.linalg.svd(x - centre, full_matrices=False)
            arrays.update(pca_mean=centre, pca_components=vt[: self.n_components])
            x = (x - centre) @ arrays["pca_components"].T
        groups = np.zeros(len(x), dtype=np.int64) if labels is None else _labels(labels, len(x))
        means = np.stack([x[groups == g].mean(axis=0) for g in range(groups.max() + 1)])
        centred = x - means[groups]
        arrays.update(means=means, precision=LedoitWolf(assume_centered=True).fit(centred).precision_)
        self.arrays_ = arrays
        return self

    def score(self, features: Any) -> np.ndarray:
        """Unusualness of each row of ``features`` (N, D): float64 (N,), higher = further from training."""
        if self.arrays_ is None:
            raise _not_fitted(self)
        a = self.arrays_
        dims = a["train"].shape[1] if self.method == "knn" else (a.get("pca_mean", a["means"][0])).shape[0]
        x = _matrix(features, "features", dims=dims)
        if self.method == "knn":
            # 1 - cosine similarity; fit() refuses fewer than k training rows, so k-1 is a valid index.
            distance = 1.0 - _unit(x) @ a["train"].T.astype(np.float64)
            return np.partition(distance, self.k - 1, axis=1)[:, self.k - 1]
        if "pca_mean" in a:
            x = (x - a["pca_mean"]) @ a["pca_components"].T
        squared = np.stack([_quadratic(x - mean, a["precision"]) for mean in a["means"]], axis=1)
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    def _params(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k, "n_components": self.n_components}


class FlatForest:
    """A fitted ``IsolationForest`` as flat node arrays, walked for every tree at once.

    ``score_samples`` equals ``IsolationForest.score_samples`` exactly (``tests/test_ood.py``); the forest
    scores one tree per Python call, about 30 ms for 200 trees whether it scores one image or 32, which was
    most of the time a served image took (``benchmarks/bench_predict.py``: 46 ms for one image). Trees must
    use every feature (``max_features=1.0``, the default, as :class:`ImageStatsEnvelope` builds them).
    """

    def __init__(self, forest: IsolationForest) -> None:
        if forest.max_features != 1.0:
            raise ConfigError(f"FlatForest needs trees that use every feature (max_features=1.0), got "
                              f"{forest.max_features!r}")
        self.forest = forest
        trees = [estimator.tree_ for estimator in forest.estimators_]
        starts = np.cumsum([0] + [tree.node_count for tree in trees[:-1]])
        self.roots = starts.astype(np.intp)
        left, right, feature, threshold, leaf_value = [], [], [], [], []
        for start, tree in zip(starts, trees, strict=True):
            leaf = tree.children_left < 0
            left.append(np.where(leaf, -1, tree.children_left + start))
            right.append(np.where(leaf, -1, tree.children_right + start))
            feature.append(np.where(leaf, 0, tree.feature))  # any valid column: leaves never compare
            threshold.append(tree.threshold)
            # What sklearn adds per tree, in its order of operations: path length + c(leaf samples) - 1.
            leaf_value.append(tree.compute_node_depths() + _average_path_length(tree.n_node_samples) - 1.0)
        self.left, self.right = np.concatenate(left).astype(np.intp), np.concatenate(right).astype(np.intp)
        self.feature = np.concatenate(feature).astype(np.intp)
        self.threshold, self.leaf_value = np.concatenate(threshold), np.concatenate(leaf_value)
        self.depth = max(tree.max_depth for tree in trees)
        self.denominator = len(trees) * _average_path_length(np.asarray([forest.max_samples_]))[0]

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """``IsolationForest.score_samples`` of the rows of ``x`` (lower = more abnormal)."""
        x = np.asarray(x, dtype=np.float32)  # sklearn's trees compare float32 inputs
        if np.isnan(x).any():  # sklearn's own rules for missing values
            return self.forest.score_samples(x)
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        rows = np.arange(len(x))[:, None]
        for _ in range(self.depth):
            left = self.left[node]
            inner = left >= 0
            if not inner.any():
                break
            go_left = x[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(inner, np.where(go_left, left, self.right[node]), node)
        # cumsum adds tree by tree, in sklearn's order, so the sums are equal to the last bit.
        depths = np.cumsum(self.leaf_value[node], axis=1)[:, -1] if len(x) else np.zeros(0)
        # A forest of one training sample has depth and denominator 0: sklearn then takes the ratio as 1.
        ratio = np.divide(depths, self.denominator, out=np.ones_like(depths), where=self.denominator != 0)
        return -(2 ** -ratio)


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n), the average path length of an unsuccessful search in a binary search tree of n items (as
    scikit-learn computes it): the isolation forest's normaliser."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class ImageStatsEnvelope:
    """Isolation forest on standardised :func:`covidscan.io.image_stats` vectors; higher = more unusual.

    Each statistic is standardised by its training mean and std; the score is the isolation-forest
    anomaly score (``n_estimators`` trees, fixed ``seed``). A forest never splits on a statistic that did
    not vary in training (every training image gray, or 8-bit), so for those the distance from the one
    training value, in units of ``std_floor``, is added: a colour or 16-bit image then scores very high.
    Only the training statistics are stored; the forest is rebuilt from them (identically for a given
    scikit-learn version), so no pickled trees are ever loaded.
    """

    def __init__(self, n_estimators: int = 200, seed: int = 0, std_floor: float = 1e-3) -> None:
        self.n_estimators = int(n_estimators)
        self.seed = int(seed)
        self.std_floor = float(std_floor)
        self.arrays_: dict[str, np.ndarray] | None = None
        self._forest: FlatForest | None = None

    def fit(self, stats: Any) -> ImageStatsEnvelope:
        """Fit on ``stats`` (N, len(STAT_NAMES)) of the training images."""
        x = _matrix(stats, "training image statistics", dims=len(STAT_NAMES), minimum=10)
        self.arrays_ = {"train": x}
        return self._build()

    def _build(self) -> ImageStatsEnvelope:
        assert self.arrays_ is not None
        x = self.arrays_["train"]
        std = x.std(axis=0)
        self._centre, self._scale, self._fixed = x.mean(axis=0), np.maximum(std, self.std_floor), std == 0
        forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed)
        self._forest = FlatForest(forest.fit((x - self._centre) / self._scale))
        return self

    def score(self, stats: Any) -> np.ndarray:
        """Unusualness of each row of ``stats``: float64 (N,)."""
        if self._forest is None:
            raise _not_fitted(self)
        z = (_matrix(stats, "image statistics", dims=len(STAT_NAMES)) - self._centre) / self._scale
        return -self._forest.score_samples(z) + np.abs(z[:, self._fixed]).sum(axis=1)

    def _params(self) -> dict[str, Any]:
        return {"n_estimators": self.n_estimators, "seed": self.seed, "std_floor": self.std_floor}


class OODDetector:
    """Feature density plus image-statistics envelope, each scaled on validation, combined by their maximum.

    Each part's raw score ``s`` becomes ``(s - median_val) / (q95_val - median_val)`` on the validation
    images, so 0 is a typical validation image and 1 its own 95th percentile; the OOD score is the larger
    of the two. ``threshold_`` is the ``quantile`` of the validation OOD scores; ``flag`` compares with it.

    Why k-NN on pooled features plus an isolation-forest envelope (``benchmarks/measure_ood.py``, offline
    MobileNetV2 ImageNet features, fitted on ucsd-ct train, threshold at the 95th percentile of val; AUROC
    against ucsd-ct test): every feature-space score alone fails on another hospital's CT (ct-ext-luna16:
    Mahalanobis 0.51, k-NN 0.47, after PCA 0.40-0.49, multi-layer 0.56-0.57, on a trained head's hidden
    layer 0.48) while the image-statistics forest reaches 0.98; the features, in turn, separate X-rays
    (1.00) and phantoms (0.97) better. Together: 0.965 (luna16, 82% flagged), 1.000 (cxr-dev, 100%),
    0.963 (CT phantoms, 86%), with 6% of ucsd-ct test flagged. For an X-ray model fitted on cxr-dev:
    cxr-ext-figure1 0.645 (8% flagged: another hospital's X-rays stay hard), ucsd-ct CT slices 1.000,
    4% of cxr-dev test flagged. k-NN rather than Mahalanobis: better on phantoms (0.966 vs 0.947) and
    cxr-ext-figure1 (0.711 vs 0.695), equal on the other modality, 0.04 lower on luna16 where both fail,
    and no 1280 x 1280 covariance to estimate from a few hundred images.
    """

    def __init__(self, features: FeatureDensity | None = None, envelope: ImageStatsEnvelope | None = None):
        self.features = features if features is not None else FeatureDensity("knn", k=5)
        self.envelope = envelope if envelope is not None else ImageStatsEnvelope()
        self.scales_: np.ndarray | None = None  # (2, 2): per part, (median, q95 - median) on validation
        self.threshold_: float | None = None
        self.quantile_: float | None = None

    def fit(
        self,
        train_feats: Any,
        train_labels: Any,
        train_stats: Any,
        val_feats: Any,
        val_stats: Any,
        quantile: float = 0.95,
    ) -> OODDetector:
        """Fit both parts on the training images, then the scaling and threshold on validation images."""
        if not 0.5 <= quantile < 1.0:
            raise ConfigError(f"quantile must lie in [0.5, 1), got {quantile}")
        n_train = len(np.asarray(train_feats))
        if len(np.asarray(train_stats)) != n_train:
            raise ConfigError(
                f"train_feats has {n_train} rows but train_stats {len(np.asarray(train_stats))}; "
                "give one of each per image"
            )
        self.features.fit(train_feats, train_labels)
        self.envelope.fit(train_stats)
        raw = self._raw(val_feats, val_stats, "validation")
        if len(raw) < 20:
            raise ConfigError(f"validation has {len(raw)} images; at least 20 are needed to fit a threshold")
        median, upper = np.median(raw, axis=0), np.quantile(raw, 0.95, axis=0)
        self.scales_ = np.stack([median, np.maximum(upper - median, 1e-12)], axis=1)
        self.threshold_ = float(np.quantile(self._combine(raw), quantile))
        self.quantile_ = float(quantile)
        return self

    def extended(self, feats: Any, stats: Any) -> OODDetector:
        """A copy that also counts these images as training data (a new site's signed cases).

        Their features join the k-NN set and their statistics the envelope (refitted on the union); the
        validation scaling and the threshold stay as fitted, which errs towards flagging. k-NN only: a
        class-conditional Mahalanobis fit would need the labels again.
        """
        if self.scales_ is None or self.features.arrays_ is None or self.envelope.arrays_ is None:
            raise _not_fitted(self)
        if self.features.method != "knn":
            raise ConfigError("only a k-NN feature density can be extended with new training images")
        train = self.features.arrays_["train"]
        new_feats = _matrix(feats, "new training features", dims=train.shape[1])
        new_stats = _matrix(stats, "new image statistics", dims=len(STAT_NAMES))
        if len(new_feats) != len(new_stats):
            raise ConfigError(f"{len(new_feats)} feature rows but {len(new_stats)} image statistics rows")
        copy = OODDetector(FeatureDensity(**self.features._params()),
                           ImageStatsEnvelope(**self.envelope._params()))
        copy.features.arrays_ = {"train": np.concatenate([train, _unit(new_feats).astype(np.float32)])}
        copy.envelope.arrays_ = {"train": np.concatenate([self.envelope.arrays_["train"], new_stats])}
        copy.envelope._build()
        copy.scales_, copy.threshold_, copy.quantile_ = self.scales_.copy(), self.threshold_, self.quantile_
        return copy

    def _raw(self, feats: Any, stats: Any, what: str) -> np.ndarray:
        f, s = self.features.score(feats), self.envelope.score(stats)
        if len(f) != len(s):
            raise ConfigError(f"{what} features have {len(f)} rows but image statistics {len(s)}")
        return np.stack([f, s], axis=1)

    def _combine(self, raw: np.ndarray) -> np.ndarray:
        assert self.scales_ is not None
        return ((raw - self.scales_[:, 0]) / self.scales_[:, 1]).max(axis=1)

    def score_parts(self, feats: Any, stats: Any) -> np.ndarray:
        """Scaled scores of both parts, (N, 2): column 0 features, column 1 image statistics."""
        if self.scales_ is None:
            raise _not_fitted(self)
        return (self._raw(feats, stats, "input") - self.scales_[:, 0]) / self.scales_[:, 1]

    def score(self, feats: Any, stats: Any) -> np.ndarray:
        """OOD score of each image, (N,): above ``threshold_`` means unlike the training data."""
        return self.score_parts(feats, stats).max(axis=1)

    def flag(self, score: float | np.ndarray) -> bool | np.ndarray:
        """Whether ``score`` (one value or an array) lies above the fitted threshold."""
        if self.threshold_ is None:
            raise _not_fitted(self)
        flagged = np.asarray(score) > self.threshold_
        return bool(flagged) if flagged.ndim == 0 else flagged

    def refuses(self, parts: np.ndarray) -> np.ndarray:
        """Per image, whether the content part of ``score_parts`` (N, 2) lies ``REFUSAL_FACTOR`` times above
        the threshold: the backbone sees nothing like its training images, so no probability is given."""
        if self.threshold_ is None:
            raise _not_fitted(self)
        return np.asarray(parts)[:, 0] > REFUSAL_FACTOR * max(self.threshold_, 0.0)

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one safetensors file (arrays, with the settings as JSON metadata)."""
        if self.scales_ is None or self.features.arrays_ is None or self.envelope.arrays_ is None:
            raise _not_fitted(self)
        tensors = {f"features.{k}": v for k, v in self.features.arrays_.items()}
        tensors |= {f"envelope.{k}": v for k, v in self.envelope.arrays_.items()}
        tensors["scales"] = self.scales_
        meta = {"format": _FORMAT, "features": self.features._params(), "envelope": self.envelope._params(),
                "threshold": self.threshold_, "quantile": self.quantile_, "stat_names": list(STAT_NAMES)}
        path = Path(path)
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
                                    metadata={"covidscan_ood": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> OODDetector:
        """Read a detector written by :meth:`save`; a foreign or damaged file raises ConfigError."""
        path = Path(path)
        try:
            with safetensors.safe_open(str(path), framework="numpy") as handle:
                meta = json.loads((handle.metadata() or {})["covidscan_ood"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (OSError, KeyError, ValueError, safetensors.SafetensorError) as err:
            raise ConfigError(
                f"{path} is not a covidscan OOD detector file ({type(err).__name__}: {err})"
            ) from err
        if meta.get("format") != _FORMAT or meta.get("stat_names") != list(STAT_NAMES):
            raise ConfigError(
                f"{path} was written by another covidscan version ({meta.get('format')}); refit the detector"
            )
        detector = cls(FeatureDensity(**meta["features"]), ImageStatsEnvelope(**meta["envelope"]))
        detector.features.arrays_ = _part(tensors, "features.")
        detector.envelope.arrays_ = _part(tensors, "envelope.")
        detector.envelope._build()
        detector.scales_ = tensors["scales"]
        detector.threshold_, detector.quantile_ = float(meta["threshold"]), float(meta["quantile"])
        return detector


def _part(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _quadratic(diff: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Row-wise ``d^T P d`` (one matrix product, not an einsum that numpy would loop over)."""
    return ((diff @ precision) * diff).sum(axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _labels(labels: Any, n: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ConfigError(f"labels must have one entry per training sample ({n}); got shape {arr.shape}")
    return np.unique(arr, return_inverse=True)[1]
