"""Tests of covidscan.models.ood on small generated blobs and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from covidscan.errors import ConfigError
from covidscan.io import STAT_NAMES, image_stats
from covidscan.io.base import ImageMeta
from covidscan.models.ood import (
    FeatureDensity,
    FlatForest,
    ImageStatsEnvelope,
    OODDetector,
)

DIMS = 16


def blob(n: int, seed: int, shift: float = 0.0, dims: int = DIMS) -> np.ndarray:
    """Gaussian blob around (3 + shift, 3, ..., 3), away from the origin so that cosine distances tell."""
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 1.0, (n, dims))
    x[:, 0] += shift
    return x


def stats_of(n: int, seed: int, brightness: float = 0.4) -> np.ndarray:
    """Image statistics of ``n`` noisy gray 48x64 images of a given mean brightness."""
    rng = np.random.default_rng(seed)
    images = np.clip(rng.normal(brightness, 0.15, (n, 48, 64)), 0, 1)
    return np.stack([image_stats(im) for im in images])


@pytest.mark.parametrize("density", [FeatureDensity("knn", k=5), FeatureDensity("mahalanobis"),
                                     FeatureDensity("mahalanobis", n_components=4)])
def test_a_shifted_blob_scores_higher_than_held_out_data(density):
    labels = np.repeat([0, 1], 100)
    density.fit(blob(200, 0), labels)
    same, shifted = density.score(blob(200, 1)), density.score(blob(200, 2, shift=6.0))
    assert same.shape == (200,) and np.all(same >= 0)
    assert np.median(shifted) > np.quantile(same, 0.95)


def test_class_conditional_mahalanobis_uses_each_class_mean():
    x = np.concatenate([blob(100, 0), blob(100, 1, shift=10.0)])
    labels = np.repeat(["covid", "non_covid"], 100)
    conditional = FeatureDensity("mahalanobis").fit(x, labels)
    pooled = FeatureDensity("mahalanobis").fit(x)
    # Both class centres are typical for the class-conditional model; the gap between them is not.
    centres = np.array([[3.0] * DIMS, [13.0] + [3.0] * (DIMS - 1)])
    gap = np.array([[8.0] + [3.0] * (DIMS - 1)])
    assert conditional.score(centres).max() < conditional.score(gap)[0]
    assert pooled.score(gap)[0] < pooled.score(centres).max()


def test_knn_distance_is_the_kth_cosine_distance():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    density = FeatureDensity("knn", k=2).fit(train)
    # (2, 0): cosine distances 0 (to [1, 0]), 1 - 1/sqrt(2) (to [1, 1]), 1 (to [0, 1]); the 2nd is k=2's.
    np.testing.assert_allclose(density.score([[2.0, 0.0]]), [1 - 2**-0.5])


def test_detector_flags_shifted_data_and_about_five_percent_of_held_out_data():
    labels = np.repeat([0, 1], 200)
    detector = OODDetector().fit(blob(400, 0), labels, stats_of(400, 0), blob(300, 1), stats_of(300, 1))
    held_out = detector.flag(detector.score(blob(1000, 2), stats_of(1000, 2)))
    assert 0.02 <= held_out.mean() <= 0.09
    assert detector.flag(detector.score(blob(200, 3, shift=12.0), stats_of(200, 3))).mean() > 0.95
    # Typical features but images of another brightness: the envelope part alone raises the score.
    parts = detector.score_parts(blob(200, 4), stats_of(200, 4, brightness=0.8))
    assert np.median(parts[:, 1]) > 1.0 > np.median(parts[:, 0])
    assert detector.flag(detector.score(blob(200, 4), stats_of(200, 4, brightness=0.8))).mean() > 0.95
    assert isinstance(detector.flag(detector.threshold_ + 1.0), bool)


def test_save_load_round_trip_is_exact(tmp_path: Path):
    labels = np.repeat([0, 1], 50)
    for density in (FeatureDensity("knn", k=3), FeatureDensity("mahalanobis", n_components=5)):
        detector = OODDetector(density)
        detector.fit(blob(100, 0), labels, stats_of(100, 0), blob(40, 1), stats_of(40, 1))
        path = detector.save(tmp_path / "ood.safetensors")
        loaded = OODDetector.load(path)
        feats, stats = blob(30, 5, shift=2.0), stats_of(30, 5)
        np.testing.assert_array_equal(loaded.score(feats, stats), detector.score(feats, stats))
        assert (loaded.threshold_, loaded.quantile_) == (detector.threshold_, 0.95)
        assert loaded.features.method == density.method
    assert path.stat().st_size < 100_000


def test_image_stats_describe_histogram_size_and_format():
    image = np.zeros((40, 80), np.float32)
    image[:, 60:] = 1.0
    meta = ImageMeta(Path("x.dcm"), "DICOM", "MONOCHROME2", (40, 80), "CT", None)
    stats = dict(zip(STAT_NAMES, image_stats(image, meta), strict=True))
    assert stats["hist00"] == pytest.approx(0.75) and stats["hist31"] == pytest.approx(0.25)
    assert stats["near_black"] == pytest.approx(0.75) and stats["near_white"] == pytest.approx(0.25)
    assert stats["log_aspect"] == pytest.approx(np.log(2.0))
    assert (stats["colour"], stats["high_depth"]) == (0.0, 1.0)
    rgb = ImageMeta(Path("x.jpg"), "JPEG", "RGB", (40, 80), None, None)
    assert image_stats(image, rgb)[STAT_NAMES.index("colour")] == 1.0


def test_envelope_marks_a_statistic_that_never_varied_in_training():
    train = stats_of(50, 0)  # all gray, 8-bit: the colour flag is always 0
    envelope = ImageStatsEnvelope().fit(train)
    colour = stats_of(5, 1)
    colour[:, STAT_NAMES.index("colour")] = 1.0
    assert envelope.score(colour).min() > 10 * envelope.score(stats_of(50, 2)).max()


def test_bad_inputs_raise_config_error_with_a_clear_message(tmp_path: Path):
    with pytest.raises(ConfigError, match="2-D array"):
        FeatureDensity().fit(np.zeros(10))
    with pytest.raises(ConfigError, match="3 samples; at least 5"):
        FeatureDensity("knn", k=5).fit(blob(3, 0))
    fitted = FeatureDensity().fit(blob(20, 0))
    with pytest.raises(ConfigError, match="8 features per sample but the detector was fitted on 16"):
        fitted.score(blob(2, 0, dims=8))
    with pytest.raises(ConfigError, match="NaN"):
        fitted.score(np.full((1, DIMS), np.nan))
    with pytest.raises(ConfigError, match="not fitted"):
        FeatureDensity().score(blob(2, 0))
    with pytest.raises(ConfigError, match="method 'lof'"):
        FeatureDensity("lof")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="labels must have one entry per training sample"):
        FeatureDensity("mahalanobis").fit(blob(20, 0), [0, 1])
    with pytest.raises(ConfigError, match="gray \\(H, W\\) image"):
        image_stats(np.zeros((4, 4, 3)))
    with pytest.raises(ConfigError, match="at least 20 are needed"):
        OODDetector().fit(blob(50, 0), None, stats_of(50, 0), blob(10, 1), stats_of(10, 1))
    with pytest.raises(ConfigError, match="train_feats has 50 rows but train_stats 40"):
        OODDetector().fit(blob(50, 0), None, stats_of(40, 0), blob(30, 1), stats_of(30, 1))
    with pytest.raises(ConfigError, match="quantile"):
        OODDetector().fit(blob(50, 0), None, stats_of(50, 0), blob(30, 1), stats_of(30, 1), quantile=1.0)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="is not a covidscan OOD detector file"):
        OODDetector.load(bogus)
    with pytest.raises(ConfigError, match="is not a covidscan OOD detector file"):
        OODDetector.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("n_train", [1, 2, 7, 300])
def test_flat_forest_scores_exactly_as_scikit_learn(n_train: int):
    rng = np.random.default_rng(n_train)
    train = rng.normal(size=(n_train, 9))
    forest = IsolationForest(n_estimators=50, random_state=0).fit(train)
    flat = FlatForest(forest)
    x = np.concatenate([rng.normal(size=(40, 9)) * 4, train[:5]])
    x[0] = forest.estimators_[0].tree_.threshold[0]  # on a split value: "<=" goes left in both
    assert np.array_equal(flat.score_samples(x), forest.score_samples(x))  # to the last bit
    assert np.array_equal(flat.score_samples(x[:1]), forest.score_samples(x[:1]))
    x[1, 2] = np.nan  # missing values follow scikit-learn's own rules
    assert np.array_equal(flat.score_samples(x), forest.score_samples(x))


def test_flat_forest_needs_trees_over_every_feature():
    forest = IsolationForest(n_estimators=5, max_features=0.5, random_state=0).fit(np.eye(4))
    with pytest.raises(ConfigError, match=r"max_features=1\.0"):
        FlatForest(forest)
