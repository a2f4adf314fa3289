"""The command line, in-process with Typer's CliRunner; one real subprocess checks the console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from covidscan import __version__
from covidscan.cli import app
from covidscan.data.synthetic import make_phantom


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def covidscan(*args: str, cwd: Path | None = None) -> Outcome:
    """Run the command line in this process (as `covidscan ARGS` in ``cwd``)."""
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, list(args), prog_name="covidscan")
    finally:
        os.chdir(old)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the user would have seen: fail loudly
    return Outcome(result.exit_code, result.stdout, result.stderr)


def test_console_entry_point_in_a_real_process(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "covidscan", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and __version__ in result.stdout
    result = subprocess.run([sys.executable, "-m", "covidscan", "evaluate", str(tmp_path), "--data",
                             str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "40"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # One line even on a narrow, non-terminal stderr.
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def _tree(root: Path, per_class: int = 6) -> Path:
    """A folder per class of small CT phantom slices (the quality gate judges content: no noise images)."""
    for label in ("COVID", "normal"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = make_phantom(i, modality="ct", covid=label == "COVID", size=64).image
            Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(folder / f"{label}{i}.png")
    return root


def test_version_and_help():
    result = covidscan("--help")
    assert result.returncode == 0
    for command in ("data", "preprocess", "train", "evaluate", "reproduce", "demo", "predict", "export"):
        assert command in result.stdout


def test_data_scan_split_audit(tmp_path: Path):
    root = _tree(tmp_path / "images")
    manifest = tmp_path / "m.csv"
    assert covidscan("data", "scan", str(root), "--out", str(manifest)).returncode == 0
    df = pd.read_csv(manifest)
    assert sorted(df["label"].unique()) == ["covid", "non_covid"] and len(df) == 12

    split = tmp_path / "split.csv"
    result = covidscan(
        "data", "split", str(manifest), "--by", "image", "--ratios", "0.5,0.5", "--out", str(split)
    )
    assert result.returncode == 0, result.stderr
    assert set(pd.read_csv(split)["split"]) == {"train", "test"}

    audit = tmp_path / "audit.json"
    result = covidscan("data", "audit", str(split), "--out", str(audit))
    assert result.returncode == 0, result.stderr
    assert json.loads(audit.read_text())["n_images"] == 12


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data", "audit", "no/such/manifest.csv"], "no/such/manifest.csv"),
        (["data", "split", "{tree}", "--ratios", "0.7,x"], "--ratios"),
        (["train", "paper-z", "--data", "{tree}", "--out", "run"], "paper-a-resnet50"),
        (["evaluate", "{tree}", "--data", "{tree}", "--out", "out"], "not a covidscan run directory"),
        (["reproduce", "paper-c", "--data", "{tree}", "--out", "out"], "paper-a"),
        (["predict", "{tree}", "{tree}"], "not a covidscan run directory"),
        (["export", "{tree}", "--onnx", "m.onnx"], "not a covidscan run directory"),
        (["predict", "{tree}", "{tree}", "--out", "p.txt"], ".csv or .json"),
        (["predict", "missing-run", "{tree}"], "does not exist"),
    ],
)
def test_errors_are_one_clear_line(tmp_path: Path, args: list[str], expected: str):
    tree = str(_tree(tmp_path / "images"))
    result = covidscan(*(a.replace("{tree}", tree) for a in args), cwd=tmp_path)
    assert result.returncode == 2
    assert "error:" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


def test_label_typo_is_named(tmp_path: Path):
    root = _tree(tmp_path / "images")
    manifest = tmp_path / "m.csv"
    paths = sorted(str(p) for p in root.rglob("*.png"))
    pd.DataFrame({"path": paths, "label": ["covd"] + ["covid"] * (len(paths) - 1)}).to_csv(
        manifest, index=False
    )
    result = covidscan("data", "audit", str(manifest))
    assert result.returncode == 2 and "covd" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_predict_and_export(tiny_run: Path, phantom_manifest: Path, tmp_path: Path):
    images = sorted(phantom_manifest.parent.glob("images/*/*.png"))[:3]
    assert images, "phantom images expected"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    preds = tmp_path / "preds.json"
    result = covidscan(
        "predict", str(tiny_run), *map(str, images), str(broken),
        "--out", str(preds), "--cam", str(tmp_path / "cam"),
    )
    assert result.returncode == 0, result.stderr
    assert "0 refused, 1 unreadable" in result.stdout and "broken.png" in result.stderr
    doc = json.loads(preds.read_text())
    rows = doc["images"]
    assert [Path(r["path"]).name for r in rows] == [p.name for p in images] + ["broken.png"]
    assert all(0.0 <= r["p_covid"] <= 1.0 and r["label"] in ("covid", "non_covid") for r in rows[:3])
    assert rows[3]["p_covid"] is None and "broken.png" in rows[3]["error"]
    assert all(Path(r["cam_png"]).is_file() for r in rows[:3])

    onnx = tmp_path / "model.onnx"
    result = covidscan("export", str(tiny_run), "--onnx", str(onnx))
    assert result.returncode == 0, result.stderr
    assert onnx.stat().st_size > 1000
    csv = tmp_path / "preds.csv"
    result = covidscan(
        "predict", str(tiny_run), *map(str, images),
        "--engine", "onnx", "--onnx", str(onnx), "--out", str(csv),
    )
    assert result.returncode == 0, result.stderr
    by_onnx = pd.read_csv(csv)["p_covid"].to_numpy()
    # The torch engine may run in bf16 (when the run passed its bf16 check); fp32 parity is in test_export.
    assert np.allclose(by_onnx, [r["p_covid"] for r in rows[:3]], atol=0.02)


def test_quiet_flag_after_the_subcommand_and_exact_output_names(phantom_manifest: Path, tmp_path: Path):
    sheet = tmp_path / "sheet"  # no suffix: written exactly there, as a PNG
    result = covidscan("preprocess", "preview", str(phantom_manifest), "--out", str(sheet), "--n", "4", "-q")
    assert result.returncode == 0, result.stderr
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "sheet.png").exists()
    result = covidscan("preprocess", "preview", str(phantom_manifest), "--out", str(tmp_path / "s.jpg"))
    assert result.returncode == 2 and "PNG" in result.stderr


def test_unwritable_output_is_one_error_line(tiny_run: Path, phantom_manifest: Path, tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a folder")
    images = sorted(phantom_manifest.parent.glob("images/*/*.png"))[:1]
    result = covidscan("predict", str(tiny_run), str(images[0]), "--out", str(blocker / "p.csv"))
    assert result.returncode == 2 and "error: cannot write predictions" in result.stderr
    assert "a_file" in result.stderr


@pytest.mark.slow
def test_export_prints_no_tool_chain_logs(tiny_run: Path, tmp_path: Path, caplog):
    with caplog.at_level("INFO"):
        result = covidscan("export", str(tiny_run), "--onnx", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert not [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir", "torch.onnx"))]


def test_library_warnings_print_as_warning_lines(phantom_manifest: Path, tmp_path: Path, monkeypatch):
    from covidscan import cli

    monkeypatch.setattr("warnings.showwarning", cli._show_warning)  # what main() installs
    result = covidscan("data", "split", str(phantom_manifest), "--by", "image", "--resplit",
                       "--out", str(tmp_path / "s.csv"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "patient" in line]
    assert lines and all(line.startswith("warning: ") for line in lines)
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr
