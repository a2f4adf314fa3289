"""The README's main job, on a smaller phantom set so that it runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidscan.demo import run_demo
from covidscan.inference import Predictor


@pytest.mark.slow
def test_demo_writes_audit_run_and_report(tmp_path: Path):
    report = run_demo(tmp_path, n=48, progress=False)
    assert report == tmp_path / "run" / "report.md" and "## Figures" in report.read_text()
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["n_images"] == 48
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    # The demo's own evaluation is honest: no patient sits in two splits.
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test = splits[splits["split"] == "test"]
    assert metrics["n_images"] == len(test) and sum(metrics["class_counts"].values()) == len(test)
    # What the report states is what a user predicting the same files gets from the saved run (in fp32, as
    # training scored them; bf16, where the CPU has it, moves these probabilities by up to ~0.02).
    saved = pd.read_csv(tmp_path / "run" / "predictions.csv")
    again = Predictor.from_run(tmp_path / "run", precision="fp32").predict(test["path"].tolist())
    np.testing.assert_allclose([p.p_covid for p in again], saved["p_covid"], atol=1e-5)
    accuracy = metrics["metrics"]["accuracy"]["value"]
    cut = metrics["threshold"]
    assert accuracy == np.mean((saved["p_covid"] >= cut) == (saved["label"] == "covid"))
