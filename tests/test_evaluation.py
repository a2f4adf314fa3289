"""covidscan.evaluation: metrics, bootstrap intervals, calibration, thresholds, aggregation, metrics.json."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from covidscan.errors import ConfigError, CovidscanError, ManifestError
from covidscan.evaluation import (
    METRIC_NAMES,
    MetricsSchemaError,
    aggregate_by_patient,
    apply_temperature,
    bootstrap_ci,
    choose_threshold,
    confusion,
    evaluate_from_logits,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    point_metrics,
    read_metrics,
    reliability_bins,
    validate_metrics_schema,
    write_metrics,
)
from covidscan.evaluation.metrics import _ResampleStats, confidence_intervals, wilson_interval
from covidscan.evaluation.report import format_value_ci

# Hand-worked example: threshold 0.5 gives tp=3, fn=1, fp=1, tn=5.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.1, 0.05])


def _synthetic(n_patients: int, per_patient: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients with one label each and noisy, informative probabilities."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), per_patient)
    y = (rng.random(n_patients) < 0.45).astype(int)[groups]
    p = np.clip(0.35 * y + 0.65 * rng.random(groups.size), 0, 1)
    return y, p, groups


def test_point_metrics_match_hand_computation():
    m = point_metrics(Y, P, threshold=0.5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(21 / 24)  # 21 of 24 (covid, non_covid) pairs ranked right
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert m["brier"] == pytest.approx(1.4125 / 10)
    # 2 bins: [0, .5) holds 6 images (1 covid, p sum 1.15), [.5, 1] holds 4 (3 covid, p sum 3.0).
    assert expected_calibration_error(Y, P, n_bins=2) == pytest.approx(0.6 * abs(1 / 6 - 1.15 / 6))
    assert confusion(Y, P, 0.5).tolist() == [[5, 1], [1, 3]]


def test_threshold_is_inclusive_and_undefined_metrics_are_none():
    assert confusion([1, 0], [0.5, 0.49], 0.5).tolist() == [[1, 0], [0, 1]]
    m = point_metrics([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.5)
    assert m["recall"] is None and m["precision"] is None and m["roc_auc"] is None and m["pr_auc"] is None
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0


def test_reliability_bins_put_one_in_last_bin():
    bins = reliability_bins([0, 1, 1], [0.0, 0.5, 1.0], n_bins=2)
    assert bins["counts"].tolist() == [1, 2]
    assert bins["frac_covid"].tolist() == [0.0, 1.0]
    assert len(bins["edges"]) == 3


def test_vectorised_resamples_equal_sklearn_with_sample_weights():
    y, p, groups = _synthetic(60, 3, seed=1)
    p = np.round(p, 1)  # many ties, the hard case for ranking metrics
    stats = _ResampleStats(y, p, groups, 60, 0.5, 15)
    rng = np.random.default_rng(0)
    w = rng.multinomial(60, np.full(60, 1 / 60), size=4).astype(float)
    out = stats.metrics(w)
    for i in range(4):
        sw = w[i][groups]
        keep = sw > 0
        copies = sw[keep].astype(int)
        expected = point_metrics(np.repeat(y[keep], copies), np.repeat(p[keep], copies), threshold=0.5)
        assert out["roc_auc"][i] == pytest.approx(roc_auc_score(y, p, sample_weight=sw))
        assert out["pr_auc"][i] == pytest.approx(average_precision_score(y, p, sample_weight=sw))
        for name in METRIC_NAMES:
            assert out[name][i] == pytest.approx(expected[name]), name


def test_ci_contains_estimate_and_narrows_with_more_data():
    widths = []
    for n in (200, 2000):
        y, p, _ = _synthetic(n, 1, seed=2)
        res = evaluate_predictions(y, p, threshold=0.5, n_boot=300)
        for name in ("accuracy", "recall", "roc_auc", "brier"):
            low, high = res["metrics"][name]["ci95"]
            assert low <= res["metrics"][name]["value"] <= high, name
        widths.append({k: np.diff(v["ci95"])[0] for k, v in res["metrics"].items()})
    for name in METRIC_NAMES:
        assert widths[1][name] < widths[0][name], name


def test_cluster_bootstrap_is_wider_for_duplicated_patients():
    y, p, groups = _synthetic(60, 1, seed=3)
    # Ten identical copies of every patient: more images, but no more information.
    y10, p10, g10 = np.repeat(y, 10), np.repeat(p, 10), np.repeat(groups, 10)
    by_patient = bootstrap_ci(y10, p10, threshold=0.5, groups=g10, n_boot=400, seed=0)
    by_image = bootstrap_ci(y10, p10, threshold=0.5, groups=None, n_boot=400, seed=0)
    for name in ("accuracy", "roc_auc", "recall"):
        patient_width = by_patient[name].high - by_patient[name].low
        image_width = by_image[name].high - by_image[name].low
        assert patient_width > 2 * image_width, name


def test_a_perfect_score_on_seven_patients_has_a_real_interval_and_says_its_count():
    # 3 covid and 4 non_covid patients, 2 slices each, all right: the bootstrap can only draw 100%.
    groups = np.repeat(np.arange(7), 2)
    y = np.repeat([1, 1, 1, 0, 0, 0, 0], 2)
    p = np.repeat([0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.25], 2)
    assert bootstrap_ci(y, p, threshold=0.5, groups=groups)["recall"].low == 1.0  # the old, degenerate one
    res = evaluate_predictions(y, p, threshold=0.5, groups=groups, n_boot=500)
    validate_metrics_schema(res)
    for block in (res, res["patient_level"]):
        accuracy, recall = block["metrics"]["accuracy"], block["metrics"]["recall"]
        assert accuracy["value"] == 1.0 and accuracy["ci_method"] == "wilson"
        assert (accuracy["ci_n"], accuracy["ci_unit"], recall["ci_n"]) == (7, "patients", 3)
        assert accuracy["ci95"] == pytest.approx([0.646, 1.0], abs=1e-3)  # Wilson 7/7
        assert recall["ci95"][0] < 0.5  # 3 of 3 says little
        assert format_value_ci(accuracy) == "1.000 (95% CI 0.646–1.000, 7 patients)"
        # Too few patients for a bootstrap AUC or ECE: no interval, and it says so.
        assert block["metrics"]["roc_auc"]["ci95"] == [None, None]
        assert format_value_ci(block["metrics"]["ece"]).endswith("(no CI: too few, 7 patients)")


def test_wilson_interval_matches_the_textbook():
    assert wilson_interval(0.75, 20) == pytest.approx((0.531, 0.888), abs=1e-3)  # Newcombe (1998)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.278), abs=1e-3)


def test_ece_interval_holds_its_estimate_inside():
    # Well calibrated: resampling only adds noise to ECE, so the resamples sit above the estimate.
    rng = np.random.default_rng(0)
    p = rng.random(40)
    y = (rng.random(40) < p).astype(int)
    value = point_metrics(y, p, threshold=0.5)["ece"]
    plain = bootstrap_ci(y, p, threshold=0.5, n_boot=1000)["ece"]
    honest = confidence_intervals(y, p, threshold=0.5, n_boot=1000)["ece"]
    assert (value - plain.low) / (plain.high - plain.low) < 0.2  # the estimate at the plain interval's edge
    assert honest.method == "shifted percentile" and honest.n == 40
    assert 0.3 < (value - honest.low) / (honest.high - honest.low) < 0.7
    assert honest.high - honest.low == pytest.approx(plain.high - plain.low)  # same spread, moved


def test_missing_patient_ids_are_their_own_groups():
    y = np.array([1, 1, 0, 0])
    groups = ["a", None, np.nan, "a2"]
    res = evaluate_predictions(y, [0.9, 0.8, 0.2, 0.1], threshold=0.5, groups=groups, n_boot=10)
    assert res["n_patients"] == 4
    assert res["patient_level"]["n_patients"] == 4


def test_bootstrap_is_deterministic_under_seed():
    y, p, groups = _synthetic(50, 4, seed=4)
    a = evaluate_predictions(y, p, threshold=0.5, groups=groups, n_boot=200, seed=7)
    b = evaluate_predictions(y, p, threshold=0.5, groups=groups, n_boot=200, seed=7)
    c = evaluate_predictions(y, p, threshold=0.5, groups=groups, n_boot=200, seed=8)
    assert a == b
    assert a["metrics"]["roc_auc"]["ci95"] != c["metrics"]["roc_auc"]["ci95"]


def test_undefined_resamples_are_skipped_and_counted():
    y = np.array([1] + [0] * 9)
    res = evaluate_predictions(y, np.linspace(0.95, 0.05, 10), threshold=0.5, n_boot=500)
    used = res["n_bootstrap_used"]
    # A resample misses the single covid image with probability (9/10)^10 ~ 35%.
    assert 200 < used["roc_auc"] < 450 and used["recall"] == used["roc_auc"]
    assert used["accuracy"] == 500
    assert res["metrics"]["roc_auc"]["value"] == 1.0


def test_single_class_set_gives_null_auc_and_strict_json(tmp_path):
    rng = np.random.default_rng(5)
    res = evaluate_predictions(np.zeros(50, int), rng.random(50), threshold=0.5, n_boot=100)
    auc = res["metrics"]["roc_auc"]
    assert (auc["value"], auc["ci95"], auc["ci_method"]) == (None, [None, None], "none")
    assert res["metrics"]["recall"]["value"] is None
    assert res["metrics"]["specificity"]["value"] is not None
    json.dumps(res, allow_nan=False)
    path = write_metrics(res, tmp_path / "out" / "metrics.json")
    assert read_metrics(path) == json.loads(json.dumps(res))
    assert "NaN" not in path.read_text()


def test_fit_temperature_recovers_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(6)
    z_true = rng.normal(0, 2, 6000)
    y = (rng.random(z_true.size) < 1 / (1 + np.exp(-z_true))).astype(int)
    z = 2 * z_true  # twice as confident as it should be
    temperature = fit_temperature(z, y)
    assert temperature == pytest.approx(2.0, abs=0.2)
    before = expected_calibration_error(y, apply_temperature(z, 1.0))
    after = expected_calibration_error(y, apply_temperature(z, temperature))
    assert after < before / 2


def test_fit_temperature_is_bounded_and_rejects_bad_input():
    # Perfectly separated logits push T towards 0; the bound holds it.
    assert fit_temperature([-3, -1, 1, 3], [0, 0, 1, 1], bounds=(0.1, 10)) == pytest.approx(0.1, rel=1e-3)
    with pytest.raises(ManifestError, match="only one class"):
        fit_temperature([1.0, 2.0], [1, 1])
    with pytest.raises(ConfigError, match="bounds"):
        fit_temperature([1.0, -2.0], [1, 0], bounds=(2, 1))
    with pytest.raises(ConfigError, match="temperature"):
        apply_temperature([1.0], 0.0)
    with pytest.raises(ManifestError, match="NaN"):
        fit_temperature([np.nan, 1.0], [0, 1])


def test_choose_threshold_methods():
    y_val, p_val = [0, 0, 1, 1], [0.1, 0.5, 0.35, 0.8]
    # Youden: J = 0.5 at both 0.8 and 0.35; the higher threshold wins ties.
    assert choose_threshold(y_val, p_val, "youden") == 0.8
    # F1 at 0.35: precision 2/3, recall 1 -> 0.8, better than 0.667 at 0.8.
    assert choose_threshold(y_val, p_val, "f1") == 0.35
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.8], "youden") == 0.35
    assert choose_threshold(y_val, p_val, "fixed", value=0.3) == 0.3
    with pytest.raises(ConfigError, match="threshold method"):
        choose_threshold(y_val, p_val, "median")
    with pytest.raises(ConfigError, match="threshold value"):
        choose_threshold(y_val, p_val, "fixed", value=1.5)
    with pytest.raises(ManifestError, match="only one class"):
        choose_threshold([1, 1], [0.2, 0.9], "youden")


def test_threshold_and_temperature_come_from_validation_only():
    rng = np.random.default_rng(7)
    y_val = rng.integers(0, 2, 300)
    z_val = 3 * (2 * y_val - 1) + rng.normal(0, 3, 300)
    y_test = rng.integers(0, 2, 200)
    z_test = rng.normal(0, 3, 200)
    a = evaluate_from_logits(y_val, z_val, y_test, z_test, n_boot=20)
    b = evaluate_from_logits(y_val, z_val, 1 - y_test, z_test[::-1], n_boot=20)
    temperature = fit_temperature(z_val, y_val)
    assert a["temperature"] == b["temperature"] == pytest.approx(temperature)
    expected = choose_threshold(y_val, apply_temperature(z_val, temperature), "youden")
    assert a["threshold"] == b["threshold"] == pytest.approx(expected)
    assert a["threshold_method"] == "youden"
    assert a["calibration"]["ece_val_after"] <= a["calibration"]["ece_val_before"]
    validate_metrics_schema(a)
    raw = evaluate_from_logits(y_val, z_val, y_test, z_test, calibrate=False, n_boot=0)
    assert raw["temperature"] is None and raw["metrics"]["accuracy"]["ci95"] == [None, None]


def test_aggregate_by_patient_methods():
    y = [1, 1, 0, 0, 0, 1]
    p = [0.8, 0.6, 0.1, 0.2, 0.3, 0.9]
    groups = ["a", "a", "b", "b", "b", None]
    mean = aggregate_by_patient(y, p, groups)
    assert mean.patient_ids == ["a", "b", None]
    assert mean.y.tolist() == [1, 0, 1]
    assert mean.n_images.tolist() == [2, 3, 1]
    assert mean.p == pytest.approx([0.7, 0.2, 0.9])
    assert aggregate_by_patient(y, p, groups, how="max").p == pytest.approx([0.8, 0.3, 0.9])
    assert aggregate_by_patient(y, p, groups, how="noisy_or").p == pytest.approx([0.92, 0.496, 0.9])
    assert aggregate_by_patient([1, 1], [1.0, 0.5], ["x", "x"], how="noisy_or").p == pytest.approx([1.0])
    with pytest.raises(ConfigError, match="aggregate"):
        aggregate_by_patient(y, p, groups, how="median")


def test_mixed_label_patient_is_reported():
    with pytest.raises(ManifestError, match=r"'p2': 1 covid, 2 non_covid"):
        aggregate_by_patient([1, 0, 0, 1, 1], [0.1] * 5, ["p2", "p2", "p2", "p3", "p3"])
    with pytest.raises(ManifestError, match="both labels"):
        evaluate_predictions([1, 0], [0.2, 0.3], threshold=0.5, groups=["p", "p"])


def test_evaluate_predictions_patient_level():
    y, p, groups = _synthetic(40, 5, seed=8)
    res = evaluate_predictions(y, p, threshold=0.5, groups=groups, n_boot=100, aggregate="max",
                               patient_threshold=0.9)
    validate_metrics_schema(res)
    assert res["n_images"] == 200 and res["n_patients"] == 40 and res["bootstrap_unit"] == "patient"
    level = res["patient_level"]
    assert level["n_patients"] == 40 and level["threshold"] == 0.9 and level["aggregation"] == "max"
    assert np.sum(level["confusion_matrix"]) == 40
    pat = aggregate_by_patient(y, p, groups, how="max")
    assert level["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(pat.y, pat.p))
    assert evaluate_predictions(y, p, threshold=0.5, n_boot=10)["patient_level"] is None


def test_bootstrap_speed_1000_images_1000_resamples():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    start = time.perf_counter()
    bootstrap_ci(y, p, threshold=0.5, groups=None, n_boot=1000)
    # About 0.3 s on a 2-core machine; the margin keeps a busy CI runner from failing.
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"y_true": [0, 2], "p": [0.1, 0.2]}, ManifestError, "only 0"),
        ({"y_true": ["covid", "x"], "p": [0.1, 0.2]}, ManifestError, "0/1 labels"),
        ({"y_true": [], "p": []}, ManifestError, "non-empty"),
        ({"y_true": [0, 1], "p": [0.1]}, ManifestError, "one per image"),
        ({"y_true": [0, 1], "p": [0.1, 1.2]}, ManifestError, r"\[0, 1\]"),
        ({"y_true": [0, 1], "p": [0.1, 0.2], "threshold": 2.0}, ConfigError, "threshold"),
        ({"y_true": [0, 1], "p": [0.1, 0.2], "aggregate": "median"}, ConfigError, "aggregate"),
        ({"y_true": [0, 1], "p": [0.1, 0.2], "n_boot": -1}, ConfigError, "n_boot"),
        ({"y_true": [0, 1], "p": [0.1, 0.2], "n_bins": 0}, ConfigError, "n_bins"),
        ({"y_true": [0, 1], "p": [0.1, 0.2], "groups": ["a"]}, ManifestError, "one id per image"),
    ],
)
def test_evaluate_predictions_rejects_bad_input(kwargs, error, match):
    kwargs = {"threshold": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        evaluate_predictions(kwargs.pop("y_true"), kwargs.pop("p"), **kwargs)


def _valid_metrics() -> dict:
    return evaluate_predictions(Y, P, threshold=0.5, groups=list("aabbccddee"[:10]), n_boot=20)


def test_schema_accepts_extras_and_rejects_violations():
    good = _valid_metrics()
    validate_metrics_schema(good | {"dataset": "ucsd-ct"})
    required = {"n_images", "n_patients", "threshold", "metrics", "confusion_matrix", "patient_level"}
    assert set(good) >= required
    bad_cases = {
        "lacks key 'threshold'": {k: v for k, v in good.items() if k != "threshold"},
        "finite numbers or null": good | {"metrics": good["metrics"] | {"f1": {"value": float("nan"),
                                                                              "ci95": [0.1, 0.2]}}},
        "ci95 must be a list": good | {"metrics": good["metrics"] | {"f1": {"value": 0.5, "ci95": [0.1]}}},
        "lacks 'brier'": good | {"metrics": {k: v for k, v in good["metrics"].items() if k != "brier"}},
        "sum to": good | {"confusion_matrix": [[1, 1], [1, 1]]},
        "patient_level lacks": good | {"patient_level": {"n_images": 3}},
        "lacks key 'patient_level'": {k: v for k, v in good.items() if k != "patient_level"},
    }
    for match, bad in bad_cases.items():
        with pytest.raises(MetricsSchemaError, match=match):
            validate_metrics_schema(bad)
    with pytest.raises(CovidscanError, match="must be an object"):
        validate_metrics_schema([1, 2])


def test_read_metrics_reports_bad_files(tmp_path):
    with pytest.raises(MetricsSchemaError, match="not found"):
        read_metrics(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MetricsSchemaError, match="not readable JSON"):
        read_metrics(broken)
    with pytest.raises(MetricsSchemaError, match="lacks key"):
        write_metrics({"n_images": 3}, tmp_path / "m.json")


def test_bootstrap_ci_rejects_bad_settings():
    with pytest.raises(ConfigError, match="n_bins"):
        bootstrap_ci(Y, P, threshold=0.5, n_bins=0)
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_ci(Y, P, threshold=0.5, n_boot=2.5)


@pytest.mark.shared
def test_patient_level_on_real_ucsd_ct_patient_ids(shared_dir):
    import pandas as pd

    labels = pd.read_csv(shared_dir / "data" / "ucsd-ct" / "labels.csv")
    test = labels[labels["official_split"] == "test"]
    y = (test["label"] == "covid").to_numpy(int)
    p = np.clip(0.3 * y + 0.7 * np.random.default_rng(0).random(y.size), 0, 1)
    res = evaluate_predictions(y, p, threshold=0.5, groups=test["patient_id"].to_numpy(), n_boot=200)
    validate_metrics_schema(res)
    n_patients = test["patient_id"].nunique()
    assert res["n_patients"] == res["patient_level"]["n_patients"] == n_patients < y.size
    assert np.sum(res["patient_level"]["confusion_matrix"]) == n_patients


# --------------------------------------------------------------------------------------------- Calibration
def test_calibration_fits_proba_label_uncertain_and_round_trips():
    from covidscan.evaluation import Calibration

    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2.0, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    z = 3.0 * true_logit  # informative but three times over-confident
    cal = Calibration.fit(z, y, band=0.2)
    assert cal.temperature == pytest.approx(3.0, rel=0.15) and not cal.notes
    p = cal.proba(z)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-z / cal.temperature)))
    np.testing.assert_allclose(cal.proba(torch.tensor(z)), p, atol=1e-6)  # torch and numpy: one path
    assert (cal.label(p) == np.where(p >= cal.threshold, "covid", "non_covid")).all()
    assert (cal.uncertain(p) == (np.abs(p - cal.threshold) < 0.1)).all()
    assert Calibration.model_validate_json(cal.model_dump_json()) == cal


@pytest.mark.parametrize(
    ("z", "y", "note"),
    [
        (np.linspace(-1, 1, 10), np.array([0, 1] * 5), "10 images"),  # too few to fit a temperature
        (np.random.default_rng(1).normal(0, 3, 200), np.random.default_rng(2).integers(0, 2, 200), "bound"),
        (np.r_[-np.ones(50) * 30, np.ones(50) * 30], np.r_[np.zeros(50), np.ones(50)].astype(int), "bound"),
    ],
)
def test_calibration_falls_back_to_no_scaling_and_says_so(z, y, note):
    from covidscan.evaluation import Calibration

    cal = Calibration.fit(z, y)
    assert cal.temperature == 1.0 and any(note in n for n in cal.notes)


def test_calibration_on_one_class_validation_fixes_the_threshold():
    from covidscan.evaluation import Calibration

    cal = Calibration.fit(np.linspace(-2, 2, 40), np.zeros(40, int), fixed_threshold=0.5)
    assert cal.threshold == 0.5 and cal.method == "fixed" and cal.temperature == 1.0
    assert any("one class" in n for n in cal.notes)
