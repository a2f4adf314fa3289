"""Ensembles as runs: the averaged module, `covidscan ensemble`, and everything standing on Predictor.

Most tests combine member runs written with ``save_run`` from untrained tiny models (no training: the
arithmetic is the same); the ``slow`` ones train the members first, or adapt the ensemble.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import covidscan.training.adapt as adapting
from covidscan.cli import app
from covidscan.config import ExperimentConfig, load_config
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import ConfigError, StorageError
from covidscan.evaluation import Calibration
from covidscan.explain.cam import gradcam
from covidscan.export import OnnxModel, export_onnx
from covidscan.inference import Predictor
from covidscan.models import EnsembleClassifier, FastClassifier, build_model
from covidscan.outputs import read_csv, write_csv
from covidscan.preprocess import prepare_manifest, to_model_batch
from covidscan.runs import load_run, save_run, write_checkpoint
from covidscan.training import train_experiment
from covidscan.training.adapt import adapt_run
from covidscan.training.ensemble import build_ensemble_run
from covidscan.training.run import load_dataset

SETTINGS = [
    "model.weights=none",
    "model.input_size=64",
    "train.epochs=2",
    "train.views=1",
    "evaluation.n_bootstrap=20",
    "data.ratios=[0.45,0.35,0.2]",
]
# Two members that normalise differently (ImageNet mean/std; 0.5/0.5): each must get its own input.
BACKBONES = ("timm:resnet18", "timm:tf_efficientnet_lite0")
TEMPERATURES = (0.8, 1.6)


def _cfg(backbone: str, *more: str) -> ExperimentConfig:
    return load_config("paper-a-resnet50", [*SETTINGS, f"model.backbone={backbone}", *more])


def _member(backbone: str, seed: int, *more: str):
    torch.manual_seed(seed)
    return build_model(_cfg(backbone, *more).model).eval()


def _pixels(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).random((n, 64, 64), dtype=np.float32)


def _saved_run(
    out: Path, backbone: str, seed: int, temperature: float, splits: pd.DataFrame, *more: str
) -> Path:
    """A run directory of an untrained model with the given splits (what `ensemble` reads of a run)."""
    cfg = _cfg(backbone, *more)
    save_run(out, cfg, _member(backbone, seed, *more), Calibration(temperature=temperature, threshold=0.5))
    write_csv(splits, out / "splits.csv")
    return out


def _invoke(*args: str):
    result = CliRunner().invoke(app, ["-q", *args], prog_name="covidscan")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@contextmanager
def _moved_away(*runs: Path) -> Iterator[None]:
    """The member runs renamed for a while: what the ensemble run needs must be inside it."""
    for run in runs:
        run.rename(run.with_name(run.name + ".away"))
    try:
        yield
    finally:
        for run in runs:
            run.with_name(run.name + ".away").rename(run)


# ---------------------------------------------------------------------------------------- the module
def test_ensemble_logits_are_the_weighted_mean_of_the_members() -> None:
    # b pools average and maximum side by side: its head takes twice its channels.
    a, b = _member(BACKBONES[0], 0), _member(BACKBONES[1], 1, "model.pooling=avgmax")
    assert a.mean != b.mean
    ensemble = EnsembleClassifier([a, b], [0.3, 0.2]).eval()
    pixels = _pixels()
    x = to_model_batch(pixels, ensemble.mean, ensemble.std)
    with torch.no_grad():
        logits, pooled = ensemble.forward_pooled(x)
        la, fa = a.forward_pooled(to_model_batch(pixels, a.mean, a.std))
        lb, fb = b.forward_pooled(to_model_batch(pixels, b.mean, b.std))
        torch.testing.assert_close(logits, 0.3 * la + 0.2 * lb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, torch.cat([fa, fb], dim=1))
        # The frozen-base cache and adapt's head see the same model in two steps.
        torch.testing.assert_close(ensemble.head_tail(ensemble.embed(x)), logits, atol=1e-6, rtol=1e-6)
        # The serving engine folds BatchNorm in every member: the same logits.
        torch.testing.assert_close(
            FastClassifier(ensemble).forward_pooled(x)[0], logits, atol=1e-4, rtol=1e-4
        )
    ensemble.head_tail.reset_parameters()  # adapt's fresh head: a plain mean
    assert ensemble.head_tail.weights.tolist() == [0.5, 0.5]


def test_ensemble_gradcam_averages_the_members_maps() -> None:
    a, b = _member(BACKBONES[0], 1), _member(BACKBONES[1], 0)  # seeds whose untrained maps are not all zero
    ensemble = EnsembleClassifier([a, b], [0.7, 0.1]).eval()
    pixels = _pixels(2)
    got = gradcam(ensemble, to_model_batch(pixels, ensemble.mean, ensemble.std))
    maps = [gradcam(m, to_model_batch(pixels, m.mean, m.std)) for m in (a, b)]
    assert all(m.max() > 0 for m in maps)
    mean = (maps[0] + maps[1]) / 2
    low = mean.min(axis=(1, 2), keepdims=True)
    expected = (mean - low) / (mean.max(axis=(1, 2), keepdims=True) - low)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_members_with_other_feature_map_sizes_are_refused() -> None:
    small, large = _member(BACKBONES[0], 0), _member(BACKBONES[0], 1, "model.input_size=96")
    with pytest.raises(ConfigError, match="feature maps differ in size"):
        EnsembleClassifier([small, large], [0.5, 0.5])


# ---------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(
        tmp_path_factory.mktemp("ensemble_data"), n=60, modality="ct", seed=3, slices_per_patient=2
    )


@pytest.fixture(scope="module")
def members(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two member runs of untrained models on the same split, with other temperatures; the second's head
    learns on standardised features."""
    splits = load_dataset(data, _cfg(BACKBONES[0]))
    root = tmp_path_factory.mktemp("members")
    return [
        _saved_run(root / f"m{i}", backbone, i, t, splits, *(["model.standardize=true"] if i else []))
        for i, (backbone, t) in enumerate(zip(BACKBONES, TEMPERATURES, strict=True))
    ]


@pytest.fixture(scope="module")
def ensemble(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "run"
    build_ensemble_run(members, out, progress=False)
    return out


def _prepared_split(run: Path, split: str):
    splits = read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    rows = splits[splits["split"] == split].reset_index(drop=True)
    checkpoint = load_run(run).checkpoint
    return prepare_manifest(rows, checkpoint.preprocess, checkpoint.input_size, progress=False)


def test_ensemble_probabilities_are_the_calibrated_mean_of_member_logits(
    members: list[Path], ensemble: Path
) -> None:
    predictors = [Predictor.from_run(run, engine="torch", precision="fp32") for run in members]
    mine = Predictor.from_run(ensemble, engine="torch", precision="fp32")
    scaled = {}
    for split in ("val", "test"):
        images = _prepared_split(ensemble, split).images
        scaled[split] = np.mean([p.logits(images) / p.calibration.temperature for p in predictors], axis=0)
        np.testing.assert_allclose(mine.logits(images), scaled[split], atol=1e-4)
    # One calibration, refitted on the shared validation split as training fits one.
    val = _prepared_split(ensemble, "val")
    ev = load_run(ensemble).config.evaluation
    refit = Calibration.fit(
        scaled["val"],
        val.labels,
        groups=val.groups,
        calibrate=ev.calibrate,
        method=ev.threshold,
        fixed_threshold=ev.fixed_threshold,
        aggregate=ev.aggregate,
        band=ev.band,
    )
    assert mine.calibration.temperature == pytest.approx(refit.temperature, rel=1e-3)
    assert mine.calibration.threshold == pytest.approx(refit.threshold, abs=1e-3)
    assert mine.calibration.temperature != pytest.approx(1.0)  # it was fitted, not left alone
    # The run's own test predictions are those probabilities.
    written = read_csv(ensemble / "predictions.csv")
    np.testing.assert_allclose(written["p_covid"], mine.calibration.proba(scaled["test"]), atol=1e-5)


def test_ensemble_run_is_self_contained(members: list[Path], ensemble: Path, tmp_path: Path) -> None:
    checkpoint = load_run(ensemble).checkpoint
    assert checkpoint.ensemble is not None
    assert [m.model.backbone for m in checkpoint.ensemble.members] == list(BACKBONES)
    assert [m.weights_sha256 for m in checkpoint.ensemble.members] == [
        load_run(run).checkpoint.weights_sha256 for run in members
    ]
    assert checkpoint.model_name == f"ensemble({', '.join(BACKBONES)})"
    assert checkpoint.ood is not None and checkpoint.shift_reference is not None
    for member, run in zip(checkpoint.ensemble.members, members, strict=True):
        kept = ensemble / "members" / member.name
        assert load_config(kept / "config.yaml") == load_run(run).config  # re-creates the member
        assert (kept / "checkpoint.json").read_text() == (run / "checkpoint.json").read_text()
    card = (ensemble / "model_card.md").read_text(encoding="utf-8")
    assert "Built by `covidscan ensemble` from 2 trained runs" in card
    moved = shutil.copytree(ensemble, tmp_path / "moved")
    with _moved_away(*members):
        predictor = Predictor.from_run(moved, engine="torch", precision="fp32")
        images = _prepared_split(moved, "test").images
        expected = Predictor.from_run(ensemble, engine="torch", precision="fp32").logits(images)
        np.testing.assert_array_equal(predictor.logits(images), expected)
    # Its config.yaml says how it was made; `train` cannot re-create an ensemble by itself.
    with pytest.raises(ConfigError, match="covidscan ensemble"):
        train_experiment(load_config(ensemble / "config.yaml"), "unused.csv", tmp_path / "x")


def test_incompatible_runs_are_refused_naming_the_run(
    data: Path, members: list[Path], ensemble: Path, tmp_path: Path
) -> None:
    splits = read_csv(members[0] / "splits.csv", dtype=str, keep_default_na=False)
    moved = splits.copy()
    moved.loc[moved.index[moved["split"] == "val"][0], "split"] = "train"
    other_split = _saved_run(tmp_path / "other-split", BACKBONES[1], 5, 1.0, moved)
    no_clahe = _saved_run(tmp_path / "no-clahe", BACKBONES[1], 6, 1.0, splits, "preprocess.clahe=false")
    out = tmp_path / "out"
    cases = [
        (
            [members[0], other_split],
            rf"{other_split}.*validation split differs \(0 images or labels only in "
            r"it, 1 only in",
        ),
        ([members[0], no_clahe], rf"{no_clahe}.*preprocess\.clahe False where .* has True"),
        ([members[0], ensemble], rf"{ensemble} is itself an ensemble"),
        ([members[0], members[0]], "same weights"),
        ([members[0]], "at least 2 trained runs"),
    ]
    for runs, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_ensemble_run(runs, out, progress=False)
        assert not out.exists()


def test_a_damaged_member_record_is_caught(ensemble: Path, tmp_path: Path) -> None:
    """The member list is sealed like every checkpoint key: an edited backbone never loads."""
    moved = Path(shutil.copytree(ensemble, tmp_path / "moved"))
    checkpoint = load_run(moved).checkpoint
    assert checkpoint.ensemble is not None
    first = checkpoint.ensemble.members[0]
    edited = checkpoint.ensemble.model_copy(
        update={
            "members": (
                first.model_copy(
                    update={"model": first.model.model_copy(update={"backbone": "timm:resnet10t"})}
                ),
                *checkpoint.ensemble.members[1:],
            )
        }
    )
    write_checkpoint(moved, checkpoint.model_copy(update={"ensemble": edited}))
    with pytest.raises(StorageError, match="disagree on ensemble"):
        load_run(moved)


def test_ensemble_predicts_evaluates_and_explains(ensemble: Path, tmp_path: Path) -> None:
    site = write_phantom_dataset(tmp_path / "site", n=20, modality="ct", seed=9, slices_per_patient=2)
    images = sorted((site.parent / "images").rglob("*.png"))[:4]
    result = _invoke(
        "predict",
        str(ensemble),
        *map(str, images),
        "--out",
        str(tmp_path / "p.csv"),
        "--cam",
        str(tmp_path / "cams"),
        "--precision",
        "fp32",
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "p.csv")
    assert rows["p_covid"].notna().all() and rows["ood_score"].notna().all()
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(images)
    result = _invoke("evaluate", str(ensemble), "--data", str(site), "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.slow
def test_ensemble_exports_one_onnx_graph(ensemble: Path, tmp_path: Path) -> None:
    path = export_onnx(ensemble, tmp_path / "ensemble.onnx")
    onnx_model = OnnxModel(path)
    model = load_run(ensemble).model
    x = to_model_batch(_prepared_split(ensemble, "test").images[:5], model.mean, model.std)
    logits, features = onnx_model.run(x)
    with torch.no_grad():
        expected_logits, expected_features = model.forward_pooled(x.contiguous())
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(features, expected_features.numpy(), atol=1e-4)
    assert onnx_model.metadata["ensemble"]["members"][1]["model"]["backbone"] == BACKBONES[1]


def test_review_service_scorer_loads_an_ensemble(ensemble: Path, data: Path) -> None:
    from covidscan.service.scoring import Scorer

    scorer = Scorer(ensemble)
    assert scorer.identity["model_name"].startswith("ensemble(")
    images = sorted((data.parent / "images").rglob("*.png"))[:2]
    case = scorer.score([(path, ".png", path.name) for path in images])
    assert all(image.p_covid is not None and image.cam_png for image in case.images)
    assert scorer.reference().shape[0] == load_run(ensemble).checkpoint.shift_reference.n_images


@pytest.mark.slow
def test_adapting_an_ensemble_refits_the_members_heads_jointly(
    ensemble: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = write_phantom_dataset(
        tmp_path / "site", n=24, modality="ct", seed=11, slices_per_patient=2, site="scanner-b"
    )
    masks = []
    real_fit_head = adapting.fit_head

    def spy(*args, standardize, **kwargs):
        masks.append(standardize)
        return real_fit_head(*args, standardize=standardize, **kwargs)

    monkeypatch.setattr(adapting, "fit_head", spy)
    result = adapt_run(ensemble, site, tmp_path / "adapted", mode="head", folds=2, progress=False)
    # Only the second member learned on standardised features: only its features are standardised again.
    sizes = load_run(ensemble).model.head_tail.sizes
    assert masks and all(m.tolist() == [False] * sizes[0] + [True] * sizes[1] for m in masks)
    adapted, parent = load_run(result.run_dir), load_run(ensemble)
    assert adapted.checkpoint.ensemble == parent.checkpoint.ensemble
    assert adapted.checkpoint.parent is not None and adapted.checkpoint.parent.mode == "head"
    assert adapted.model.head_tail.weights.tolist() == [0.5, 0.5]  # a fresh head: a plain mean
    backbone = {k: v for k, v in adapted.model.state_dict().items() if k.startswith("backbone.")}
    for key, value in backbone.items():
        torch.testing.assert_close(value, parent.model.state_dict()[key])  # the members' backbones stay
    images = _prepared_split(ensemble, "test").images
    predictor = Predictor.from_run(result.run_dir, engine="torch", precision="fp32")
    assert not np.allclose(
        predictor.logits(images),
        Predictor.from_run(ensemble, engine="torch", precision="fp32").logits(images),
    )


@pytest.mark.slow
def test_ensemble_of_trained_runs_from_the_command_line(data: Path, tmp_path: Path) -> None:
    runs = []
    for i, backbone in enumerate(("timm:resnet18", "timm:resnet10t")):
        runs.append(tmp_path / f"run{i}")
        result = _invoke(
            "train",
            "paper-a-resnet50",
            "--data",
            str(data),
            "--out",
            str(runs[-1]),
            *[arg for s in [*SETTINGS, f"model.backbone={backbone}"] for arg in ("--set", s)],
        )
        assert result.exit_code == 0, result.output
    result = _invoke("ensemble", *map(str, runs), "--out", str(tmp_path / "ens"), "--name", "both")
    assert result.exit_code == 0, result.output
    assert load_run(tmp_path / "ens").config.name == "both"
    metrics = read_csv(tmp_path / "ens" / "predictions.csv")
    assert metrics["p_covid"].between(0, 1).all()
