"""Splits: patient-grouped and stratified, deterministic, ratios, existing splits, bad inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidscan.data import check_trainable, label_problems, read_manifest, split_manifest
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
    # the hint names an option of each command that prints it
    assert "`data split --by patient`" in out.attrs["leakage_warning"]
    assert "`--set data.split_by=patient`" in out.attrs["leakage_warning"]
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
    partial = df.assign(patient_id=df["patient_id"].where(df.index % 5 != 0, None))
    for manifest, what in ((df.drop(columns="patient_id"), "no patient ids"),
                           (partial, "rows have no patient_id")):
        with pytest.raises(ManifestError, match=what) as err:
            split_manifest(manifest)
        for option in ("data scan --patient-from dicom", "--patient-from folder", "--patient-from 'regex:",
                       "`data split --by image`", "`--set data.split_by=image`"):
            assert option in str(err.value), option
    fewer = r"only 2 patients.*--ratios 0\.8,0\.2.*data\.ratios=\[0\.8,0\.2\]"
    with pytest.raises(ManifestError, match=fewer):
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


def test_one_class_dataset_reported_by_split_and_refused_by_check_trainable() -> None:
    df = _manifest()
    covid_only = df[df["label"] == "covid"].reset_index(drop=True)
    with pytest.warns(UserWarning, match=r"one-class dataset \(covid \d+ images\): no non_covid images"):
        out = split_manifest(covid_only, seed=0)
    assert len(out.attrs["label_problems"]) == 1 and out["split"].notna().all()
    with pytest.raises(ManifestError, match="cannot train on this dataset: one-class dataset"):
        check_trainable(out)


def test_patients_with_both_labels_reported_and_refused() -> None:
    df = _manifest()
    flip = {"covid": "non_covid", "non_covid": "covid"}
    extra = df.groupby("patient_id").head(1).set_index("patient_id").loc[["p0", "p1"]].reset_index()
    extra = extra.assign(label=extra["label"].map(flip), path=extra["path"] + ".other.png")
    mixed = pd.concat([df, extra], ignore_index=True)
    problems = label_problems(mixed)
    assert len(problems) == 1 and problems[0].startswith("2 patients carry both labels: p0 (covid ")
    assert "--patient-from folder" in problems[0]
    with pytest.warns(UserWarning, match="2 patients carry both labels"):
        out = split_manifest(mixed, seed=0)
    with pytest.raises(ManifestError, match="2 patients carry both labels"):
        check_trainable(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = split_manifest(df, seed=0)
    assert clean.attrs["label_problems"] == [] and check_trainable(clean) is None


def test_check_trainable_refuses_a_split_without_both_classes() -> None:
    df = split_manifest(_manifest(), seed=0)
    df.loc[(df["split"] == "val") & (df["label"] == "covid"), "split"] = "train"
    with pytest.raises(ManifestError, match=r"split val has no covid images.*data split --resplit"):
        check_trainable(df)
