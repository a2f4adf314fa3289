"""Unlabelled alignment to a site (``covidscan adapt --unlabelled``): the map, the rule, the run it writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import ConfigError, StorageError
from covidscan.inference import Predictor
from covidscan.io import list_images
from covidscan.models.align import FeatureAlignment
from covidscan.runs import load_checkpoint
from covidscan.training.align import (
    ALIGNMENT_FILE,
    MIN_SITE_IMAGES,
    Judgement,
    align_run,
    choose,
    halves,
    judge_alignment,
)

RNG = np.random.default_rng(0)


def _gaussian(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def _random_cov(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_coral_makes_the_site_covariance_and_mean_the_sources():
    d = 6
    source = _gaussian(4000, np.arange(d, dtype=float), _random_cov(d, 1), seed=2)
    site = _gaussian(3000, -np.ones(d), _random_cov(d, 3) * 4, seed=4)
    aligned = FeatureAlignment("coral").fit(site, source).transform(site)
    assert _rel(np.cov(site.T), np.cov(source.T)) > 0.5  # the site really is shifted
    assert _rel(np.cov(aligned.T), np.cov(source.T)) < 0.05
    np.testing.assert_allclose(aligned.mean(axis=0), source.mean(axis=0), atol=1e-8)
    # standardisation matches each feature's spread, not the correlations between features
    standard = FeatureAlignment("standardize").fit(site, source).transform(site)
    np.testing.assert_allclose(standard.std(axis=0), source.std(axis=0), rtol=1e-6)
    assert _rel(np.cov(standard.T), np.cov(source.T)) > _rel(np.cov(aligned.T), np.cov(source.T))


@pytest.mark.parametrize("method", ["standardize", "coral"])
def test_the_map_folds_into_a_linear_layer_and_round_trips_through_a_file(method: str, tmp_path: Path):
    site, source = RNG.normal(2, 3, size=(50, 5)), RNG.normal(0, 1, size=(80, 5))
    alignment = FeatureAlignment(method).fit(site, source)
    layer = torch.nn.Linear(5, 3).double()
    expected = layer(torch.from_numpy(alignment.transform(site))).detach().numpy()
    alignment.fold_into(layer)
    np.testing.assert_allclose(layer(torch.from_numpy(site)).detach().numpy(), expected, atol=1e-9)
    again = FeatureAlignment.load(alignment.save(tmp_path / "a.safetensors"))
    assert again.method == method
    np.testing.assert_array_equal(again.transform(site), alignment.transform(site))
    (tmp_path / "bad.safetensors").write_bytes(b"no")
    with pytest.raises(StorageError, match=r"bad\.safetensors"):
        FeatureAlignment.load(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="4 features per image but the alignment 5"):
        alignment.transform(site[:, :4])


def _two_classes(
    n: int, covid_share: float, seed: int, scale: float | list[float] = 1.0, shift: float | list[float] = 0.0
) -> np.ndarray:
    """Features of two classes 2 apart on feature 0, ``covid_share`` of them covid, then an affine shift."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < covid_share
    x = rng.normal(size=(n, 4))
    x[:, 0] += np.where(y, 1.0, -1.0)
    return x * scale + shift


def _positive(x: np.ndarray) -> np.ndarray:
    return x[:, 0] > 0


def _judge(site: np.ndarray, method: str = "standardize"):
    source, reference = _two_classes(300, 0.5, seed=10), _two_classes(120, 0.5, seed=11)
    groups = np.arange(len(site)).astype(str)
    return judge_alignment(method, site, groups, source, reference, _positive, seed=0)


def test_the_rule_keeps_an_alignment_that_undoes_a_scanner_shift():
    # the scanner moves and stretches features the label does not depend on
    judged = _judge(_two_classes(200, 0.5, seed=12, scale=[1, 3, 3, 3], shift=[0, 4, 4, 4]))
    assert judged.accepted, judged.reason
    assert judged.shift_auc_before > 0.9 and judged.shift_auc_after < judged.shift_auc_before - 0.05
    assert choose([judged]) == "standardize"


def test_the_bound_also_refuses_a_corrected_operating_point():
    # the honest limit: a shift along the label's own feature makes the run call 80% covid; aligning
    # corrects that, but without labels it looks exactly like label shift, so the bound refuses it
    judged = _judge(_two_classes(200, 0.5, seed=12, scale=3.0, shift=4.0))
    assert judged.shift_auc_after < judged.shift_auc_before - 0.05
    assert judged.positive_rate_before > 0.7 and abs(judged.positive_rate_after - 0.5) < 0.1
    assert not judged.accepted and "share called covid" in judged.reason


def test_the_rule_refuses_an_alignment_that_does_not_help():
    judged = _judge(_two_classes(200, 0.5, seed=13))  # no shift at all: nothing to undo
    assert not judged.accepted and "shift test" in judged.reason
    assert choose([judged]) is None


def test_the_rule_refuses_an_alignment_that_would_undo_label_shift():
    # a site that sees mostly COVID: its mean differs from the training mean for a real reason
    judged = _judge(_two_classes(300, 0.95, seed=14))
    assert judged.shift_auc_after < judged.shift_auc_before  # alignment "closes" the gap ...
    assert judged.positive_rate_before > 0.8 and judged.positive_rate_after < 0.7  # ... by calling fewer
    assert not judged.accepted and "share called covid" in judged.reason


def test_auto_keeps_the_simpler_method_unless_the_other_is_clearly_closer():
    def judged(method: str, after: float, accepted: bool = True) -> Judgement:
        return Judgement(method, 0.9, after, 0.5, 0.5, accepted, "")

    assert choose([judged("standardize", 0.50), judged("coral", 0.47)]) == "standardize"  # within noise
    assert choose([judged("standardize", 0.60), judged("coral", 0.50)]) == "coral"
    assert choose([judged("standardize", 0.40, accepted=False), judged("coral", 0.50)]) == "coral"


def test_halves_never_split_a_patient():
    groups = np.repeat(np.arange(20).astype(str), 3)
    side = halves(groups, seed=1)
    for g in np.unique(groups):
        assert len(set(side[groups == g])) == 1
    assert abs(int(side.sum()) - 30) <= 3


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another scanner's phantoms (scanner-b), 2 slices per patient, as a folder without labels."""
    manifest = write_phantom_dataset(
        tmp_path_factory.mktemp("site"), n=80, modality="ct", seed=8, slices_per_patient=2, site="scanner-b"
    )
    return manifest.parent / "images"


def covidscan(*args: str):
    result = CliRunner().invoke(app, list(args), prog_name="covidscan")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.slow
def test_the_aligned_run_serves_the_folded_map_exactly(ood_run: Path, site: Path, tmp_path: Path):
    result = align_run(ood_run, site, tmp_path / "aligned", max_rate_change=1.0, progress=False)
    assert result.method is not None and result.run_dir is not None, result.judgements
    run = result.run_dir
    checkpoint = load_checkpoint(run)
    assert checkpoint.parent is not None and checkpoint.parent.mode == f"align:{result.method}"
    assert checkpoint.calibration == load_checkpoint(ood_run).calibration
    alignment = FeatureAlignment.load(run / ALIGNMENT_FILE)
    assert "unlabelled, on held-out site images" in (run / "model_card.md").read_text(encoding="utf-8")

    paths = [str(p) for p in list_images(site)][:16]
    parent = Predictor.from_run(ood_run, fast=False)
    aligned = Predictor.from_run(run, fast=False)
    prepared = [parent.prepare(parent.load(p)) for p in paths]
    z_parent, pooled = parent.logits_and_features(prepared)
    assert pooled is not None
    head = parent.model.head_tail.eval()
    with torch.inference_mode():
        logits = head(torch.from_numpy(alignment.transform(pooled)).float())
    expected = parent.calibration.proba((logits[:, 1] - logits[:, 0]).numpy())
    served = np.array([p.p_covid for p in aligned.score(prepared)])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert not np.allclose(served, parent.calibration.proba(z_parent), atol=1e-3)  # it did change them
    # the map lives in the weights, so the ONNX engine serves it too
    onnx = Predictor.from_run(run, engine="onnx")
    np.testing.assert_allclose([p.p_covid for p in onnx.score(prepared)], expected, atol=1e-4)


@pytest.mark.slow
def test_the_command_refuses_what_does_not_help_and_writes_nothing(ood_run: Path, site: Path, tmp_path: Path):
    # a bound of 0 on the share called covid: any alignment that changes a label is refused
    result = covidscan(
        "adapt",
        str(ood_run),
        "--unlabelled",
        "--data",
        str(site),
        "--out",
        str(tmp_path / "out"),
        "--max-rate-change",
        "0",
        "--align",
        "coral",
    )
    if result.exit_code == 0:  # coral kept every label of the held-out halves: nothing to refuse here
        pytest.skip("coral changed no label on this site")
    assert result.exit_code == 1 and "refused" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_site_inputs_are_named(ood_run: Path, tmp_path: Path):
    missing = covidscan(
        "adapt",
        str(ood_run),
        "--unlabelled",
        "--data",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o1"),
    )
    assert missing.exit_code == 2 and "nowhere" in missing.output and "does not exist" in missing.output
    few = write_phantom_dataset(tmp_path / "few", n=10, modality="ct", seed=2).parent / "images"
    small = covidscan(
        "adapt", str(ood_run), "--unlabelled", "--data", str(few), "--out", str(tmp_path / "o2")
    )
    assert small.exit_code == 2 and f"at least {MIN_SITE_IMAGES} usable images" in small.output
    assert "10 of 10" in small.output
    xrays = (
        write_phantom_dataset(tmp_path / "xr", n=MIN_SITE_IMAGES, modality="cxr", seed=2).parent / "images"
    )
    other = covidscan(
        "adapt", str(ood_run), "--unlabelled", "--data", str(xrays), "--out", str(tmp_path / "o3")
    )
    # the quality gate refuses X-rays given to a CT run; the error says how many and why
    usable = re.search(rf"(\d+) of {MIN_SITE_IMAGES} images are usable", other.output)
    assert other.exit_code == 2 and usable is not None and int(usable.group(1)) < MIN_SITE_IMAGES
    assert "not like a chest CT slice" in other.output
    wrong = covidscan(
        "adapt",
        str(ood_run),
        "--unlabelled",
        "--data",
        str(few),
        "--out",
        str(tmp_path / "o4"),
        "--align",
        "mean",
    )
    assert wrong.exit_code == 2 and "'mean'" in wrong.output
    mixed = covidscan(
        "adapt",
        str(ood_run),
        "--unlabelled",
        "--mode",
        "head",
        "--data",
        str(few),
        "--out",
        str(tmp_path / "o5"),
    )
    assert mixed.exit_code == 2 and "--mode does not go with --unlabelled" in mixed.output
    stray = covidscan(
        "adapt", str(ood_run), "--align", "coral", "--data", str(few), "--out", str(tmp_path / "o6")
    )
    assert stray.exit_code == 2 and "--align does not go with labelled adaptation" in stray.output
