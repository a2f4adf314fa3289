"""Local validation at a site (issue 14 §3): local figures, their course, site status, teaching order."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation import SiteRules, course, course_plot, local_figures, site_status, teaching_order
from covidscan.evaluation.site import FIGURES, patient_order, recent


def signed_cases(n_patients: int, *, skill: float, seed: int = 0, slices: int = 2):
    """``slices`` images per patient, classes alternating; ``skill`` 0 = coin flip, 1 = near perfect."""
    rng = np.random.default_rng(seed)
    y_patient = np.arange(n_patients) % 2
    y = np.repeat(y_patient, slices)
    ids = np.repeat([f"pt-{i:03d}" for i in range(n_patients)], slices)
    p = np.clip(0.5 + skill * 0.4 * (2 * y - 1) + rng.normal(0, 0.2, y.size), 0, 1)
    return y, p, ids


def test_local_figures_are_the_run_against_the_signed_findings_with_patient_cis():
    y, p, ids = signed_cases(60, skill=0.6)
    figures = local_figures(y, p, ids, 0.5, n_boot=300)
    label = p >= 0.5
    assert figures.value("sensitivity") == pytest.approx(label[y == 1].mean())
    assert figures.value("specificity") == pytest.approx((~label[y == 0]).mean())
    assert figures.value("ppv") == pytest.approx(y[label].mean())
    assert figures.value("npv") == pytest.approx(1 - y[~label].mean())
    assert figures.value("roc_auc") == pytest.approx(roc_auc_score(y, p))
    assert figures.value("agreement") == pytest.approx((label == y).mean())  # no first read: the verdict
    assert 0 < figures.value("ece") < 0.5
    assert (figures.n_patients, figures.n_images, figures.n_covid_patients, figures.n_non_covid_patients) == (
        60, 120, 30, 30)
    for name in FIGURES:
        entry = figures.metrics[name]
        assert entry["ci_unit"] == "patients"
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert figures.metrics["sensitivity"]["ci_n"] == 30  # the covid patients, not the images
    assert "95% CI" in figures.text("roc_auc") and "60 patients" in figures.text("roc_auc")
    assert json.loads(json.dumps(figures.to_dict())) == figures.to_dict()
    assert set(figures.to_dict()["metrics"]) == set(FIGURES)


def test_agreement_compares_the_model_with_the_first_read():
    y, p, ids = signed_cases(40, skill=0.6)
    read = y.copy()
    read[:20] = 1 - read[:20]  # the doctor's first read differed from the signed verdict on 10 patients
    figures = local_figures(y, p, ids, 0.5, first_read=read, n_boot=100)
    assert figures.value("agreement") == pytest.approx(((p >= 0.5) == read).mean())
    assert figures.value("sensitivity") == local_figures(y, p, ids, 0.5, n_boot=100).value("sensitivity")


def test_few_patients_get_wilson_intervals_and_no_auc_interval():
    y, p, ids = signed_cases(6, skill=0.8)
    figures = local_figures(y, p, ids, 0.5, n_boot=200)
    assert figures.metrics["sensitivity"]["ci_method"] == "wilson"
    assert figures.metrics["roc_auc"]["ci_method"] == "too few" and figures.low("roc_auc") is None
    assert "no CI: too few" in figures.text("roc_auc")
    only_covid = local_figures([1, 1], [0.7, 0.2], ["a", "b"], 0.5, n_boot=50)
    assert only_covid.value("specificity") is None and only_covid.value("roc_auc") is None


def test_bad_signed_cases_are_refused_with_one_clear_error():
    with pytest.raises(ManifestError, match="patient_ids has 2 entries for 3 signed cases"):
        local_figures([0, 1, 1], [0.1, 0.9, 0.8], ["a", "b"], 0.5)
    with pytest.raises(ManifestError, match="probabilities in \\[0, 1\\]"):
        local_figures([0, 1], [0.1, 1.7], ["a", "b"], 0.5)
    with pytest.raises(ManifestError, match="first_read has 1 entries"):
        local_figures([0, 1], [0.1, 0.7], ["a", "b"], 0.5, first_read=[1])
    with pytest.raises(ConfigError, match="threshold"):
        local_figures([0, 1], [0.1, 0.7], ["a", "b"], 1.5)


def test_course_follows_the_signing_order_of_patients():
    assert patient_order(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]
    y, p, ids = signed_cases(35, skill=0.6)
    shuffled = np.random.default_rng(1).permutation(y.size)  # a patient's slices signed at different times
    y, p, ids = y[shuffled], p[shuffled], ids[shuffled]
    points = course(y, p, ids, 0.5, step=10, n_boot=50)
    assert [f.n_patients for f in points] == [10, 20, 30, 35]
    first_ten = list(dict.fromkeys(ids))[:10]
    keep = np.isin(ids, first_ten)
    assert points[0].n_images == keep.sum()  # every signed slice of the first ten patients
    assert points[0].to_dict() == local_figures(y[keep], p[keep], ids[keep], 0.5, n_boot=50).to_dict()
    assert points[-1].to_dict() == local_figures(y, p, ids, 0.5, n_boot=50).to_dict()
    with pytest.raises(ConfigError, match="step=0"):
        course(y, p, ids, 0.5, step=0)


def test_course_plot_is_a_png_with_three_panels():
    y, p, ids = signed_cases(60, skill=0.6)
    png = course_plot(course(y, p, ids, 0.5, n_boot=100), rules=SiteRules(), title="site A")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > 2 * image.size[1]
    with pytest.raises(ManifestError, match="no signed cases"):
        course_plot([])


RULES = SiteRules()


def test_site_rules_defaults_and_validation():
    assert (RULES.min_patients, RULES.sensitivity_target, RULES.specificity_target, RULES.recent_window) == (
        50, 0.70, 0.70, 50)
    with pytest.raises(ValidationError):
        SiteRules(sensitivity_target=1.2)
    with pytest.raises(ValidationError):
        SiteRules(min_patient=10)  # a typo is refused, not ignored


def test_new_site_until_something_is_known():
    assert site_status(None, None, None, RULES, 0) == "new"
    assert site_status(None, None, None, RULES, 12) == "new"  # too few images to test for a shift yet
    assert site_status(False, None, None, RULES, 80) == "new"  # no alarm, no verdict
    assert site_status(True, None, None, RULES, 0) == "new"


def test_alarm_without_verdicts_is_shifted_then_verdicts_make_it_validating():
    assert site_status(True, None, None, RULES, 30) == "shifted"
    y, p, ids = signed_cases(5, skill=1.0)
    assert site_status(True, local_figures(y, p, ids, 0.5, n_boot=50), None, RULES, 40) == "validating"


def test_validating_until_enough_patients_and_lower_bounds_above_targets():
    y, p, ids = signed_cases(40, skill=1.0)
    few = local_figures(y, p, ids, 0.5, n_boot=200)
    assert few.low("sensitivity") > 0.7 and few.low("specificity") > 0.7  # good, but only 40 patients
    assert site_status(False, few, None, RULES, 80) == "validating"
    y, p, ids = signed_cases(200, skill=0.0)  # a coin flip never passes, however many verdicts
    assert site_status(True, local_figures(y, p, ids, 0.5, n_boot=200), None, RULES, 400) == "validating"
    # good point values but a lower bound below the target: not yet
    y, p, ids = signed_cases(50, skill=0.45, seed=3)
    borderline = local_figures(y, p, ids, 0.5, n_boot=200)
    assert borderline.value("sensitivity") > 0.7 and borderline.low("sensitivity") <= 0.7
    assert site_status(False, borderline, None, RULES, 100) == "validating"


def test_validated_when_its_own_figures_say_so_and_degraded_when_a_recent_window_falls_below():
    y, p, ids = signed_cases(60, skill=1.0)
    good = local_figures(y, p, ids, 0.5, n_boot=200)
    assert site_status(True, good, None, RULES, 120) == "validated"  # an old alarm does not stop it
    assert site_status(False, good, recent(y, p, ids, 0.5, RULES.recent_window, n_boot=50), RULES,
                       120) == "validated"
    # later cases are read much worse: the last 50 patients' sensitivity falls below the target
    y2, p2, ids2 = signed_cases(50, skill=0.0, seed=4)
    ids2 = np.char.add("late-", ids2.astype(str))
    y_all, p_all, ids_all = np.r_[y, y2], np.r_[p, p2], np.r_[ids, ids2]
    window = recent(y_all, p_all, ids_all, 0.5, RULES.recent_window, n_boot=50)
    assert window is not None and window.n_patients == 50 and window.value("sensitivity") < 0.7
    assert site_status(False, good, window, RULES, 220) == "degraded"
    # a window not yet full says nothing
    assert recent(y2, p2, ids2, 0.5, 60) is None
    short = local_figures(y2[:20], p2[:20], ids2[:20], 0.5, n_boot=50)
    assert site_status(False, good, short, RULES, 220) == "validated"
    # a drop that pulls every signed case below the rule makes the site validating again
    everything = local_figures(np.r_[y2, y2], np.r_[p2, p2], np.r_[ids2, np.char.add(ids2, "b")], 0.5,
                               n_boot=50)
    assert site_status(False, everything, window, RULES, 220) == "validating"
    with pytest.raises(ConfigError, match="n_images_seen"):
        site_status(None, None, None, RULES, -1)


def test_teaching_order_puts_uncertain_cases_unlike_the_signed_ones_first():
    signed = np.array([[1.0, 0.0, 0.0]])
    features = np.array([[1.0, 0.01, 0.0],   # 0: like a signed case, certain
                         [0.0, 1.0, 0.0],    # 1: unlike, certain
                         [1.0, 0.02, 0.0],   # 2: like a signed case, uncertain
                         [0.0, 0.0, 1.0],    # 3: unlike, uncertain
                         [0.0, 0.02, 1.0]])  # 4: a near duplicate of 3, uncertain
    p = np.array([0.05, 0.95, 0.52, 0.50, 0.49])
    order = teaching_order(p, features, signed, 0.5)
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]
    assert order[0] == 3 and order[-1] == 0
    assert order.tolist().index(4) > order.tolist().index(1)  # once 3 is asked for, its twin teaches little
    assert teaching_order(p, features, signed, 0.5, uncertainty_weight=1.0)[:3].tolist() == [3, 4, 2]
    # nothing signed yet: distance to the picks so far still spreads the batch
    assert teaching_order(p, features, None, 0.5).tolist()[:2] != [3, 4]
    assert teaching_order(np.zeros(0), np.zeros((0, 3)), signed, 0.5).tolist() == []


def test_teaching_order_refuses_mismatched_features():
    with pytest.raises(ManifestError, match="features has 2 rows for 3 unsigned cases"):
        teaching_order([0.1, 0.2, 0.3], np.ones((2, 4)), None, 0.5)
    with pytest.raises(ManifestError, match="signed_features has 3 columns, features 4"):
        teaching_order([0.1, 0.2], np.ones((2, 4)), np.ones((1, 3)), 0.5)
    with pytest.raises(ManifestError, match="finite 2-D array"):
        teaching_order([0.1], np.array([[np.nan, 1.0]]), None, 0.5)
    with pytest.raises(ConfigError, match="uncertainty_weight"):
        teaching_order([0.1], np.ones((1, 2)), None, 0.5, uncertainty_weight=2)
