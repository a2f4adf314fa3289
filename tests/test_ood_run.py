"""The out-of-distribution detector of a run: fitted at training, scored by every Predictor engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.config import load_config
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import StorageError
from covidscan.inference import Predictor
from covidscan.inference.evaluate import evaluate_many
from covidscan.inference.predictor import OOD_WARNING
from covidscan.io import STAT_NAMES, read_image
from covidscan.runs import draft_checkpoint, load_checkpoint
from dicom_files import write_dicom


def _paths(manifest: Path) -> list[str]:
    return [str(manifest.parent / p) for p in pd.read_csv(manifest)["path"]]


def _test_paths(run: Path) -> list[str]:
    splits = pd.read_csv(run / "splits.csv")
    return splits.loc[splits["split"] == "test", "path"].tolist()


@pytest.fixture(scope="module")
def xrays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chest X-ray phantoms exported as DICOM files that say Modality CT: another modality than the CT run
    was trained on, which only the OOD detector can tell (as PNGs the content check refuses them first)."""
    manifest = write_phantom_dataset(tmp_path_factory.mktemp("cxr"), n=24, modality="cxr", seed=5,
                                     slices_per_patient=1)
    table = pd.read_csv(manifest)
    for i, rel in enumerate(table["path"]):
        png = manifest.parent / rel
        hu = np.rint(read_image(png).pixels * 1500 - 1350).astype(np.int16)  # back through the lung window
        write_dicom(png.with_suffix(".dcm"), hu, PatientID=f"xray-{i}")
    table["path"] = [str(Path(rel).with_suffix(".dcm")) for rel in table["path"]]
    table.to_csv(manifest, index=False)
    return manifest


def test_training_fits_and_records_the_detector(ood_run):
    checkpoint = load_checkpoint(ood_run)
    assert checkpoint.ood is not None and (ood_run / checkpoint.ood.file).is_file()
    assert checkpoint.ood.n_val >= 20 and checkpoint.ood.quantile == 0.95
    predictor = Predictor.from_run(ood_run)
    assert predictor.ood is not None and predictor.ood.threshold_ == pytest.approx(checkpoint.ood.threshold)


def test_a_run_with_too_few_validation_images_has_no_detector_and_says_nothing(tiny_run, phantom_manifest):
    assert load_checkpoint(tiny_run).ood is None and not (tiny_run / "ood.safetensors").exists()
    paths = _paths(phantom_manifest)[:4]
    for pred in Predictor.from_run(tiny_run).predict(paths):
        assert pred.ood_score is None and not any(w.startswith(OOD_WARNING) for w in pred.warnings)


def test_another_modality_is_flagged_and_own_test_images_mostly_are_not(ood_run, xrays):
    predictor = Predictor.from_run(ood_run)
    own = predictor.predict(_test_paths(ood_run))
    other = predictor.predict(_paths(xrays))
    own_scores = np.array([p.ood_score for p in own])
    other_scores = np.array([p.ood_score for p in other if p.ood_score is not None])
    assert len(other_scores) >= 12 and np.isfinite(own_scores).all()
    assert other_scores.min() > np.median(own_scores)  # every X-ray scores above a typical CT slice
    flagged_other = [p for p in other if any(w.startswith(OOD_WARNING) for w in p.warnings)
                     or OOD_WARNING in (p.error or "")]  # warned, or refused when far beyond the threshold
    assert len(flagged_other) >= 0.8 * len(other_scores)
    assert "the run's threshold" in (flagged_other[0].error
                                     or next(w for w in flagged_other[0].warnings if OOD_WARNING in w))
    own_flagged = np.mean([any(w.startswith(OOD_WARNING) for w in p.warnings) for p in own])
    assert own_flagged <= 0.5


def test_onnx_engine_gives_the_same_ood_scores(ood_run, xrays, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "cache"))
    paths = _test_paths(ood_run)[:4] + _paths(xrays)[:4]
    # fp32 against fp32: onnxruntime computes in fp32; the torch engine's bf16 would move the features
    torch_scores = [p.ood_score for p in Predictor.from_run(ood_run, engine="torch", precision="fp32")
                    .predict(paths)]
    onnx_scores = [p.ood_score for p in Predictor.from_run(ood_run, engine="onnx").predict(paths)]
    assert None not in onnx_scores
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-3, atol=1e-3)


def test_predict_writes_ood_score_in_csv_and_json(ood_run, xrays, tmp_path):
    paths = _paths(xrays)[:3]
    for out in (tmp_path / "p.csv", tmp_path / "p.json"):
        result = CliRunner().invoke(app, ["predict", str(ood_run), *paths, "--out", str(out)])
        assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["ood_score"].notna().all() and table["warnings"].str.contains(OOD_WARNING).any()
    images = json.loads((tmp_path / "p.json").read_text())["images"]
    assert all(isinstance(row["ood_score"], float) for row in images)


def test_evaluate_many_reports_the_share_flagged(ood_run, xrays, tmp_path):
    own = tmp_path / "own.csv"
    splits = pd.read_csv(ood_run / "splits.csv")
    splits[splits["split"] == "test"].drop(columns="split").to_csv(own, index=False)
    table = evaluate_many(ood_run, [own, xrays], tmp_path / "ext", progress=False)
    rows = {row["set"]: row for row in json.loads((table.parent / "table.json").read_text())["sets"]}
    assert rows[xrays.parent.name]["ood_share"] >= 0.8 > rows["own"]["ood_share"]
    assert "OOD share" in table.read_text()


def test_a_damaged_detector_file_is_refused_clearly(ood_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(ood_run, copy)
    (copy / "ood.safetensors").write_bytes(b"not a detector")
    with pytest.raises(StorageError, match=r"ood\.safetensors is missing or does not match"):
        Predictor.from_run(copy)


def test_an_adapted_run_counts_the_local_cases_as_training_data(ood_run, tmp_path):
    from covidscan.training.adapt import adapt_run

    site = write_phantom_dataset(tmp_path / "site", n=40, modality="ct", seed=9, slices_per_patient=2,
                                 site="scanner-b")
    adapted = adapt_run(ood_run, site, tmp_path / "adapted", mode="recalibrate", folds=2, progress=False)
    parent, child = load_checkpoint(ood_run).ood, load_checkpoint(adapted.run_dir).ood
    assert child is not None and child.n_train == parent.n_train + 40 and child.threshold == parent.threshold
    before = [p.ood_score for p in Predictor.from_run(ood_run).predict(_paths(site))]
    after = [p.ood_score for p in Predictor.from_run(adapted.run_dir).predict(_paths(site))]
    assert np.mean(after) < np.mean(before)  # the signed cases no longer look foreign
    card = (adapted.run_dir / "model_card.md").read_text()
    assert str(ood_run.resolve()) in card and f"{child.threshold:.2f}" in card


def test_the_bpnn_baseline_gets_no_detector_for_want_of_features():
    from covidscan.models import build_model
    from covidscan.preprocess import PreparedSet
    from covidscan.training.ood import fit_ood

    rng = np.random.default_rng(0)

    def images(n: int) -> PreparedSet:
        return PreparedSet(images=rng.random((n, 150, 250), dtype=np.float32), labels=np.arange(n) % 2,
                           patient_ids=[None] * n, paths=[f"{i}.png" for i in range(n)],
                           lungs_found=[True] * n, stats=rng.random((n, len(STAT_NAMES)), dtype=np.float32))

    cfg = load_config("paper-a-bpnn")
    model = build_model(cfg.model)
    scorer = Predictor.from_model(model, draft_checkpoint(cfg, model))
    assert fit_ood(scorer, images(40), images(30), np.zeros((30, 1), np.float32)) is None
