"""``model.standardize``: heads that learn on standardised cached features, the map folded into the head."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

import covidscan.training.adapt as adapting
from covidscan.config import TrainConfig, load_config
from covidscan.errors import ConfigError
from covidscan.inference import Predictor
from covidscan.models.align import FeatureAlignment, standardizer
from covidscan.models.ensemble import EnsembleTail
from covidscan.models.heads import linear_head, paper_a_head
from covidscan.runs import load_run
from covidscan.training import train_experiment
from covidscan.training.adapt import adapt_run
from covidscan.training.engine import CachedFeatures, fit, fit_head

SCHEDULE = TrainConfig(epochs=10, batch_size=32, lr=1e-3, early_stopping=None)


def _narrow_features(seed: int, n: int = 200, d: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Features like a chest-CT encoder's: large means, small spread; the label shifts 4 of them by one SD."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = 5.0 + 0.05 * rng.normal(size=(n, d))
    x[:, :4] += 0.05 * y[:, None]
    return torch.tensor(x, dtype=torch.float32), y


def _tail(d: int) -> torch.nn.Module:
    """paper_a's trainable part (Linear -> ReLU -> Linear), no dropout."""
    return paper_a_head(d, 16, 0.0)[2:]


def _scores(head: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z = head.eval()(x)
    return (z[:, 1] - z[:, 0]).numpy()


def test_the_standardizer_gives_zero_mean_and_unit_sd_and_leaves_a_dead_feature_alone():
    x = np.random.default_rng(0).normal(7.0, 0.01, size=(100, 4))
    x[:, 2] = 3.0
    scaler = standardizer(x)
    z = scaler.transform(x)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=0)[[0, 1, 3]], 1.0, rtol=1e-9)
    assert scaler.linear_[2] == 1.0 and np.all(z[:, 2] == 0.0)  # moved to 0, not stretched from nothing
    np.testing.assert_allclose(z, StandardScaler().fit_transform(x), atol=1e-8)
    with pytest.raises(ConfigError, match="at least 3 images"):
        standardizer(x[:2])
    with pytest.raises(ConfigError, match="NaN or infinite"):
        standardizer(np.where(x > 7.0, np.nan, x))


def test_the_map_folds_into_a_head_and_into_each_member_of_an_ensemble():
    x = np.random.default_rng(1).normal(3.0, 0.2, size=(40, 10))
    scaler = standardizer(x)
    raw, scaled = torch.from_numpy(x), torch.from_numpy(scaler.transform(x))
    head = _tail(10).double()
    expected = head(scaled).detach()
    scaler.fold_into(head)
    torch.testing.assert_close(head(raw).detach(), expected)

    members = [linear_head(6)[2:].double(), _tail(4).double()]
    ensemble = EnsembleTail(members, [6, 4], [0.5, 0.5]).double()
    expected = ensemble(scaled).detach()
    scaler.fold_into(ensemble)
    torch.testing.assert_close(ensemble(raw).detach(), expected)

    with pytest.raises(ConfigError, match="only a per-feature map"):
        FeatureAlignment("coral").fit(x, x + 1).fold_into(EnsembleTail(members, [6, 4], [0.5, 0.5]))
    with pytest.raises(ConfigError, match="maps 10 features"):
        scaler.fold_into(_tail(12))


def test_a_standardised_fit_is_a_fit_on_standard_scaled_features():
    x, y = _narrow_features(0)
    torch.manual_seed(0)
    start = _tail(x.shape[1])
    head, reference = copy.deepcopy(start), copy.deepcopy(start)
    torch.manual_seed(1)
    fit_head(head, CachedFeatures(x[:, None], y), CachedFeatures(x[:, None], y), SCHEDULE, standardize=True,
             progress=False)
    scaled = torch.tensor(StandardScaler().fit_transform(x.numpy()), dtype=torch.float32)
    torch.manual_seed(1)
    fit(reference, CachedFeatures(scaled[:, None], y), CachedFeatures(scaled[:, None], y), SCHEDULE,
        progress=False)
    # The fitted head takes the raw features: the map is inside its first layer.
    np.testing.assert_allclose(_scores(head, x), _scores(reference, scaled), atol=1e-4)


def test_a_mask_standardises_only_the_features_it_marks():
    x, y = _narrow_features(0)
    mask = np.arange(x.shape[1]) < 16
    torch.manual_seed(0)
    start = _tail(x.shape[1])
    head, reference = copy.deepcopy(start), copy.deepcopy(start)
    torch.manual_seed(1)
    fit_head(head, CachedFeatures(x[:, None], y), None, SCHEDULE, standardize=mask, progress=False)
    half = x.clone()
    half[:, :16] = torch.tensor(StandardScaler().fit_transform(x[:, :16].numpy()), dtype=torch.float32)
    torch.manual_seed(1)
    fit(reference, CachedFeatures(half[:, None], y), None, SCHEDULE, progress=False)
    np.testing.assert_allclose(_scores(head, x), _scores(reference, half), atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_standardising_rescues_a_head_on_narrow_features(seed: int):
    x, y = _narrow_features(seed)
    auc = {}
    for standardize in (False, True):
        torch.manual_seed(0)
        head = _tail(x.shape[1])
        fit_head(head, CachedFeatures(x[:, None], y), None, SCHEDULE, standardize=standardize, progress=False)
        auc[standardize] = roc_auc_score(y, _scores(head, x))
    # 10 epochs of Adam at 1e-3 barely move a head whose inputs vary by 1% of their size
    assert auc[True] > 0.75 > 0.6 > auc[False]


def test_standardize_is_refused_where_no_fixed_features_exist():
    assert load_config("covidscan-ct", ["model.standardize=true"]).model.standardize
    for setting in ("model.train_mode=finetune", "train.cache_features=false"):
        with pytest.raises(ConfigError, match=r"model.standardize needs fixed features.*train_mode=frozen"):
            load_config("covidscan-ct", ["model.standardize=true", setting])


@pytest.fixture(scope="module")
def standardised_run(phantom_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("paper-a-resnet50", [
        "model.backbone=timm:resnet18", "model.weights=none", "model.input_size=64", "model.standardize=true",
        "train.epochs=3", "train.views=2", "evaluation.n_bootstrap=20",
    ])
    out = tmp_path_factory.mktemp("standardised") / "run"
    train_experiment(cfg, phantom_manifest, out, progress=False)
    return out


def test_a_standardised_run_serves_and_says_how_it_learned(standardised_run: Path, phantom_manifest: Path):
    assert load_run(standardised_run).config.model.standardize
    report = (standardised_run / "report.md").read_text(encoding="utf-8")
    assert "standardised by the training features' mean and standard deviation" in report
    # The stored head is a plain head taking the raw features (the map is in its first layer): every
    # engine serves it as it serves any other run.
    paths = sorted(phantom_manifest.parent.rglob("*.png"))[:6]
    results = Predictor.from_run(standardised_run, engine="torch").predict(paths)
    assert len(results) == 6 and all(r.error is None and 0.0 <= r.p_covid <= 1.0 for r in results)


def test_adapt_refits_a_standardised_head_standardised(standardised_run: Path, phantom_manifest: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[bool] = []

    def spy(*args, standardize: bool = False, **kwargs):
        calls.append(standardize)
        return fit_head(*args, standardize=standardize, **kwargs)

    monkeypatch.setattr(adapting, "fit_head", spy)
    result = adapt_run(standardised_run, phantom_manifest, tmp_path / "adapted", mode="head", folds=2,
                       allow_overlap=True, progress=False)
    assert result.mode == "head" and calls and all(calls)
