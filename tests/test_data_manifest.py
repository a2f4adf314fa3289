"""Manifests: label aliases, path resolution, column aliases, bad inputs, folder scans, real sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidscan.data import normalize_label, read_manifest, scan_dataset, write_manifest, write_quality
from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError, ManifestError
from dicom_files import write_dicom


def _png(path: Path, seed: int = 0, size: int = 128) -> Path:
    """A CT phantom slice (128x128 by default): passes the quality gate, content check included, silently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = make_phantom(seed, modality="ct", covid=False, size=size).image
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
    return path


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("covid", "covid"),
        ("COVID-19", "covid"),
        ("Covid19", "covid"),
        ("positive", "covid"),
        ("pCT", "covid"),
        ("normal", "non_covid"),
        (" Non-COVID ", "non_covid"),
        ("noncovid", "non_covid"),
        ("negative", "non_covid"),
        ("nCT", "non_covid"),
        ("NiCT", None),
    ],
)
def test_normalize_label_aliases(raw: str, expected: str | None) -> None:
    assert normalize_label(raw) == expected


def test_normalize_label_unknown() -> None:
    with pytest.raises(ManifestError, match=r"unknown label 'covd'.*accepted labels.*non_covid"):
        normalize_label("covd")


def test_unknown_label_error_names_typo_and_counts(tmp_path: Path) -> None:
    for name in "abcd":
        _png(tmp_path / f"{name}.png")
    manifest = _csv(tmp_path / "m.csv", "path,label\na.png,Covid\nb.png,covd\nc.png,covd\nd.png,normal\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    text = str(err.value)
    assert str(manifest) in text
    assert "'covd' (2 rows)" in text
    assert "'Covid'" in text and "'normal'" in text  # every distinct label found is listed
    assert "'Covid' (" not in text  # ... but only the typo is called unknown
    assert "Accepted labels" in text and "pct" in text


def test_relative_paths_resolve_against_manifest_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _png(tmp_path / "images" / "covid" / "a.png")
    b = _png(tmp_path / "images" / "normal" / "b.png")
    manifest = _csv(
        tmp_path / "lists" / "m.csv",
        "relpath,label,age\n../images/covid/a.png,COVID-19,61\n" f"{b},Normal,70\n",
    )
    monkeypatch.chdir(tmp_path / "images")  # the working folder must not matter
    df = read_manifest(manifest)
    assert df["path"].tolist() == [str(a), str(b)]
    assert df["label"].tolist() == ["covid", "non_covid"]
    assert df["age"].tolist() == ["61", "70"]  # extra columns are kept
    assert df["relpath"].iloc[0] == "../images/covid/a.png"
    assert list(df.columns[:2]) == ["path", "label"]
    assert df.attrs["excluded"] == 0


def test_patient_group_split_aliases_and_overrides(tmp_path: Path) -> None:
    for name in "abc":
        _png(tmp_path / f"{name}.png")
    manifest = _csv(
        tmp_path / "m.csv",
        "filename,label,patient_id,patient_group,official_split\n"
        "a.png,covid,p1,p1+p2,Train\nb.png,covid,p2,p1+p2,Validation\nc.png,normal,p3,p3,\n",
    )
    df = read_manifest(manifest)
    assert df["patient_id"].tolist() == ["p1+p2", "p1+p2", "p3"]
    assert df["patient_id_original"].tolist() == ["p1", "p2", "p3"]
    assert df["split"].tolist()[:2] == ["train", "val"] and pd.isna(df["split"].iloc[2])
    assert df.attrs["patient_column"] == "patient_group" and df.attrs["split_column"] == "official_split"

    explicit = read_manifest(manifest, patient_column="patient_id")
    assert explicit["patient_id"].tolist() == ["p1", "p2", "p3"]
    with pytest.raises(ManifestError, match="patient column 'subject' not found"):
        read_manifest(manifest, patient_column="subject")


def test_unknown_split_value(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    manifest = _csv(tmp_path / "m.csv", "path,label,split\na.png,covid,holdout\n")
    with pytest.raises(ManifestError, match=r"unknown split value\(s\) 'holdout' \(1 rows\)"):
        read_manifest(manifest)


def test_missing_files_are_counted_and_named(tmp_path: Path) -> None:
    _png(tmp_path / "there.png")
    rows = "".join(f"gone{i}.png,covid\n" for i in range(7))
    manifest = _csv(tmp_path / "m.csv", "path,label\nthere.png,normal\n" + rows)
    with pytest.raises(ManifestError, match=r"7 of 8 listed files do not exist") as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value) and "gone0.png" in str(err.value)
    assert "gone6.png" not in str(err.value)  # only the first few are listed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("path,label\n", "header but no rows"),
        ("image,diagnosis\na.png,covid\n", "no a path column"),
        ("path,label\na.png,covid\na.png,covid\n", "listed more than once"),
        ("path,label\n,covid\n", "empty path"),
    ],
)
def test_bad_manifests(tmp_path: Path, text: str, message: str) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(ManifestError, match=message):
        read_manifest(_csv(tmp_path / "m.csv", text))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")


def test_nict_is_left_out_and_counted(tmp_path: Path) -> None:
    for name in "abc":
        _png(tmp_path / f"{name}.png")
    manifest = _csv(tmp_path / "m.csv", "path,label\na.png,pCT\nb.png,NiCT\nc.png,nCT\n")
    df = read_manifest(manifest)
    assert df["label"].tolist() == ["covid", "non_covid"]
    assert df.attrs["excluded"] == 1
    kept = read_manifest(manifest, include_excluded=True)
    assert kept["label"].tolist() == ["covid", "excluded", "non_covid"]
    assert kept.attrs["excluded"] == 1


def test_scan_dataset_class_folders(tmp_path: Path) -> None:
    covid = [_png(tmp_path / "COVID" / f"c{i}.png") for i in range(3)]
    normal = [_png(tmp_path / "normal" / "sub" / f"n{i}.png") for i in range(2)]
    _png(tmp_path / "NiCT" / "x.png")
    loose = _png(tmp_path / "stray.png")
    mask = _png(tmp_path / "masks" / "m.png")
    broken = tmp_path / "COVID" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.warns(UserWarning) as caught:
        df = scan_dataset(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "2 images are not in a class subfolder" in messages and "masks/" in messages
    assert "1 unreadable" in messages
    assert sorted(df["path"]) == sorted(str(p) for p in covid + normal)
    assert df.set_index("path")["label"][str(covid[0])] == "covid"
    assert df.set_index("path")["label"][str(normal[0])] == "non_covid"
    assert df["patient_id"].isna().all()
    assert df.attrs["excluded"] == 1
    assert [u["path"] for u in df.attrs["unreadable"]] == [str(broken)]
    assert sorted(df.attrs["ignored"]) == sorted([str(loose), str(mask)])
    # read_manifest on a folder scans it, and points at a CSV lying there
    _csv(tmp_path / "labels.csv", "path,label\n")
    with pytest.warns(UserWarning) as caught:
        assert len(read_manifest(tmp_path)) == 5
    assert "holds labels.csv: scanning its class folders ignores" in str(caught[0].message)


def test_scan_empty_or_flat_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no class subfolders"):
        scan_dataset(tmp_path)
    _png(tmp_path / "a.png")
    with pytest.raises(ManifestError, match=r"1 images directly in it.*covid/ and non_covid/"):
        scan_dataset(tmp_path)
    (tmp_path / "covid").mkdir()
    with pytest.raises(ManifestError, match="hold no readable images"), pytest.warns(UserWarning):
        scan_dataset(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_scan_patient_from_folder_layout(tmp_path: Path) -> None:
    for label in ("covid", "normal"):
        for patient in ("A1", "B2"):
            for i in range(2):
                _png(tmp_path / label / f"{label}-{patient}" / "series1" / f"{i}.png", seed=i)
    df = scan_dataset(tmp_path, patient_from="folder")
    assert df.groupby("patient_id")["path"].count().to_dict() == {
        "covid-A1": 2, "covid-B2": 2, "normal-A1": 2, "normal-B2": 2}
    assert df.attrs["patient_from"] == "folder"
    _png(tmp_path / "covid" / "loose.png")
    with pytest.raises(ManifestError, match=r"no patient id for 1 of 9 images.*directly in its class folder"):
        scan_dataset(tmp_path, patient_from="folder")


def test_scan_patient_from_regex(tmp_path: Path) -> None:
    for name in ("P001_s1.png", "P001_s2.png", "P002_s1.png"):
        _png(tmp_path / "covid" / name)
    _png(tmp_path / "non_covid" / "P003_s1.png")
    df = scan_dataset(tmp_path, patient_from=r"regex:^(?P<patient>P\d+)_")
    assert dict(zip([Path(p).name for p in df["path"]], df["patient_id"], strict=True)) == {
        "P001_s1.png": "P001", "P001_s2.png": "P001", "P002_s1.png": "P002", "P003_s1.png": "P003"}
    with pytest.raises(ManifestError, match=r"no patient id for 4 of 4 images.*does not match"):
        scan_dataset(tmp_path, patient_from=r"regex:^(?P<patient>X\d+)_")
    with pytest.raises(ConfigError, match=r"named group \(\?P<patient>"):
        scan_dataset(tmp_path, patient_from=r"regex:^(P\d+)_")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        scan_dataset(tmp_path, patient_from="regex:(?P<patient>")
    with pytest.raises(ConfigError, match=r"use dicom .* folder .* regex:PATTERN"):
        scan_dataset(tmp_path, patient_from="filename")


def test_scan_patient_from_dicom(tmp_path: Path) -> None:
    stored = (np.random.default_rng(0).integers(0, 1500, (128, 128)) - 1350).astype(np.int16)
    for i, patient in enumerate(["anon-7", "anon-7", "anon-9"]):
        (tmp_path / "covid").mkdir(exist_ok=True)
        write_dicom(tmp_path / "covid" / f"IM{i}", stored, PatientID=patient, BodyPartExamined="CHEST")
    _png(tmp_path / "normal" / "n.png")
    no_id = r"no patient id for 1 of 4 images, each no DICOM PatientID.*n\.png"
    with pytest.raises(ManifestError, match=no_id):
        scan_dataset(tmp_path, patient_from="dicom")
    (tmp_path / "normal" / "n.png").unlink()
    write_dicom(tmp_path / "normal" / "n.dcm", stored, PatientID="anon-1")
    df = scan_dataset(tmp_path, patient_from="dicom", modality="ct")
    assert sorted(df["patient_id"]) == ["anon-1", "anon-7", "anon-7", "anon-9"]


def test_scan_gate_leaves_refused_out_and_lists_everything(tmp_path: Path) -> None:
    good = _png(tmp_path / "covid" / "good.png")
    small = _png(tmp_path / "covid" / "small.png", seed=1, size=64)
    black = tmp_path / "normal" / "black.png"
    black.parent.mkdir()
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(black)
    kept = _png(tmp_path / "normal" / "kept.png")
    broken = tmp_path / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.warns(UserWarning) as caught:
        df = scan_dataset(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 refused images left out (first: " in messages and "constant: every pixel is 0.00" in messages
    assert "1 unreadable images left out" in messages
    assert sorted(df["path"]) == sorted(str(p) for p in (good, small, kept))  # doubtful stays in
    quality = {Path(q["path"]).name: (q["status"], q["label"], q["reasons"][:5]) for q in df.attrs["quality"]}
    assert quality == {"small.png": ("doubtful", "covid", "tiny:"),
                       "black.png": ("refused", "non_covid", "const"),
                       "broken.png": ("unreadable", "non_covid", "corru")}
    listed = pd.read_csv(write_quality(df.attrs["quality"], tmp_path / "m.quality.csv"))
    assert listed.columns.tolist() == ["path", "label", "status", "reasons"]
    assert listed["status"].tolist() == ["unreadable", "refused", "doubtful"]  # worst first
    assert listed["path"].tolist() == ["normal/broken.png", "normal/black.png", "covid/small.png"]


def test_write_manifest_round_trip(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "a.png")
    _png(tmp_path / "data" / "b.png")
    text = "path,label,patient_id,note\na.png,covid,p1,x\nb.png,normal,p2,y\n"
    source = _csv(tmp_path / "data" / "m.csv", text)
    df = read_manifest(source)
    inside = write_manifest(df, tmp_path / "data" / "manifest.csv")
    assert pd.read_csv(inside)["path"].tolist() == ["a.png", "b.png"]  # relative: the folder can move
    outside = write_manifest(df, tmp_path / "lists" / "manifest.csv")
    assert pd.read_csv(outside)["path"].tolist() == df["path"].tolist()  # elsewhere: absolute
    for out in (inside, outside):
        back = read_manifest(out)
        columns = ["path", "label", "patient_id", "note"]
        assert back[columns].equals(df[columns])
    with pytest.raises(ManifestError, match="no label column"):
        write_manifest(df.drop(columns="label"), tmp_path / "x.csv")


@pytest.mark.shared
def test_real_ucsd_ct_manifest(shared_dir: Path) -> None:
    df = read_manifest(shared_dir / "data" / "ucsd-ct" / "labels.csv")
    assert len(df) == 746
    assert df["label"].value_counts().to_dict() == {"non_covid": 397, "covid": 349}
    assert df["split"].value_counts().to_dict() == {"train": 425, "test": 203, "val": 118}
    assert df.groupby("label")["patient_id"].nunique().to_dict() == {"covid": 213, "non_covid": 171}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])


@pytest.mark.shared
def test_real_cxr_dev_uses_patient_group(shared_dir: Path) -> None:
    df = read_manifest(shared_dir / "data" / "cxr-dev" / "metadata.csv")
    assert df["label"].value_counts().to_dict() == {"non_covid": 500, "covid": 323}
    assert df.attrs["patient_column"] == "patient_group"
    merged = df[df["patient_id_original"].isin(["ieee8023-97", "ieee8023-178"])]
    assert set(merged["patient_id"]) == {"ieee8023-97+178"}
    assert "split" not in df.columns
