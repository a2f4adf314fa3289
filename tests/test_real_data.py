"""Integration on the real sets in ../shared: train, evaluate externally, predict files and DICOM.

Small on purpose (88 ucsd-ct slices, MobileNetV2 at 112 px, 3 epochs): it checks that the real-data path
works end to end and that its parts agree, not how good the model is (benchmarks/real_data.sh measures that).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidscan.config import load_config
from covidscan.data import read_manifest
from covidscan.inference import evaluate_run, predict
from covidscan.training import train_experiment

# Each test trains or reads real data for tens of seconds: CI runs them with the slow tests.
pytestmark = pytest.mark.slow

PER_CLASS = {"train": 24, "val": 10, "test": 10}


@pytest.fixture(scope="module")
def real_run(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Paper A's preset, offline MobileNetV2 ImageNet weights, on a slice of ucsd-ct's official split."""
    df = read_manifest(shared_dir / "data" / "ucsd-ct" / "labels.csv")
    subset = pd.concat(
        df[(df["split"] == split) & (df["label"] == label)].head(n)
        for split, n in PER_CLASS.items()
        for label in ("covid", "non_covid")
    )
    tmp = tmp_path_factory.mktemp("real")
    subset[["path", "label", "patient_id", "split"]].to_csv(tmp / "subset.csv", index=False)
    cfg = load_config(
        "paper-a-resnet50",
        [
            "model.backbone=mobilenet_v2",
            f"model.weights={shared_dir / 'weights' / 'mobilenet_v2_imagenet_coral_dequant.pth'}",
            "model.input_size=112",
            "train.epochs=3",
            "train.views=1",
            "evaluation.n_bootstrap=50",
        ],
    )
    train_experiment(cfg, tmp / "subset.csv", tmp / "run", progress=False)
    return tmp / "run"


@pytest.mark.shared
def test_real_run_predictions_agree_with_predict(real_run: Path):
    test = pd.read_csv(real_run / "predictions.csv")
    assert len(test) == 2 * PER_CLASS["test"]
    df = predict(real_run, test["path"].tolist(), fast=False, progress=False)
    assert (df["error"] == "").all() and df["lungs_found"].all()
    # The run's own test evaluation and the inference path give the same calibrated probabilities.
    np.testing.assert_allclose(df["p_covid"].to_numpy(), test["p_covid"].to_numpy(), atol=1e-4)
    # Each ucsd-ct patient gets one patient-level probability, the mean of its slices.
    by_patient = df.groupby("group_id")["p_covid"].mean()
    np.testing.assert_allclose(df["group_p_covid"], df["group_id"].map(by_patient), atol=1e-9)


@pytest.mark.shared
def test_real_run_on_the_external_ct_set(real_run: Path, shared_dir: Path, tmp_path: Path):
    luna = read_manifest(shared_dir / "data" / "ct-ext-luna16" / "labels.csv").head(16)
    luna.to_csv(tmp_path / "luna.csv", index=False)
    metrics = evaluate_run(real_run, tmp_path / "luna.csv", tmp_path / "ext", progress=False)
    assert metrics["n_images"] == 16
    # An all-negative external set measures specificity only; sensitivity is undefined, not 0.
    assert metrics["metrics"]["recall"]["value"] is None
    assert 0.0 <= metrics["metrics"]["specificity"]["value"] <= 1.0
    assert (tmp_path / "ext" / "report.md").is_file()


@pytest.mark.shared
def test_real_dicom_samples_are_predicted_and_checked(real_run: Path, shared_dir: Path, tmp_path: Path):
    df = predict(real_run, [shared_dir / "data" / "dicom"], cam_dir=tmp_path / "cam", progress=False)
    rows = {Path(p).name: row for p, row in zip(df["path"], df.to_dict("records"), strict=True)}
    assert set(rows) == {"CT_small.dcm", "RG1_J2KR.dcm"}
    ct, cr = rows["CT_small.dcm"], rows["RG1_J2KR.dcm"]
    assert ct["error"] == "" and 0.0 <= ct["p_covid"] <= 1.0 and Path(ct["cam_png"]).is_file()
    # A chest radiograph given to a CT model is refused, never silently scored.
    assert "wrong_modality: DICOM Modality CR" in cr["error"] and pd.isna(cr["p_covid"])
