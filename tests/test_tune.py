"""``covidscan tune``: settings chosen by patient-grouped cross-validation, on tiny phantoms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.config import load_config
from covidscan.errors import ConfigError, ManifestError
from covidscan.training import tune as tuning
from covidscan.training.run import load_dataset

TINY = [
    "model.weights=none",
    "model.input_size=64",
    "train.epochs=2",
    "train.views=2",
    "evaluation.n_bootstrap=20",
]
GRID = ["model.backbone=timm:resnet18,timm:resnet10t", "model.dropout=0.1,0.5"]


@pytest.fixture(scope="module")
def prepared_paths(monkeypatch_module) -> list[str]:
    """Every image path tune hands to preprocessing (filled while the module's tune runs)."""
    seen: list[str] = []
    real = tuning.prepare_manifest

    def spy(df: pd.DataFrame, *args, **kwargs):
        seen.extend(df["path"].astype(str))
        return real(df, *args, **kwargs)

    monkeypatch_module.setattr(tuning, "prepare_manifest", spy)
    return seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def tuned(phantom_manifest: Path, prepared_paths: list[str], tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("features")
    out = tmp_path_factory.mktemp("tune") / "out"
    store_counts = []
    real_store = tuning.FeatureStore

    class CountingStore(real_store):
        def __init__(self, folder=None):
            super().__init__(folder)
            store_counts.append(self)

    tuning.FeatureStore = CountingStore
    try:
        result = tuning.tune(
            "paper-a-resnet50",
            phantom_manifest,
            GRID,
            overrides=TINY,
            folds=3,
            out=out,
            cache=cache,
            progress=False,
        )
    finally:
        tuning.FeatureStore = real_store
    return result, out, cache, store_counts[0]


def test_every_grid_point_has_fold_results(tuned):
    result, out, _, _ = tuned
    labels = [s.label for s in result.settings]
    assert labels == [
        f"model.backbone={b} model.dropout={d}"
        for b in ("timm:resnet18", "timm:resnet10t")
        for d in ("0.1", "0.5")
    ]
    for s in result.settings:
        assert s.config.model.backbone in s.label and f"dropout={s.config.model.dropout}" in s.label
        assert len(s.folds) == result.n_folds == 3
        assert all(0 <= f["roc_auc"] <= 1 for f in s.folds)
    table = pd.read_csv(out / "tune.csv")
    assert len(table) == 4 and set(table["model.dropout"]) == {0.1, 0.5}
    np.testing.assert_allclose(table["roc_auc_mean"], [s.summary("roc_auc")["mean"] for s in result.settings])


def test_features_are_extracted_once_per_backbone(tuned, phantom_manifest: Path):
    result, _, cache, store = tuned
    assert store.extractions == 2  # two backbones, four settings
    assert len(list(cache.glob("*.pt"))) == 2
    assert [e.extracted for e in result.features] == [True, True]
    again = tuning.tune(
        "paper-a-resnet50", phantom_manifest, GRID, overrides=TINY, folds=3, cache=cache, progress=False
    )
    assert [e.extracted for e in again.features] == [False, False]
    # Same folds, same features, same seeds: the cached run gives the same figures.
    assert [s.folds for s in again.settings] == [s.folds for s in result.settings]


def test_head_only_settings_share_features_and_others_do_not():
    cfg = load_config("paper-a-resnet50", TINY)
    same = load_config("paper-a-resnet50", [*TINY, "train.lr=0.01", "model.dropout=0.6", "train.epochs=9",
                                            "model.standardize=true"])
    other = load_config("paper-a-resnet50", [*TINY, "preprocess.clahe=false"])
    assert tuning.feature_key(cfg, ["a.png"]) == tuning.feature_key(same, ["a.png"])
    assert tuning.feature_key(cfg, ["a.png"]) != tuning.feature_key(other, ["a.png"])
    # the linear head takes the same pooled features as paper A's; paper B's takes the whole map
    linear = load_config("paper-a-resnet50", [*TINY, "model.head=linear"])
    flat = load_config("paper-a-resnet50", [*TINY, "model.head=paper_b", "model.hidden=[8]"])
    assert tuning.feature_key(linear, ["a.png"]) == tuning.feature_key(cfg, ["a.png"])
    assert tuning.feature_key(flat, ["a.png"]) != tuning.feature_key(cfg, ["a.png"])
    # pooling decides what is cached (the head's parameter-free start), so each pooling has its own features
    peak = load_config("paper-a-resnet50", [*TINY, "model.pooling=max"])
    assert tuning.feature_key(peak, ["a.png"]) != tuning.feature_key(cfg, ["a.png"])
    assert tuning.feature_key(cfg, ["a.png"]) != tuning.feature_key(cfg, ["b.png"])


def test_folds_are_patient_disjoint_and_never_hold_test_rows(
    tuned, phantom_manifest: Path, prepared_paths: list[str]
):
    result, out, _, _ = tuned
    cfg = result.settings[0].config
    split = load_dataset(phantom_manifest, cfg).set_index("path")["split"]
    test_paths = set(split.index[split == "test"])
    assert test_paths and not test_paths & set(prepared_paths)  # test images were never even read
    oof = pd.read_csv(out / "oof.csv")
    assert not test_paths & set(oof["path"])
    assert set(oof["path"]) == set(split.index[split != "test"])
    one = oof[oof["setting"] == 0]
    assert one["logit"].notna().all()
    assert (one.groupby("patient_id")["fold"].nunique() == 1).all()  # a patient sits in one fold only
    assert one["fold"].nunique() == 3

    y = np.array([0, 1] * 20)
    groups = np.repeat(np.arange(20), 2)  # 2 images per patient, 10 patients per class
    for fold in tuning.make_folds(y, groups, 4, seed=0):
        parts = [set(groups[idx]) for idx in (fold.fit, fold.val, fold.test)]
        assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_the_best_setting_is_marked(tuned):
    result, out, _, _ = tuned
    means = [s.summary("roc_auc")["mean"] for s in result.settings]
    assert result.best == int(np.argmax(means))
    report = json.loads((out / "tune.json").read_text())
    assert report["best"] == list(result.best_setting.assignments)
    assert [r["best"] for r in report["settings"]] == [i == result.best for i in range(4)]
    assert report["settings"][result.best]["roc_auc_below_best"] is None
    below = [r["roc_auc_below_best"]["mean"] for r in report["settings"] if not r["best"]]
    assert all(b >= 0 for b in below)  # nothing beats the best on average over the same folds
    table = pd.read_csv(out / "tune.csv")
    assert table["best"].tolist() == [i == result.best for i in range(4)]
    best = load_config(out / "best.yaml")
    assert best.model.backbone == result.best_setting.config.model.backbone
    assert best.model.dropout == result.best_setting.config.model.dropout
    assert report["test_rows"] == "not read" and report["folds"] == 3


def test_mean_ci_is_a_student_t_interval_over_folds():
    summary = tuning.mean_ci([0.6, 0.7, 0.8, None])
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(0.7)
    assert (summary["low"], summary["high"]) == pytest.approx((0.7 - half, 0.7 + half))
    assert tuning.mean_ci([None])["mean"] is None


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (
            ["model.dropot=0.1,0.2"],
            "--grid model.dropot=0.1: model.dropot is not a setting; did you mean model.dropout?",
        ),
        (["model.dropout=0.1,1.5"], "--grid model.dropout=1.5: model.dropout"),
        (["train.epochs=5,zero"], "--grid train.epochs=zero: train.epochs"),
        (["data.seed=1,2"], "--grid data.seed=1,2: data.seed cannot be tuned"),
        (["model.train_mode=frozen,full"], "model.train_mode cannot be tuned"),
        (["train.lr=0.1", "train.lr=0.2"], "--grid train.lr is given twice"),
        (["train.lr"], "must look like key=value1,value2"),
        (["model.backbone,model.weights=a,b"], "give each value as [model.backbone,model.weights]"),
        (["model.head=linear", "model.hidden=[16]"], "head linear has no hidden layer"),
    ],
)
def test_bad_grids_are_refused_naming_the_key(phantom_manifest: Path, tmp_path: Path, grid, message):
    with pytest.raises(ConfigError) as err:
        tuning.tune(
            "paper-a-resnet50", phantom_manifest, grid, overrides=TINY, cache=tmp_path, progress=False
        )
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())  # refused before any feature was extracted


def test_too_many_folds_for_the_patients_is_a_clear_error(phantom_manifest: Path, tmp_path: Path):
    with pytest.raises(ManifestError, match="needs at least 50 patients of each class"):
        tuning.tune(
            "paper-a-resnet50", phantom_manifest, [], overrides=TINY, folds=50, cache=tmp_path, progress=False
        )


def test_linked_settings_vary_together(tmp_path: Path):
    axes = tuning.parse_grid(
        [
            "model.backbone,model.weights=[timm:resnet18,none],[mobilenet_v2,/w/m.pth]",
            "model.hidden=[256],[64,32]",
        ]
    )
    settings = [a.assignments(v) for a in axes[:1] for v in a.values]
    assert settings == [
        ["model.backbone=timm:resnet18", "model.weights=none"],
        ["model.backbone=mobilenet_v2", "model.weights=/w/m.pth"],
    ]
    assert axes[1].values == (("[256]",), ("[64,32]",))


@pytest.mark.slow
def test_cli_tunes_then_trains_the_best(phantom_manifest: Path, tmp_path: Path):
    args = [
        "tune",
        "paper-a-resnet50",
        "--data",
        str(phantom_manifest),
        "--grid",
        "train.lr=0.01,0.001",
        "--folds",
        "3",
        "--out",
        str(tmp_path / "t"),
        "--cache",
        str(tmp_path / "c"),
        "--train-best",
    ]
    for override in TINY:
        args += ["--set", override]
    result = CliRunner().invoke(app, args, prog_name="covidscan")
    assert result.exit_code == 0, result.output
    assert "best: train.lr=" in result.output
    report = json.loads((tmp_path / "t" / "tune.json").read_text())
    trained = load_config(tmp_path / "t" / "best" / "config.yaml")
    assert float(dict(a.split("=") for a in report["best"])["train.lr"]) == trained.train.lr
    assert (tmp_path / "t" / "best" / "metrics.json").is_file()  # the test split, scored once, here
    bad = CliRunner().invoke(
        app,
        ["tune", "paper-a-resnet50", "--data", str(phantom_manifest), "--grid", "model.dropot=0.1"],
        prog_name="covidscan",
    )
    assert bad.exit_code == 2 and "did you mean model.dropout" in bad.output


def test_without_augmentation_the_backbone_runs_once(phantom_manifest: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = tuning.embed

    def counting(*args, **kwargs):
        calls.append(kwargs.get("views", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(tuning, "embed", counting)
    cfg = load_config("paper-a-resnet50", [*TINY, "train.augment=null"])
    df = load_dataset(phantom_manifest, cfg)
    feats, _, _ = tuning.FeatureStore(tmp_path).get(cfg, df, strict=False, progress=False)
    assert calls == [1]
    assert feats.aug.shape[1] == 1
    torch.testing.assert_close(feats.clean, feats.aug[:, 0])
    # the plain image's features, as an augmented run's separate pass computes them
    augmented = load_config("paper-a-resnet50", [*TINY, "train.augment=paper_a", "train.views=1"])
    again, _, _ = tuning.FeatureStore(tmp_path).get(augmented, df, strict=False, progress=False)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(again.clean, feats.clean)
