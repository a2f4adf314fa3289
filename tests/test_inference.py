"""covidscan.inference.predict: prediction rows, bad inputs, DICOM series, warnings, output files, engines."""

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
from covidscan.inference import Predictor, predict, write_predictions
from covidscan.io import LUNG_WINDOW
from covidscan.models import FastClassifier
from covidscan.preprocess import eval_transform, to_model_batch
from covidscan.runs import load_checkpoint
from dicom_files import write_dicom

COLUMNS = ["path", "p_covid", "label", "uncertain", "lungs_found", "ood_score", "warnings", "error",
           "group_id", "group_n", "group_p_covid", "group_label"]


@pytest.fixture(scope="module")
def cal(tiny_run: Path):
    return load_checkpoint(tiny_run).calibration


@pytest.fixture(scope="module")
def loaded(tiny_run: Path) -> Predictor:
    return Predictor.from_run(tiny_run)


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


def test_rows_values_labels_and_band(tiny_run, loaded, cal, phantoms):
    df = predict(tiny_run, phantoms[:12], band=0.2, progress=False)
    assert list(df.columns) == COLUMNS
    assert df["path"].tolist() == [str(p) for p in phantoms[:12]]
    assert df["p_covid"].between(0, 1).all() and (df["error"] == "").all()
    threshold = cal.threshold
    expected = np.where(df["p_covid"] >= threshold, "covid", "non_covid")
    assert (df["label"] == expected).all()
    assert (df["uncertain"] == ((df["p_covid"] - threshold).abs() < 0.1)).all()
    assert df["lungs_found"].all() and (df["warnings"] == "").all()
    assert df["group_id"].isna().all()  # PNGs carry no patient or series
    settings = df.attrs["predict"]
    assert settings["engine"] == "torch" and settings["precision"] in ("fp32", "bf16")
    assert settings["temperature"] == cal.temperature and settings["errors"] == 0 and settings["band"] == 0.2
    assert not predict(tiny_run, phantoms[:3], band=0.0, progress=False)["uncertain"].any()  # no band


def test_fast_path_matches_the_reference_model(tiny_run, loaded, phantoms):
    model = loaded.model
    pixels = np.stack([cv2.resize(gray(p), model.input_size[::-1]) for p in phantoms[:6]]) / np.float32(255)
    x = to_model_batch(pixels, model.mean, model.std)
    transform = eval_transform(model.input_size, model.mean, model.std)
    reference = torch.stack([transform(image) for image in pixels])
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-6)  # the vectorised transform is the same
    assert x.is_contiguous(memory_format=torch.channels_last)  # what the folded torch engine runs fastest
    nchw = to_model_batch(pixels, model.mean, model.std, channels_last=False)  # what onnxruntime takes
    assert nchw.is_contiguous() and torch.equal(nchw, x)
    assert loaded.batch(pixels).is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(FastClassifier(model)(x), model(reference), rtol=1e-4, atol=1e-5)
    slow = predict(tiny_run, phantoms[:6], fast=False, progress=False)
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


def test_manifest_gives_true_labels_and_patient_groups(loaded, cal, phantom_manifest):
    df = predict(loaded, [phantom_manifest], progress=False)
    manifest = pd.read_csv(phantom_manifest)
    assert len(df) == len(manifest) == 64
    assert (df["true_label"] == manifest["label"]).all()
    assert (df["group_id"] == manifest["patient_id"]).all() and (df["group_n"] == 2).all()
    means = df.groupby("group_id")["p_covid"].transform("mean")
    np.testing.assert_allclose(df["group_p_covid"], means)
    cut = cal.patient_threshold if cal.patient_threshold is not None else cal.threshold
    assert (df["group_label"] == np.where(df["group_p_covid"] >= cut, "covid", "non_covid")).all()


def test_a_manifest_to_predict_needs_no_labels_and_a_missing_file_is_a_row(loaded, phantoms, tmp_path):
    csv = tmp_path / "list.csv"
    rows = {"path": [str(phantoms[0]), "gone.png"], "patient_id": ["p1", "p1"]}
    pd.DataFrame(rows).to_csv(csv, index=False)
    df = predict(loaded, [csv], progress=False)
    assert "true_label" not in df and 0 <= df["p_covid"].iloc[0] <= 1
    assert "does not exist" in df["error"].iloc[1] and str(tmp_path / "gone.png") == df["path"].iloc[1]
    assert df["group_n"].iloc[0] == 1  # the group counts the readable image only
    no_path = tmp_path / "bad.csv"
    pd.DataFrame({"file_name": ["x.png"]}).to_csv(no_path, index=False)
    with pytest.raises(ManifestError, match="path column"):
        predict(loaded, [no_path], progress=False)


def test_dicom_series_gets_one_group_and_other_modality_is_refused(loaded, phantoms, tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for k, p in enumerate(phantoms[:3]):
        write_ct_dicom(series / f"slice{k}.dcm", gray(p), series="1.2.826.7", z=float(k))
    cr = write_ct_dicom(tmp_path / "chest.dcm", gray(phantoms[3]), series="1.2.826.8", modality="CR")
    df = predict(loaded, [series, cr], progress=False)
    assert (df["error"].iloc[:3] == "").all() and len(df) == 4
    slices = df.iloc[:3]
    assert (slices["group_id"] == "1.2.826.7").all() and (slices["group_n"] == 3).all()
    assert slices["group_p_covid"].iloc[0] == pytest.approx(slices["p_covid"].mean())
    assert (slices["warnings"] == "").all()
    # A radiograph given to a CT model gets no probability and no label, only the reason.
    assert "wrong_modality: DICOM Modality CR" in df["error"].iloc[3]
    assert pd.isna(df["p_covid"].iloc[3]) and pd.isna(df["label"].iloc[3])
    # The DICOM slice predicts like the PNG it was made from (8-bit -> HU -> window round trip).
    png = predict(loaded, phantoms[:3], progress=False)
    np.testing.assert_allclose(slices["p_covid"], png["p_covid"], atol=2e-3)


def test_small_and_inverted_inputs_are_warned_blank_ones_refused(loaded, phantoms, tmp_path):
    image = gray(phantoms[0])
    cv2.imwrite(str(tmp_path / "tiny.png"), cv2.resize(image, (100, 90), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((256, 256), 128, np.uint8))
    cv2.imwrite(str(tmp_path / "inverted.png"), 255 - image)
    cv2.imwrite(str(tmp_path / "normal.png"), image)
    df = predict(loaded, [tmp_path], progress=False)
    df.index = [Path(p).stem for p in df["path"]]
    codes = df["warnings"].map(lambda w: [part.split(":")[0] for part in w.split("; ") if part])
    assert codes["tiny"][0] == "tiny" and "90x100" in df.loc["tiny", "warnings"]
    assert codes["inverted"] == ["inverted"] and codes["normal"] == []
    # warnings never stop a prediction; a refusal always does: no probability, no label, the reason
    assert df.loc[["tiny", "inverted", "normal"], "p_covid"].notna().all()
    assert pd.isna(df.loc["blank", "p_covid"]) and pd.isna(df.loc["blank", "label"])
    assert "constant" in df.loc["blank", "error"]


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
    [({"engine": "tf"}, "engine"), ({"band": 1.5}, "band"), ({"batch_size": 0}, "batch_size"),
     ({"engine": "torch", "onnx_path": "m.onnx"}, "onnx engine")],
)
def test_bad_arguments(tiny_run, phantoms, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        predict(tiny_run, phantoms[:1], progress=False, **kwargs)


@pytest.mark.slow
def test_onnx_engine_matches_torch_and_caches_outside_the_run(tiny_run, phantoms, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "cache"))
    torch_df = predict(tiny_run, phantoms[:8], fast=False, progress=False)
    onnx_df = predict(tiny_run, phantoms[:8], engine="onnx", progress=False)
    assert not (tiny_run / "model.onnx").exists()  # the run directory is never written to
    sha = load_checkpoint(tiny_run).weights_sha256
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir()] == [f"{sha}.onnx"]
    assert onnx_df.attrs["predict"]["engine"] == "onnx"
    pixels = np.random.default_rng(0).random((2, *load_checkpoint(tiny_run).input_size), dtype=np.float32)
    assert Predictor.from_run(tiny_run, engine="onnx").batch(pixels).is_contiguous()  # NCHW: no copy
    assert np.abs(onnx_df["p_covid"] - torch_df["p_covid"]).max() <= 1e-4
    # labels agree wherever the two fp32 engines' 1e-4 rounding cannot cross the threshold
    clear = (torch_df["p_covid"] - load_checkpoint(tiny_run).calibration.threshold).abs() > 1e-4
    assert clear.sum() >= 4 and (onnx_df["label"] == torch_df["label"])[clear].all()


def test_cam_dir_gets_one_overlay_per_image(loaded, phantoms, tmp_path):
    inputs = [*phantoms[:3], tmp_path / "missing.png"]
    df = predict(loaded, inputs, cam_dir=tmp_path / "cams", progress=False)
    written = sorted((tmp_path / "cams").glob("*.png"))
    assert len(written) == 3 and df["cam_png"].iloc[:3].map(lambda p: Path(p).is_file()).all()
    assert pd.isna(df["cam_png"].iloc[3])
    overlay = cv2.imread(str(written[0]))
    # drawn on the original image (256 px phantoms, enlarged to stay legible)
    assert overlay.shape[:2] == tuple(n * MIN_SIDE // 256 for n in gray(phantoms[0]).shape)


def test_external_sets_are_named_by_file_or_by_folder_for_generic_manifest_names():
    from covidscan.errors import ConfigError
    from covidscan.inference.evaluate import _set_names

    assert _set_names([Path("ext/ct-ext-luna16/labels.csv"), Path("ext/hospital_b.csv")]) == [
        "ct-ext-luna16", "hospital_b"]
    assert _set_names([Path("a/x.csv"), Path("x/labels.csv")]) == ["a-x", "x-labels"]
    with pytest.raises(ConfigError, match="more than once"):
        _set_names([Path("a/x.csv"), Path("a/x.csv")])
