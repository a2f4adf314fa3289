"""The README's main job, on a smaller phantom set so that it runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from covidscan.demo import run_demo


def test_demo_writes_audit_run_and_report(tmp_path: Path):
    report = run_demo(tmp_path, n=48, progress=False)
    assert report == tmp_path / "run" / "report.md" and "## Figures" in report.read_text()
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["n_images"] == 48
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    # The demo's own evaluation is honest: no patient sits in two splits.
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_images"] == (splits["split"] == "test").sum()
    assert 0.0 <= metrics["metrics"]["roc_auc"]["value"] <= 1.0
