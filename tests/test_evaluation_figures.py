"""covidscan.evaluation figures (PNG files) and the report.md / terminal table writers."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from covidscan.errors import ManifestError
from covidscan.evaluation import (
    MetricsSchemaError,
    evaluate_from_logits,
    evaluate_predictions,
    format_metrics_table,
    make_figures,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_sample_grid,
    plot_training_curves,
    write_report,
)

RNG = np.random.default_rng(0)
Y = RNG.integers(0, 2, 120)
P = np.clip(0.4 * Y + 0.6 * RNG.random(120), 0, 1)
HISTORY = [
    {"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e, "val_loss": 1.2 / e, "val_acc": 0.7}
    for e in range(1, 6)
]


def _assert_png(path, min_side=200, max_side=3000):
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_side <= min(image.size) and max(image.size) <= max_side


@pytest.mark.parametrize(
    ("name", "draw"),
    [
        ("curves", lambda path: plot_training_curves(HISTORY, path)),
        ("curves_partial", lambda path: plot_training_curves([{"epoch": 1, "train_loss": 0.5}], path)),
        ("confusion", lambda path: plot_confusion_matrix([[50, 10], [5, 55]], path)),
        ("confusion_empty_row", lambda path: plot_confusion_matrix([[0, 0], [5, 55]], path)),
        ("roc", lambda path: plot_roc(Y, P, path, threshold=0.5)),
        ("roc_one_class", lambda path: plot_roc(np.zeros(20, int), P[:20], path, threshold=0.5)),
        ("reliability", lambda path: plot_reliability(Y, P, path, n_bins=10)),
        ("samples", lambda path: plot_sample_grid(
            [(RNG.random((64, 64)).astype(np.float32), label, p)
             for label, p in [("covid", 0.93), ("non_covid", 0.7), (1, 0.2), (0, 0.1), (True, 0.6)]],
            path, ncols=3)),
    ],
)
def test_each_figure_writes_a_png(tmp_path, name, draw):
    path = tmp_path / "sub" / f"{name}.png"
    assert draw(path) == path
    _assert_png(path)


@pytest.mark.parametrize(
    ("draw", "match"),
    [
        (lambda path: plot_training_curves([], path), "history is empty"),
        (lambda path: plot_confusion_matrix([[1, 2, 3]], path), "2x2"),
        (lambda path: plot_sample_grid([], path), "no samples"),
        (lambda path: plot_sample_grid([(np.zeros((4, 4, 3)), 1, 0.5)], path), "2-D gray"),
        (lambda path: plot_sample_grid([(np.zeros((4, 4)), "pneumonia", 0.5)], path), "pneumonia"),
        (lambda path: plot_sample_grid([(np.zeros((4, 4)), 1, 1.5)], path), r"\[0, 1\]"),
        (lambda path: plot_roc([0, 1], [0.2], path), "one per image"),
    ],
)
def test_figures_reject_bad_input(tmp_path, draw, match):
    with pytest.raises(ManifestError, match=match):
        draw(tmp_path / "x.png")


def test_make_figures_and_report(tmp_path):
    groups = np.repeat(np.arange(40), 3)
    y = Y.reshape(40, 3)[:, 0].repeat(3)  # one label per patient
    z = 4 * (y - 0.5) + RNG.normal(0, 2, y.size)
    metrics = evaluate_from_logits(y, z, y, z, groups_val=groups, groups_test=groups, n_boot=50)
    samples = [(RNG.random((32, 32)), int(y[i]), 0.5) for i in range(4)]
    figures = make_figures(tmp_path / "figures", y, 1 / (1 + np.exp(-z / metrics["temperature"])),
                           threshold=metrics["threshold"], history=HISTORY, samples=samples)
    assert set(figures) == {"confusion_matrix", "roc", "reliability", "training_curves", "samples"}
    for path in figures.values():
        _assert_png(path)
    report = write_report(tmp_path, title="UCSD-CT test", metrics=metrics, figures=figures,
                          config={"model": "resnet50", "lr": 1e-4, "size": (224, 224)}, notes=["a note"])
    text = report.read_text()
    assert report == tmp_path / "report.md"
    assert text.startswith("# UCSD-CT test")
    assert "| metric | value | 95% CI |" in text and "| sensitivity (recall) |" in text
    assert "![roc](figures/roc.png)" in text and "![samples](figures/samples.png)" in text
    assert "## Patient-level results" in text and "out of 100 COVID patients" in text
    assert "out of 100 COVID images, about **" in text and "raise a false alarm" in text
    assert f"T = {metrics['temperature']:.3f}" in text and "resamples of patients" in text
    assert "'youden' rule" in text and "- a note" in text and "lr: 0.0001" in text
    assert "| **true covid** |" in text
    # Every interval says how many units it rests on, in the tables and in plain words.
    assert re.search(r"are flagged as COVID \(95% CI \d+–\d+, \d+ patients\)", text)
    assert re.search(r"\| accuracy \| [\d.]+ \| [\d.]+ – [\d.]+ \((bootstrap|Wilson), 40 patients\) \|", text)
    assert "Wilson score interval on the units" in text


def test_report_for_one_class_set_without_patients(tmp_path):
    metrics = evaluate_predictions(np.zeros(30, int), P[:30], threshold=0.4, n_boot=20)
    figures = {"roc": tmp_path / "nope.png"}
    text = write_report(tmp_path / "ext", title="External", metrics=metrics, figures=figures,
                        config=None, notes=[]).read_text()
    assert "Sensitivity cannot be measured here" in text and "about **" in text
    assert "resamples of images" in text and "too narrow" in text and "No temperature scaling" in text
    assert "(file missing)" in text and "](../nope.png)" in text
    assert "Patient-level" not in text and "## Configuration" not in text


def test_format_metrics_table():
    groups = np.arange(30) // 2
    metrics = evaluate_predictions(np.zeros(30, int), P[:30], threshold=0.5, groups=groups, n_boot=20)
    table = format_metrics_table(metrics)
    assert table.splitlines()[0] == "Image level: 30 images, 15 patients, threshold p(covid) >= 0.500"
    assert "| ROC AUC | n/a | n/a |" in table
    assert "Patient level (mean of images): 30 images, 15 patients" in table
    assert table.count("| metric | value | 95% CI |") == 2
    with pytest.raises(MetricsSchemaError):
        format_metrics_table({"n_images": 1})
