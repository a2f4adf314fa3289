"""Training end to end on phantoms: run directory contents, reload, evaluate, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidscan.config import load_config
from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError, ManifestError, WeightsNotFoundError
from covidscan.evaluation import validate_metrics_schema
from covidscan.inference import Predictor, evaluate_run
from covidscan.io import read_image
from covidscan.preprocess import PreprocessConfig, prepare_image
from covidscan.runs import load_run
from covidscan.training import train_experiment

TINY = [
    "model.backbone=timm:resnet18",
    "model.weights=none",
    "model.input_size=64",
    "evaluation.n_bootstrap=50",
]


def test_run_directory_holds_everything(tiny_run: Path):
    for name in (
        "config.yaml",
        "model.safetensors",
        "checkpoint.json",
        "splits.csv",
        "history.json",
        "metrics.json",
        "predictions.csv",
        "report.md",
        "model_card.md",
        "audit.json",
    ):
        assert (tiny_run / name).is_file(), name
    for fig in ("training_curves", "confusion_matrix", "roc", "reliability", "samples"):
        assert (tiny_run / "figures" / f"{fig}.png").stat().st_size > 1000
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    validate_metrics_schema(metrics)
    assert metrics["patient_level"] is not None  # phantoms have patient ids
    assert set(metrics["validation"]) >= {"roc_auc", "accuracy"}  # what settings are chosen on
    history = json.loads((tiny_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and "val_loss" in history[0]
    splits = pd.read_csv(tiny_run / "splits.csv")
    # Patient-level split: no patient in two splits.
    assert splits.groupby("patient_id")["split"].nunique().max() == 1


def test_reloaded_run_reproduces_its_predictions(tiny_run: Path, phantom_manifest: Path, tmp_path: Path):
    run = load_run(tiny_run)
    cal = run.calibration
    assert run.model.training is False and 0 < cal.threshold < 1 and cal.temperature > 0
    # Training scored its test split through the same Predictor path as `evaluate --precision fp32` (auto
    # would serve bf16 where the CPU has it natively): the same file, the same figures, to the last digit.
    metrics = evaluate_run(tiny_run, tiny_run / "splits.csv", tmp_path, precision="fp32", progress=False)
    assert (tmp_path / "predictions.csv").read_text() == (tiny_run / "predictions.csv").read_text()
    trained = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("metrics", "confusion_matrix", "patient_level"):
        assert metrics[key] == trained[key], key
    test_ece = {k: v for k, v in trained["calibration"].items() if "_test_" in k}
    assert test_ece and test_ece.items() <= metrics["calibration"].items()  # the val ones: training only
    assert metrics["threshold"] == pytest.approx(cal.threshold) and metrics["precision"] == "fp32"


@pytest.mark.slow
def test_training_is_repeatable_given_a_seed(phantom_manifest: Path, tmp_path: Path):
    cfg = load_config("paper-a-resnet50", [*TINY, "train.epochs=2", "train.views=2"])
    a = train_experiment(cfg, phantom_manifest, tmp_path / "a", progress=False)
    b = train_experiment(cfg, phantom_manifest, tmp_path / "b", progress=False)
    assert a.fit.history == b.fit.history
    pa = pd.read_csv(tmp_path / "a" / "predictions.csv")["p_covid"]
    pb = pd.read_csv(tmp_path / "b" / "predictions.csv")["p_covid"]
    np.testing.assert_allclose(pa, pb)


@pytest.mark.slow
def test_cached_features_train_only_the_head(phantom_manifest: Path, tmp_path: Path):
    from covidscan.models import build_model

    cfg = load_config("paper-a-resnet50", [*TINY, "train.epochs=1", "train.views=1"])
    result = train_experiment(cfg, phantom_manifest, tmp_path / "run", progress=False)
    trained = load_run(result.run_dir).model
    torch.manual_seed(cfg.train.seed)  # train_experiment seeds before building, so this is the initial model
    initial = build_model(cfg.model)
    for name, value in initial.backbone.state_dict().items():
        assert torch.equal(value, trained.backbone.state_dict()[name]), name
    assert not torch.equal(initial.head.fc1.weight, trained.head.fc1.weight)


@pytest.mark.slow
def test_finetune_and_bpnn_paths_run(phantom_manifest: Path, tmp_path: Path):
    finetune = load_config(
        "paper-a-resnet50", [*TINY, "train.epochs=1", "model.train_mode=finetune", "model.unfreeze_last=1"]
    )
    result = train_experiment(finetune, phantom_manifest, tmp_path / "ft", progress=False)
    assert len(result.fit.history) == 1
    bpnn = load_config("paper-a-bpnn", ["train.epochs=2", "evaluation.n_bootstrap=50"])
    result = train_experiment(bpnn, phantom_manifest, tmp_path / "bpnn", progress=False)
    assert load_run(result.run_dir).model.input_size == (150, 250)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_validation_weights(phantom_manifest: Path, tmp_path: Path):
    cfg = load_config(
        "paper-a-resnet50",
        [*TINY, "train.epochs=8", "train.views=1", "train.early_stopping=1", "train.lr=0.05"],
    )
    result = train_experiment(cfg, phantom_manifest, tmp_path / "run", progress=False)
    losses = [row["val_loss"] for row in result.fit.history]
    best = int(np.argmin(losses)) + 1
    assert result.fit.best_epoch == best
    # Patience 1: training stops one epoch after the best, unless the best is the last of all 8.
    assert len(losses) == min(best + 1, 8) and result.fit.stopped_early == (best < 8)
    # The saved weights are the best epoch's: their validation loss is the lowest of the history.
    run = load_run(result.run_dir)
    splits = pd.read_csv(result.run_dir / "splits.csv")
    val = splits[splits["split"] == "val"]
    images = np.stack([prepare_image(read_image(p), run.config.preprocess, (64, 64)).pixels
                       for p in val["path"]])
    z = torch.from_numpy(Predictor.from_run(result.run_dir, precision="fp32").logits(images))
    y = torch.tensor((val["label"] == "covid").to_numpy(), dtype=torch.float32)
    # Cross-entropy of the 2-way softmax equals the logistic loss of z = logit_covid - logit_non_covid.
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y).item()
    assert loss == pytest.approx(min(losses), rel=1e-4)


@pytest.mark.slow
def test_paper_protocol_resplits_by_image(phantom_manifest: Path, tmp_path: Path):
    cfg = load_config(
        "paper-a-resnet50",
        [
            *TINY,
            "train.epochs=1",
            "data.split_by=image",
            "data.ratios=[0.8, 0.2]",
            "data.resplit=true",
            "evaluation.threshold=fixed",
        ],
    )
    with pytest.warns(UserWarning, match="patient"):
        result = train_experiment(cfg, phantom_manifest, tmp_path / "run", progress=False)
    assert result.calibration.threshold == 0.5 and result.calibration.temperature == 1.0
    assert "not by patient" in (tmp_path / "run" / "report.md").read_text()


def test_unreadable_training_image_is_left_out_and_listed(phantom_manifest: Path, tmp_path: Path):
    df = pd.read_csv(phantom_manifest)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    df.loc[0, "path"] = str(bad)
    df["path"] = [p if Path(p).is_absolute() else str(phantom_manifest.parent / p) for p in df["path"]]
    manifest = tmp_path / "m.csv"
    df.to_csv(manifest, index=False)
    cfg = load_config("paper-a-resnet50", [*TINY, "train.epochs=1"])
    with pytest.raises(ManifestError, match=r"(?s)--strict.*broken\.png"):
        train_experiment(cfg, manifest, tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict").exists()
    # Without --strict the file is left out, and said so in the run directory and the report.
    train_experiment(cfg, manifest, tmp_path / "run", progress=False)
    excluded = pd.read_csv(tmp_path / "run" / "excluded.csv")
    assert excluded["path"].tolist() == [str(bad)] and excluded["status"].tolist() == ["unreadable"]
    assert str(bad) not in set(pd.read_csv(tmp_path / "run" / "splits.csv")["path"])
    assert "1 image was left out" in (tmp_path / "run" / "report.md").read_text()


def test_prepared_image_keeps_the_original_and_its_lung_mask():
    phantom = make_phantom(0, modality="ct", covid=True)
    cfg = PreprocessConfig(modality="ct")
    plain = prepare_image(phantom.image, cfg, (64, 64))
    assert plain.original is None and plain.lung_mask is None  # nothing extra held unless asked for
    kept = prepare_image(phantom.image, cfg, (64, 64), keep_original=True)
    assert kept.original.shape == kept.lung_mask.shape == phantom.image.shape
    # The mask is the crop's own: the box around it (with margin) is the crop.
    ys, xs = np.nonzero(kept.lung_mask)
    y0, x0, y1, x1 = kept.bbox
    assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1
    no_crop = prepare_image(phantom.image, PreprocessConfig(modality="ct", lung_crop=False), (64, 64),
                            keep_original=True)
    assert no_crop.lung_mask is None


def test_train_refuses_a_non_empty_run_folder_unless_overwrite(tiny_run: Path, phantom_manifest: Path):
    cfg = load_config("paper-a-resnet50", [*TINY, "train.epochs=1"])
    before = sorted(p.name for p in tiny_run.iterdir())
    with pytest.raises(ConfigError, match=r"not empty.*--overwrite"):
        train_experiment(cfg, phantom_manifest, tiny_run, progress=False)
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_failed_start_leaves_no_run_folder(phantom_manifest: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cfg = load_config("paper-a-resnet50", ["model.backbone=mobilenet_v2", "model.weights=imagenet"])
    with pytest.raises(WeightsNotFoundError):
        train_experiment(cfg, phantom_manifest, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_evaluate_refuses_data_the_run_has_seen(tiny_run: Path, tmp_path: Path):
    splits = pd.read_csv(tiny_run / "splits.csv")
    seen = splits[splits["split"] == "train"].head(3)
    unseen = splits[splits["split"] == "test"].head(5)
    # One training image by its own path, one copied under a new name (same pixels, other file).
    copy = tmp_path / "renamed.png"
    copy.write_bytes(Path(seen["path"].iloc[1]).read_bytes())
    mixed = pd.concat([unseen, seen.head(1), seen.iloc[[1]].assign(path=str(copy))])
    mixed.drop(columns="split").to_csv(tmp_path / "external.csv", index=False)
    with pytest.raises(ManifestError, match=r"shares 2 of 7 images.*--allow-overlap") as info:
        evaluate_run(tiny_run, tmp_path / "external.csv", tmp_path / "out", progress=False)
    assert "same path" in str(info.value) and "same pixels" in str(info.value)
    assert not (tmp_path / "out").exists()
    metrics = evaluate_run(tiny_run, tmp_path / "external.csv", tmp_path / "out", allow_overlap=True,
                           progress=False)
    assert len(metrics["overlap_with_training"]) == 2
    assert "inflated" in (tmp_path / "out" / "report.md").read_text()
