"""`covidscan data scan/split/audit` as a user runs them: patient ids, the quality list, label reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from test_cli import covidscan


def _noise(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (128, 128), dtype=np.uint8)).save(path)


def test_scan_with_patient_folders_lists_refused_files(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for c, label in enumerate(("covid", "normal")):
        for p in range(4):
            for i in range(2):
                _noise(root / label / f"{label}{p}" / f"{i}.png", seed=10 * c + 2 * p + i)
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(root / "covid" / "covid0" / "black.png")
    manifest = tmp_path / "m.csv"
    with pytest.warns(UserWarning, match="1 refused images left out"):
        result = covidscan("data", "scan", str(root), "--patient-from", "folder", "--out", str(manifest))
    assert result.returncode == 0, result.stderr
    assert "8 patients" in result.stdout and "1 refused (left out)" in result.stdout
    df = pd.read_csv(manifest)
    assert len(df) == 16 and df.groupby("patient_id").size().eq(2).all()
    quality = pd.read_csv(tmp_path / "m.quality.csv")
    assert quality[["status", "reasons"]].values.tolist() == [
        ["refused", "constant: every pixel is 0.00 (all black)"]]


def test_split_without_patient_ids_names_the_options(tmp_path: Path) -> None:
    for i in range(6):
        _noise(tmp_path / "covid" / f"c{i}.png", seed=i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"covid/c{i}.png,covid\n" for i in range(6)))
    result = covidscan("data", "split", str(manifest), "--out", str(tmp_path / "s.csv"))
    assert result.returncode == 2
    error = " ".join(result.stderr.split())
    assert error.startswith("error: cannot split by patient: the manifest has no patient ids")
    for option in ("--patient-from dicom", "--patient-from folder", "`data split --by image`"):
        assert option in error, option
