"""The shift alarm: the two-sample test, the run's stored reference, older runs, and `covidscan shift`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import ConfigError, ResourceNotFoundError
from covidscan.evaluation import ShiftTest, shift_features, two_sample_test
from covidscan.evaluation.shift import MIN_IMAGES, VERDICT_ALARM
from covidscan.inference import Predictor
from covidscan.inference.shift import COMPUTED, run_reference, shift_report
from covidscan.io import STAT_NAMES
from covidscan.outputs import read_csv
from covidscan.runs import SHIFT_FILE, load_checkpoint, load_shift_reference, write_checkpoint
from test_cli import covidscan


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 phantoms of the training style (another seed) and 40 of another scanner (scanner-b)."""
    root = tmp_path_factory.mktemp("shift_groups")
    return {site: write_phantom_dataset(root / site, n=40, modality="ct", seed=21, slices_per_patient=2,
                                        site=site).parent / "images" for site in ("default", "scanner-b")}


def test_the_test_separates_a_shifted_group_and_not_a_like_one():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(80, 60))
    like = two_sample_test(reference, rng.normal(size=(40, 60)), seed=1)
    shifted = rng.normal(size=(40, 60)) + np.r_[np.full(10, 0.8), np.zeros(50)]
    unlike = two_sample_test(reference, shifted, seed=1)
    assert not like.alarm and like.p_value > like.level and 0.3 < like.auc < 0.7
    assert unlike.alarm and unlike.p_value < 0.01 and unlike.auc > 0.85
    assert unlike.auc_ci is not None and unlike.auc_ci[0] < unlike.auc < unlike.auc_ci[1]
    assert unlike.verdict == VERDICT_ALARM and "not yet validated here" in unlike.verdict
    assert (unlike.n_reference, unlike.n_sample, len(unlike.scores)) == (80, 40, 120)
    assert two_sample_test(reference, shifted, seed=1) == unlike  # seeded: the same answer every time
    assert set(unlike.to_dict()) >= {"auc", "auc_ci", "p_value", "n_reference", "n_sample", "alarm", "level"}
    mmd = two_sample_test(reference, shifted, seed=1, method="mmd")
    assert mmd.alarm and mmd.auc == unlike.auc  # the effect size is the classifier's AUC either way


def test_fewer_than_30_images_and_bad_arrays_are_refused():
    reference = np.zeros((40, 5))
    with pytest.raises(ConfigError, match=f"29 images; the shift test needs at least {MIN_IMAGES}"):
        two_sample_test(reference, np.ones((29, 5)))
    with pytest.raises(ConfigError, match="4 features per image but the reference 5"):
        two_sample_test(reference, np.ones((30, 4)))
    with pytest.raises(ConfigError, match="not fitted"):
        ShiftTest().test(np.ones((30, 5)))
    with pytest.raises(ConfigError, match="image statistics"):
        shift_features(np.ones((3, 8)), np.ones((3, 2)))
    # 100 permutations: the smallest p-value is 1/101, never below the default level, so no alarm could sound
    with pytest.raises(ConfigError, match=r"below level 0\.003; use at least 334 permutations"):
        ShiftTest(n_permutations=100)


def test_a_trained_run_stores_its_validation_features_and_predictions_carry_theirs(ood_run: Path):
    checkpoint = load_checkpoint(ood_run)
    assert checkpoint.shift_reference is not None and checkpoint.shift_reference.source == "validation split"
    stored = load_shift_reference(ood_run, checkpoint)
    splits = read_csv(ood_run / "splits.csv")
    assert stored is not None and len(stored) == (splits["split"] == "val").sum()
    predictor = Predictor.from_run(ood_run, precision="fp32")
    val = splits.loc[splits["split"] == "val", "path"].tolist()
    predictions = predictor.predict(val[:3])
    features = np.stack([p.features for p in predictions])
    assert features.shape == (3, stored.shape[1]) and stored.shape[1] > len(STAT_NAMES)
    np.testing.assert_allclose(features, stored[:3], rtol=1e-3, atol=1e-3)  # the same images, same vectors
    assert "features" not in predictions[0].to_dict()
    assert predictor.predict([str(ood_run / "checkpoint.json")])[0].features is None  # unreadable: none


def test_no_alarm_on_the_runs_own_style_alarm_on_another_scanner(ood_run: Path, groups: dict[str, Path]):
    same = shift_report(ood_run, groups["default"], precision="fp32").result
    other = shift_report(ood_run, groups["scanner-b"], precision="fp32").result
    assert not same.alarm and same.p_value >= same.level, same
    assert other.alarm and other.auc > 0.9 and other.p_value < 0.01, other


def test_cli_prints_the_figures_and_writes_json_csv_png(ood_run: Path, groups: dict[str, Path], tmp_path):
    out = tmp_path / "report"
    done = covidscan("shift", str(ood_run), "--data", str(groups["scanner-b"]), "--out", str(out),
                     "--precision", "fp32")
    assert done.returncode == 0, done.stderr
    assert "effect size: ROC AUC" in done.stdout and "95% CI" in done.stdout and "p-value" in done.stdout
    assert "not yet validated here" in done.stdout
    summary = json.loads((out / "shift.json").read_text())
    assert summary["alarm"] is True and summary["n_sample"] == 40
    assert summary["reference"] == "validation split" and summary["verdict"] == VERDICT_ALARM
    table = pd.read_csv(out / "shift.csv")
    assert list(table.columns[:2]) == ["path", "shift_score"] and len(table) == 40
    assert table["shift_score"].notna().all()
    assert (out / "shift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Outputs never replace inputs: the run directory is refused as --out.
    refused = covidscan("shift", str(ood_run), "--data", str(groups["scanner-b"]), "--out", str(ood_run))
    assert refused.returncode == 2 and "error:" in refused.stderr and "outside the inputs" in refused.stderr


def test_cli_refuses_too_few_and_other_modality_images(ood_run: Path, groups: dict[str, Path], tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted(groups["default"].rglob("*.png"))[:12]:
        shutil.copy(png, few / png.name)
    (few / "broken.png").write_bytes(b"not a png")
    done = covidscan("shift", str(ood_run), "--data", str(few))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "12 of 13 images can be used" in done.stderr and f"at least {MIN_IMAGES}" in done.stderr
    assert "broken.png" in done.stderr  # the first reason names the file
    xray = write_phantom_dataset(tmp_path / "xray", n=32, modality="cxr", seed=2, slices_per_patient=1)
    other = covidscan("shift", str(ood_run), "--data", str(xray))
    assert other.returncode == 2 and "of 32 images can be used" in other.stderr  # the gate refuses most


def _without_reference(run: Path, dest: Path) -> Path:
    """A copy of ``run`` as an older covidscan wrote it: no shift reference file, no checkpoint key."""
    shutil.copytree(run, dest)
    (dest / SHIFT_FILE).unlink()
    write_checkpoint(dest, load_checkpoint(dest).model_copy(update={"shift_reference": None, "seal": None}))
    return dest


def test_an_older_run_computes_its_reference_from_its_validation_images(ood_run: Path, tmp_path: Path,
                                                                        groups: dict[str, Path]):
    old = _without_reference(ood_run, tmp_path / "old")
    predictor = Predictor.from_run(old, precision="fp32")  # the seal and weights checks still pass
    computed, source = run_reference(predictor)
    stored = load_shift_reference(ood_run, load_checkpoint(ood_run))
    assert source == COMPUTED and stored is not None
    np.testing.assert_allclose(computed, stored, rtol=1e-3, atol=1e-3)
    assert shift_report(old, groups["scanner-b"], precision="fp32").result.alarm
    # Its validation images gone: a clear error saying so, not a silent answer.
    splits = read_csv(old / "splits.csv")
    splits["path"] = [str(tmp_path / "moved" / Path(p).name) for p in splits["path"]]
    splits.to_csv(old / "splits.csv", index=False)
    with pytest.raises(ResourceNotFoundError, match=r"no shift reference .* not where splits\.csv"):
        run_reference(Predictor.from_run(old, precision="fp32"))
