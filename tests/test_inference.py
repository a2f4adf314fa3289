"""covidscan.inference: prediction rows, bad inputs, DICOM series, warnings, output files, engines, bf16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from covidscan.errors import ConfigError, ManifestError
from covidscan.explain.render import MIN_SIDE
from covidscan.inference import (
    FastClassifier,
    bf16_supported,
    check_bf16,
    predict,
    to_batch,
    write_predictions,
)
from covidscan.io import LUNG_WINDOW
from covidscan.preprocess import eval_transform
from covidscan.runs import load_run
from covidscan.training.engine import transform_batch
from dicom_files import write_dicom

COLUMNS = ["path", "p_covid", "label", "uncertain", "lungs_found", "warnings", "error", "group_id", "group_n",
           "group_p_covid", "group_label"]


@pytest.fixture(scope="module")
def meta(tiny_run: Path) -> dict:
    return json.loads((tiny_run / "checkpoint.json").read_text())


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def phantoms(phantom_manifest: Path) -> list[Path]:
    return sorted((phantom_manifest.parent / "images").rglob("*.png"))


def gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def write_ct_dicom(
    path: Path, image_u8: np.ndarray, *, series: str, modality: str = "CT", z: float = 0.0
) -> Path:
    """A CT slice in HU whose lung-window rendering is ``image_u8`` (what a scanner export looks like)."""
    width, level = LUNG_WINDOW
    hu = (image_u8.astype(np.float64) / 255.0 * width + level - width / 2).round().astype(np.int16)
    return write_dicom(path, hu, modality=modality, PatientID="P-7", SeriesInstanceUID=series,
                       RescaleSlope=1, RescaleIntercept=0, ImagePositionPatient=[0, 0, z])


def test_rows_values_labels_and_band(tiny_run, loaded, meta, phantoms):
    df = predict(tiny_run, phantoms[:12], band=0.2, progress=False)
    assert list(df.columns) == COLUMNS
    assert df["path"].tolist() == [str(p) for p in phantoms[:12]]
    assert df["p_covid"].between(0, 1).all() and (df["error"] == "").all()
    threshold = meta["threshold"]
    expected = np.where(df["p_covid"] >= threshold, "covid", "non_covid")
    assert (df["label"] == expected).all()
    assert (df["uncertain"] == ((df["p_covid"] - threshold).abs() < 0.1)).all()
    assert df["lungs_found"].all() and (df["warnings"] == "").all()
    assert df["group_id"].isna().all()  # PNGs carry no patient or series
    settings = df.attrs["predict"]
    assert settings["engine"] == "torch" and settings["precision"] in ("fp32", "bf16")
    assert settings["temperature"] == meta["temperature"] and settings["errors"] == 0
    assert not predict(loaded, phantoms[:3], band=0.0, progress=False)["uncertain"].any()  # no band


def test_fast_path_matches_the_reference_model(loaded, phantoms):
    run = loaded
    pixels = np.stack([cv2.resize(gray(p), run.model.input_size[::-1]) for p in phantoms[:6]])
    x = to_batch(pixels, run.model.mean, run.model.std)
    reference = transform_batch(pixels, np.arange(6), eval_transform(run.model.input_size, run.model.mean,
                                                                     run.model.std), 0, 0)
    torch.testing.assert_close(x, reference, rtol=0, atol=0)  # the vectorised transform is exact
    with torch.inference_mode():
        torch.testing.assert_close(FastClassifier(run.model)(x), run.model(reference), rtol=1e-4, atol=1e-5)
    slow = predict(loaded, phantoms[:6], fast=False, progress=False)
    fast = predict(loaded, phantoms[:6], progress=False)
    tolerance = 1e-2 if fast.attrs["predict"]["precision"] == "bf16" else 1e-5
    np.testing.assert_allclose(fast["p_covid"], slow["p_covid"], atol=tolerance)


def test_bad_files_are_reported_and_the_rest_predicted(loaded, phantoms, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for p in phantoms[:3]:
        shutil.copy(p, folder / "sub" / p.name)
    (folder / "corrupt.png").write_bytes(phantoms[0].read_bytes()[:200])
    (folder / "notes.png").write_text("these are my notes, not an image\n")
    (tmp_path / "empty").mkdir()
    df = predict(loaded, [folder, tmp_path / "missing.png", tmp_path / "empty"], progress=False)
    assert len(df) == 7
    bad = df[df["error"] != ""]
    assert sorted(Path(p).name for p in bad["path"]) == ["corrupt.png", "empty", "missing.png", "notes.png"]
    assert bad["p_covid"].isna().all() and bad["label"].isna().all() and bad["uncertain"].isna().all()
    messages = dict(zip(bad["path"].map(lambda p: Path(p).name), bad["error"], strict=True))
    assert "truncated" in messages["corrupt.png"] and "not a PNG" in messages["notes.png"]
    assert "does not exist" in messages["missing.png"] and "no images found" in messages["empty"]
    good = df[df["error"] == ""]
    assert len(good) == 3 and good["p_covid"].between(0, 1).all()
    assert df.attrs["predict"]["errors"] == 4


def test_manifest_gives_true_labels_and_patient_groups(loaded, meta, phantom_manifest):
    df = predict(loaded, [phantom_manifest], progress=False)
    manifest = pd.read_csv(phantom_manifest)
    assert len(df) == len(manifest) == 64
    assert (df["true_label"] == manifest["label"]).all()
    assert (df["group_id"] == manifest["patient_id"]).all() and (df["group_n"] == 2).all()
    means = df.groupby("group_id")["p_covid"].transform("mean")
    np.testing.assert_allclose(df["group_p_covid"], means)
    cut = meta["patient_threshold"] if meta["patient_threshold"] is not None else meta["threshold"]
    assert (df["group_label"] == np.where(df["group_p_covid"] >= cut, "covid", "non_covid")).all()


def test_manifest_without_labels_is_a_clear_error(loaded, phantoms, tmp_path):
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(phantoms[0])]}).to_csv(csv, index=False)
    with pytest.raises(ManifestError, match="label"):
        predict(loaded, [csv], progress=False)


def test_dicom_series_gets_one_group_and_other_modality_is_flagged(loaded, phantoms, tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for k, p in enumerate(phantoms[:3]):
        write_ct_dicom(series / f"slice{k}.dcm", gray(p), series="1.2.826.7", z=float(k))
    cr = write_ct_dicom(tmp_path / "chest.dcm", gray(phantoms[3]), series="1.2.826.8", modality="CR")
    df = predict(loaded, [series, cr], progress=False)
    assert (df["error"] == "").all() and len(df) == 4
    slices = df.iloc[:3]
    assert (slices["group_id"] == "1.2.826.7").all() and (slices["group_n"] == 3).all()
    assert slices["group_p_covid"].iloc[0] == pytest.approx(slices["p_covid"].mean())
    assert (slices["warnings"] == "").all()
    assert df["warnings"].iloc[3].startswith("other_modality: DICOM Modality CR")
    # The DICOM slice predicts like the PNG it was made from (8-bit -> HU -> window round trip).
    png = predict(loaded, phantoms[:3], progress=False)
    np.testing.assert_allclose(slices["p_covid"], png["p_covid"], atol=2e-3)


def test_warnings_for_tiny_blank_and_inverted_inputs(loaded, phantoms, tmp_path):
    image = gray(phantoms[0])
    cv2.imwrite(str(tmp_path / "tiny.png"), cv2.resize(image, (100, 90), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((256, 256), 128, np.uint8))
    cv2.imwrite(str(tmp_path / "inverted.png"), 255 - image)
    cv2.imwrite(str(tmp_path / "normal.png"), image)
    df = predict(loaded, [tmp_path], progress=False)
    df.index = [Path(p).stem for p in df["path"]]
    codes = df["warnings"].map(lambda w: [part.split(":")[0] for part in w.split("; ") if part])
    assert codes["tiny"][0] == "tiny" and "90x100" in df.loc["tiny", "warnings"]
    assert codes["blank"] == ["blank"] and codes["inverted"] == ["inverted"] and codes["normal"] == []
    assert df["p_covid"].notna().all()  # warnings never stop a prediction


def test_csv_and_json_round_trip(loaded, phantom_manifest, tmp_path):
    df = predict(loaded, [phantom_manifest, tmp_path / "missing.png"], progress=False)
    back = pd.read_csv(write_predictions(df, tmp_path / "out" / "pred.csv"), keep_default_na=False,
                       na_values=[""])
    assert list(back.columns) == list(df.columns)
    np.testing.assert_allclose(back["p_covid"], df["p_covid"], rtol=1e-12)
    assert back["error"].fillna("").tolist() == df["error"].tolist()
    doc = json.loads(write_predictions(df, tmp_path / "pred.json").read_text())
    assert doc["settings"] == json.loads(json.dumps(df.attrs["predict"]))
    assert len(doc["images"]) == 65 and doc["images"][-1]["p_covid"] is None
    assert doc["images"][-1]["group_id"] is None
    groups = {g["group_id"]: g for g in doc["groups"]}
    assert len(groups) == 32 and all(g["n_images"] == 2 for g in groups.values())
    first = doc["images"][0]
    assert groups[first["group_id"]]["p_covid"] == pytest.approx(first["group_p_covid"])
    with pytest.raises(ConfigError, match=r"\.csv or \.json"):
        write_predictions(df, tmp_path / "pred.txt")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"engine": "tf"}, "engine"), ({"band": 1.5}, "band"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_arguments(loaded, phantoms, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        predict(loaded, phantoms[:1], progress=False, **kwargs)


def test_onnx_engine_matches_torch(tiny_run, phantoms, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    torch_df = predict(run, phantoms[:8], fast=False, progress=False)
    onnx_df = predict(run, phantoms[:8], engine="onnx", progress=False)
    assert (run / "model.onnx").is_file()  # exported on first use, then reused
    assert onnx_df.attrs["predict"]["engine"] == "onnx"
    assert np.abs(onnx_df["p_covid"] - torch_df["p_covid"]).max() <= 1e-4
    assert (onnx_df["label"] == torch_df["label"]).all()


def test_bf16_changes_at_most_half_a_percent_of_labels(tiny_run, phantoms, tmp_path):
    if not bf16_supported():
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): predict always uses fp32")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run = load_run(run_dir)
    verdict = check_bf16(run)
    assert (run_dir / "bf16_check.json").is_file() and verdict["images"] > 0
    assert verdict["allowed"] == (verdict["labels_changed"] / verdict["images"] <= 0.005)
    assert check_bf16(run) == verdict  # cached, keyed by the weights' hash
    # The rule itself, on all 64 phantoms: bf16 changes at most 0.5% of the fp32 labels.
    size = run.model.input_size[::-1]
    pixels = np.stack([cv2.resize(gray(p), size, interpolation=cv2.INTER_AREA) for p in phantoms])
    x = to_batch(pixels, run.model.mean, run.model.std)
    with torch.inference_mode():
        z32, z16 = (FastClassifier(run.model, dtype)(x) for dtype in (torch.float32, torch.bfloat16))
    p32, p16 = (torch.sigmoid((z[:, 1] - z[:, 0]) / run.temperature) for z in (z32, z16))
    changed = ((p32 >= run.threshold) != (p16 >= run.threshold)).float().mean().item()
    assert changed <= 0.005
    # predict follows the cached verdict.
    (run_dir / "bf16_check.json").write_text(json.dumps({**verdict, "allowed": False}))
    assert predict(run, phantoms[:2], progress=False).attrs["predict"]["precision"] == "fp32"


def test_cam_dir_gets_one_overlay_per_image(loaded, phantoms, tmp_path):
    inputs = [*phantoms[:3], tmp_path / "missing.png"]
    df = predict(loaded, inputs, cam_dir=tmp_path / "cams", progress=False)
    written = sorted((tmp_path / "cams").glob("*.png"))
    assert len(written) == 3 and df["cam_png"].iloc[:3].map(lambda p: Path(p).is_file()).all()
    assert pd.isna(df["cam_png"].iloc[3])
    overlay = cv2.imread(str(written[0]))
    # drawn on the original image (256 px phantoms, enlarged to stay legible)
    assert overlay.shape[:2] == tuple(n * MIN_SIDE // 256 for n in gray(phantoms[0]).shape)
