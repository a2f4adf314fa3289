"""The shortcut probe (covidscan.evaluation.probe) and `data audit --probe`, on generated phantoms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError, ManifestError
from covidscan.evaluation.probe import MaskMethod, ProbeResult, ProbeScore, add_probe, shortcut_probe
from test_cli import covidscan

N_PATIENTS = 20
MARKER = (slice(6, 14), slice(6, 14))
"""A bright 8x8 corner mark: outside the body, and too small for the lung finder's body hull (a larger one
pulls the hull into the corner and changes the lung masks, which would leak the mark into the lungs view)."""


def _marked(root: Path, modality: str) -> Path:
    rows = []
    for patient in range(N_PATIENTS):
        covid = patient % 2 == 1
        for s in range(2):
            image = make_phantom(1000 + 10 * patient + s, modality=modality, covid=False, size=128,
                                 anatomy_seed=patient).image
            pixels = np.round(image * 255).astype(np.uint8)
            if covid:
                pixels[MARKER] = 255
            path = root / f"p{patient:02d}-s{s}.png"
            cv2.imwrite(str(path), pixels)
            rows.append({"path": str(path), "label": "covid" if covid else "non_covid",
                         "patient_id": f"p{patient:02d}"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="module")
def marker_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Non-COVID CT phantoms only, half of the patients labelled covid and marked in a corner: the label
    lies outside the lungs and nowhere else."""
    return _marked(tmp_path_factory.mktemp("marker"), "ct")


@pytest.fixture(scope="module")
def xray_marker_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with X-ray phantoms (the quality gate refuses CT slices given as X-rays)."""
    return _marked(tmp_path_factory.mktemp("xray-marker"), "cxr")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init MobileNetV2 state_dict (seeded), standing in for ImageNet weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def probed(marker_manifest: Path, weights: Path) -> ProbeResult:
    return shortcut_probe(pd.read_csv(marker_manifest), modality="ct", weights=weights, size=64, n_boot=200)


def test_a_mark_outside_the_lungs_is_found_there_and_not_in_the_lungs(probed: ProbeResult) -> None:
    assert probed.outside_lungs.value >= 0.85
    assert probed.lungs_only.value <= 0.7 and probed.mask_only.value <= 0.7
    low, high = probed.outside_lungs.ci95
    assert low is not None and low <= probed.outside_lungs.value <= high
    assert low > probed.lungs_only.value
    assert any(w.startswith("shortcut risk") for w in probed.warnings)


def test_the_result_records_how_it_was_made(probed: ProbeResult, weights: Path) -> None:
    d = json.loads(json.dumps(probed.to_dict()))
    assert d["mask_method"] == "contour" and "find_lungs" in d["mask_description"]
    assert (d["backbone"], d["weights"], d["size"]) == ("mobilenet_v2", str(weights), [64, 64])
    assert (d["unit"], d["folds"], d["n_images"], d["n_used"], d["n_patients"]) == ("patient", 5, 40, 40, 20)
    assert (d["n_no_lungs"], d["no_lungs_share"], d["excluded"]) == (0, 0.0, [])
    assert all(set(d[v]) == {"value", "ci95"} for v in ("outside_lungs", "lungs_only", "mask_only"))
    assert d["warnings"] == probed.warnings and "patients" in d["ci_method"]


def test_unusable_images_are_left_out_and_counted(
    marker_manifest: Path, weights: Path, tmp_path: Path
) -> None:
    df = pd.read_csv(marker_manifest).drop(columns="patient_id")[:16]  # no ids: images are the units
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    flat = tmp_path / "no-lungs.png"  # a CT slice whose lungs are filled with tissue: not refused, no lungs
    phantom = make_phantom(0, modality="ct", covid=False, size=128)
    body, lungs = phantom.image.copy(), phantom.lung_mask.astype(bool)
    body[lungs] = np.median(body[(body > 0.3) & ~lungs])
    cv2.imwrite(str(flat), np.rint(body * 255).astype(np.uint8))
    extra = pd.DataFrame({"path": [str(broken), str(flat)], "label": ["covid", "non_covid"]})
    result = shortcut_probe(pd.concat([df, extra], ignore_index=True), modality="ct", weights=weights,
                            size=64, n_boot=50)
    assert (result.unit, result.n_patients, result.n_images, result.n_used) == ("image", None, 18, 16)
    assert [e["status"] for e in result.excluded] == ["unreadable", "no_lungs"]
    assert result.excluded[1]["path"] == str(flat)
    assert result.no_lungs_share == pytest.approx(1 / 17)
    assert "images (50 resamples)" in result.to_dict()["ci_method"]


def test_the_mask_comes_from_one_swappable_function(xray_marker_manifest: Path, weights: Path) -> None:
    seen = []

    def nothing_found(gray: np.ndarray, modality: str) -> None:
        seen.append(modality)

    method = MaskMethod("none-found", "finds nothing", nothing_found)
    with pytest.raises(ManifestError, match="0 usable images hold 0 non_covid and 0 covid"):
        shortcut_probe(pd.read_csv(xray_marker_manifest)[:8], modality="cxr", weights=weights, size=64,
                       mask=method)
    assert seen == ["cxr"] * 8


def test_a_mask_of_another_shape_is_refused_by_name(marker_manifest: Path) -> None:
    method = MaskMethod("small", "a mask at half size", lambda gray, modality: np.ones((64, 64), bool))
    with pytest.raises(ConfigError, match=r"'small' returned a \(64, 64\) mask for the \(128, 128\) "):
        shortcut_probe(pd.read_csv(marker_manifest)[:4], modality="ct", weights="none", size=64, mask=method)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modality": None}, "needs the modality"),
    ({"modality": "ct", "mask": "u-net"}, "unknown lung mask method 'u-net'"),
    ({"modality": "ct", "mask": "unet"}, "the unet lung mask is the X-ray lung model"),
    ({"modality": "ct", "folds": 1}, "folds=1"),
])
def test_bad_settings_are_named(marker_manifest: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        shortcut_probe(pd.read_csv(marker_manifest), weights="none", **kwargs)


def test_warnings_follow_the_outside_auc_and_the_share_without_lungs() -> None:
    score = ProbeScore(0.6, (0.5, 0.7))
    lost = [{"path": f"{i}.png", "status": "no_lungs", "reason": "none"} for i in range(30)]
    lost.append({"path": "x.png", "status": "unreadable", "reason": "broken"})
    result = ProbeResult(score, score, score, "contour", "contours", "mobilenet_v2", "imagenet", (224, 224),
                         5, "patient", 101, 70, 35, 100, lost)
    assert result.no_lungs_share == pytest.approx(0.3)  # of the 100 readable images
    assert result.warnings == ["shortcut probe: no lungs found (contour masks) in 30 of 100 readable images "
                               "(30%), left out of the probe; check the masks with `covidscan preprocess "
                               "preview`"]
    assert result.to_dict()["n_unreadable"] == 1 and result.to_dict()["n_no_lungs"] == 30


def test_add_probe_keeps_the_audit_and_appends_its_warnings(probed: ProbeResult) -> None:
    report = {"n_images": 40, "warnings": ["an audit warning"]}
    merged = add_probe(report, probed)
    assert merged["probe"] == probed.to_dict() and merged["n_images"] == 40
    assert merged["warnings"] == ["an audit warning", *probed.warnings]
    assert report == {"n_images": 40, "warnings": ["an audit warning"]}  # not changed in place


def test_data_audit_probe_in_the_cli(marker_manifest: Path, weights: Path, tmp_path: Path) -> None:
    manifest, out = tmp_path / "manifest.csv", tmp_path / "audit.json"
    pd.read_csv(marker_manifest)[:16].to_csv(manifest, index=False)  # 8 patients: 4 folds
    result = covidscan("-q", "data", "audit", str(manifest), "--modality", "ct", "--probe",
                       "--probe-weights", str(weights), "--probe-size", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Shortcut probe (linear probe on pooled mobilenet_v2 features, 4-fold" in result.stdout
    assert "outside the lungs only  ROC AUC" in result.stdout
    assert "lungs only              ROC AUC" in result.stdout
    assert "lung mask only          ROC AUC" in result.stdout
    report = json.loads(out.read_text())
    assert report["probe"]["n_used"] == 16 and report["probe"]["mask_method"] == "contour"
    assert report["probe"]["size"] == [64, 64] and report["probe"]["weights"] == str(weights)
    warnings = report["probe"]["warnings"]
    assert warnings and report["warnings"][len(report["warnings"]) - len(warnings):] == warnings
    assert f"  - {warnings[0]}" in result.stdout


def test_data_audit_probe_errors_in_the_cli(marker_manifest: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    result = covidscan("-q", "data", "audit", str(marker_manifest), "--probe", "--out",
                       str(tmp_path / "a.json"))
    assert result.returncode == 2 and "error:" in result.stderr and "--modality" in result.stderr
    # No ImageNet weights cached and downloads forbidden: the weights error names what is missing.
    monkeypatch.setenv("COVIDSCAN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = covidscan("-q", "data", "audit", str(marker_manifest), "--modality", "ct", "--probe",
                       "--out", str(tmp_path / "b.json"))
    assert result.returncode == 2 and "error:" in result.stderr and "mobilenet_v2" in result.stderr


def test_the_audit_still_imports_without_torch() -> None:
    code = "import sys, covidscan.data.audit; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_unet_mask_uses_the_xray_lung_model_or_names_the_command(
    xray_marker_manifest: Path, weights: Path, tmp_path: Path, monkeypatch
) -> None:
    from covidscan.preprocess.lungseg import LungSegmenter, UNet, default_lung_model

    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "cache"))
    df = pd.read_csv(xray_marker_manifest)
    with pytest.raises(ConfigError, match="covidscan lungseg train"):
        shortcut_probe(df, modality="cxr", weights=weights, size=64, mask="unet")
    model = UNet()  # a lung model whose head calls every pixel lung
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(10.0)
    LungSegmenter(model, 64).save(default_lung_model())
    result = shortcut_probe(df, modality="cxr", weights=weights, size=64, mask="unet", n_boot=20)
    assert result.to_dict()["mask_method"] == "unet" and result.no_lungs_share == 0
