"""Splits: patient-grouped and stratified, deterministic, ratios, existing splits, bad inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidscan.data import read_manifest, split_manifest
from covidscan.errors import ConfigError, ManifestError


def _manifest(n_patients: int = 150, seed: int = 0) -> pd.DataFrame:
    """A file-less manifest: 1-6 images per patient, about 40 % covid patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "covid" if rng.random() < 0.4 else "non_covid"
        n_images = rng.integers(1, 7)
        rows += [{"path": f"/x/p{p}_{i}.png", "label": label, "patient_id": f"p{p}"} for i in range(n_images)]
    return pd.DataFrame(rows)


def _fractions(series: pd.Series) -> dict[str, float]:
    return (series.value_counts() / len(series)).to_dict()


def test_patient_split_is_grouped_stratified_and_close_to_ratios() -> None:
    df = _manifest()
    out = split_manifest(df, seed=3)
    assert set(out["split"]) == {"train", "val", "test"}
    assert out.groupby("patient_id")["split"].nunique().max() == 1  # no patient in two splits
    fractions = _fractions(out["split"])
    for name, target in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(fractions[name] - target) < 0.05, fractions
    covid_share = (out["label"] == "covid").mean()
    for _, part in out.groupby("split"):
        assert set(part["label"]) == {"covid", "non_covid"}
        assert abs((part["label"] == "covid").mean() - covid_share) < 0.08
    assert out.attrs["split_by"] == "patient" and out.attrs["leakage_warning"] is None
    assert "split" not in df.columns  # the input is not modified


def test_split_is_deterministic_under_a_seed() -> None:
    df = _manifest()
    first, again = split_manifest(df, seed=7), split_manifest(df, seed=7)
    assert first["split"].tolist() == again["split"].tolist()
    assert first["split"].tolist() != split_manifest(df, seed=8)["split"].tolist()


def test_two_ratios_give_train_and_test() -> None:
    out = split_manifest(_manifest(), ratios=(0.8, 0.2))
    fractions = _fractions(out["split"])
    assert set(fractions) == {"train", "test"}
    assert abs(fractions["test"] - 0.2) < 0.05


def test_keep_existing_split_and_patients_follow() -> None:
    df = _manifest()
    df["split"] = None
    fixed = df["patient_id"].isin(["p0", "p1", "p2"])
    df.loc[fixed, "split"] = "Test"
    first_of_p3 = df.index[df["patient_id"] == "p3"][0]
    df.loc[first_of_p3, "split"] = "valid"
    out = split_manifest(df, seed=0)
    assert (out.loc[fixed, "split"] == "test").all()
    assert (out.loc[df["patient_id"] == "p3", "split"] == "val").all()  # the rest of p3 follows its image
    assert out["split"].notna().all()
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    redone = split_manifest(df, seed=0, keep_existing=False)
    assert redone["split"].tolist() == split_manifest(df.drop(columns="split"), seed=0)["split"].tolist()


def test_image_split_warns_when_patients_exist() -> None:
    df = _manifest()
    with pytest.warns(UserWarning, match="images of one patient can land in both train and test"):
        out = split_manifest(df, by="image", seed=0)
    assert "by='patient'" in out.attrs["leakage_warning"]
    assert abs(_fractions(out["split"])["train"] - 0.7) < 0.03
    no_ids = df.drop(columns="patient_id")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = split_manifest(no_ids, by="image", seed=0)
    assert quiet.attrs["leakage_warning"] is None
    assert quiet.groupby("split")["label"].apply(lambda s: (s == "covid").mean()).between(0.3, 0.5).all()


@pytest.mark.parametrize(
    "ratios", [(0.5, 0.6), (1.0,), (0.7, -0.1, 0.4), (0.7, 0.1, 0.1), ("a", "b"), (0.5, 0.2, 0.2, 0.1)]
)
def test_bad_ratios(ratios: tuple) -> None:
    with pytest.raises(ConfigError, match="ratios"):
        split_manifest(_manifest(), ratios=ratios)


def test_bad_inputs() -> None:
    df = _manifest()
    with pytest.raises(ConfigError, match="split by 'series'"):
        split_manifest(df, by="series")
    with pytest.raises(ManifestError, match=r"no patient ids.*--by image"):
        split_manifest(df.drop(columns="patient_id"))
    partial = df.assign(patient_id=df["patient_id"].where(df.index % 5 != 0, None))
    with pytest.raises(ManifestError, match=r"rows have no patient_id"):
        split_manifest(partial)
    with pytest.raises(ManifestError, match="only 2 patients"):
        split_manifest(df[df["patient_id"].isin(["p0", "p1"])])
    with pytest.raises(ManifestError, match="no `label` column"):
        split_manifest(df.drop(columns="label"))


@pytest.mark.shared
def test_real_cxr_dev_patient_split(shared_dir: Path) -> None:
    df = read_manifest(shared_dir / "data" / "cxr-dev" / "metadata.csv")
    out = split_manifest(df, seed=0)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    # the two ieee8023 patients that share duplicated images are grouped, so they land together
    assert out.loc[out["patient_id_original"].isin(["ieee8023-97", "ieee8023-178"]), "split"].nunique() == 1
    assert abs(_fractions(out["split"])["train"] - 0.7) < 0.05


@pytest.mark.shared
def test_real_ucsd_official_split_is_kept(shared_dir: Path) -> None:
    df = read_manifest(shared_dir / "data" / "ucsd-ct" / "labels.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to assign, nothing to warn about
        out = split_manifest(df, seed=0)
    assert out["split"].tolist() == df["split"].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_small_patient_split_gives_every_part_both_classes(seed: int) -> None:
    # 12 patients, 6 per class, 4 slices each: the demo's smallest useful size. Calibration on validation
    # and metrics on test need both classes in every part.
    rows = [
        {"path": f"/x/p{p}_{i}.png", "label": "covid" if p % 2 else "non_covid", "patient_id": f"p{p}"}
        for p in range(12)
        for i in range(4)
    ]
    out = split_manifest(pd.DataFrame(rows), seed=seed)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    assert (out.groupby("split")["label"].nunique() == 2).all(), out.groupby("split")["label"].value_counts()
