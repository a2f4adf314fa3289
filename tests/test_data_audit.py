"""Audit: planted duplicates, patient leakage, format shortcuts, the bit-matrix pair search, real data."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidscan.data import audit_manifest, format_audit, hamming_pairs, read_manifest
from covidscan.data.synthetic import make_phantom
from covidscan.errors import ManifestError


def _smooth(seed: int, size: int = 64) -> np.ndarray:
    """A random smooth uint8 image: distinct seeds give dhashes far apart, noise barely moves them."""
    coarse = np.random.default_rng(seed).normal(size=(6, 6)).astype(np.float32)
    fine = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return cv2.normalize(fine, None, 20, 235, cv2.NORM_MINMAX).astype(np.uint8)


def _ct(seed: int, size: int) -> np.ndarray:
    """A CT phantom slice as uint8."""
    pixels = make_phantom(seed, modality="ct", covid=bool(seed % 2), size=size).image
    return np.rint(pixels * 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path) -> str:
    Image.fromarray(pixels).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, dict]:
    """All covid are PNG and all non_covid JPEG; one exact, one near duplicate and one leaking patient."""
    root = tmp_path_factory.mktemp("audit")
    rows = []
    splits = ["train", "train", "train", "val", "test", "test"]
    for i, split in enumerate(splits):
        rows.append((_save(_smooth(i), root / f"c{i}.png"), "covid", f"pc{i}", split))
        rows.append((_save(_smooth(100 + i), root / f"n{i}.jpg"), "non_covid", f"pn{i}", split))
    # an exact copy of c0 (train) in test
    rows.append((_save(_smooth(0), root / "c0_copy.png"), "covid", "pc_other", "test"))
    noisy = _smooth(1).astype(np.float32) + np.random.default_rng(9).normal(0, 2, (64, 64))
    near = _save(np.clip(noisy, 0, 255).astype(np.uint8), root / "n_near.jpg")
    rows.append((near, "non_covid", "pn_near", "test"))  # near copy of c1 (train) with the other label
    rows.append((_save(_smooth(50), root / "c2_later.png"), "covid", "pc2", "test"))  # pc2 is also in train
    df = pd.DataFrame(rows, columns=["path", "label", "patient_id", "split"])
    return df, audit_manifest(df)


def test_planted_exact_duplicate_across_splits(planted: tuple[pd.DataFrame, dict]) -> None:
    df, report = planted
    exact = report["exact_duplicates"]
    assert (exact["n_pairs"], exact["n_cross_split"], exact["n_cross_label"]) == (1, 1, 0)
    pair = exact["pairs"][0]
    assert {pair["a"], pair["b"]} == {df["path"][0], df["path"][12]}
    assert pair["kind"] == "cross_split" and pair["distance"] == 0 and not pair["same_patient"]


def test_planted_near_duplicate_across_labels(planted: tuple[pd.DataFrame, dict]) -> None:
    df, report = planted
    near = report["near_duplicates"]
    assert near["n_pairs"] == 1  # the exact pair is not repeated here, distinct images are far apart
    pair = near["pairs"][0]
    assert {pair["a"], pair["b"]} == {df["path"][2], df["path"][13]}
    assert pair["kind"] == "cross_label" and pair["cross_split"]
    assert 0 < pair["distance"] <= report["near_threshold"]
    assert {pair["label_a"], pair["label_b"]} == {"covid", "non_covid"}


def test_patient_in_two_splits(planted: tuple[pd.DataFrame, dict]) -> None:
    _, report = planted
    assert report["patients"]["n_across_splits"] == 1
    assert report["patients"]["patients"] == [{"patient_id": "pc2", "splits": {"test": 1, "train": 1}}]


def test_format_shortcut_and_balance(planted: tuple[pd.DataFrame, dict]) -> None:
    _, report = planted
    shortcuts = report["shortcuts"]
    assert shortcuts["features"]["format"]["by_label"] == {"covid": {"PNG": 1.0}, "non_covid": {"JPEG": 1.0}}
    assert shortcuts["features"]["format"]["tvd"] == 1.0
    assert "format" in shortcuts["flagged"] and "pixel_count" not in shortcuts["flagged"]
    assert shortcuts["size_by_label"]["covid"]["height"] == {"min": 64, "median": 64.0, "max": 64}
    assert report["class_balance"]["test"]["images"] == {"covid": 4, "non_covid": 3}
    assert report["class_balance"]["all"]["patients"] == {"covid": 7, "non_covid": 7}
    assert any("format differs between classes" in w for w in report["warnings"])
    assert any("1 near-duplicate pairs have different labels" in w for w in report["warnings"])
    assert json.loads(json.dumps(report)) == report  # JSON-able as it is


def test_format_audit_text(planted: tuple[pd.DataFrame, dict]) -> None:
    _, report = planted
    text = format_audit(report)
    assert "Patients: 14, in more than one split: 1 (pc2)" in text
    assert "Exact duplicates: 1 pairs (1 across splits, 0 across labels)" in text
    assert "cross_label" in text and "c1.png [train] ~ n_near.jpg [test]" in text
    assert "FLAG format" in text and "covid: PNG 100%" in text


def test_unreadable_and_original_format(tmp_path: Path) -> None:
    good = [_save(_smooth(i), tmp_path / f"{i}.png") for i in range(4)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    df = pd.DataFrame(
        {
            "path": [*good, str(broken)],
            "label": ["covid", "covid", "non_covid", "non_covid", "covid"],
            "original_relpath": ["a.png", "b.PNG", "c.jpeg", "d.jpg", "e.png"],
        }
    )
    report = audit_manifest(df, near_threshold=0)
    assert report["n_decoded"] == 4 and [u["path"] for u in report["unreadable"]] == [str(broken)]
    original = report["shortcuts"]["features"]["original_format"]
    assert original["by_label"] == {"covid": {"png": 1.0}, "non_covid": {"jpg": 1.0}} and original["flagged"]
    assert report["patients"] is None  # no patient ids, no splits: nothing to check, said so
    assert "cannot check patient leakage" in format_audit(report)
    assert "1 images could not be read" in report["warnings"]


def test_audit_bad_inputs(planted: tuple[pd.DataFrame, dict]) -> None:
    df, _ = planted
    with pytest.raises(ManifestError, match="no label column"):
        audit_manifest(df.drop(columns="label"))
    with pytest.raises(ManifestError, match="empty manifest"):
        audit_manifest(df.iloc[:0])
    with pytest.raises(ManifestError, match="near_threshold=300"):
        audit_manifest(df, near_threshold=300)


def test_hamming_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    bits = rng.random((600, 256)) < 0.5  # 600 rows: the search runs in several blocks
    for i, j, flips in ((3, 400, 0), (10, 11, 5), (599, 20, 12), (7, 8, 13)):
        bits[j] = bits[i]
        bits[j, rng.choice(256, flips, replace=False)] ^= True
    ones = bits.astype(np.int32)
    dist = ones @ (1 - ones).T + (1 - ones) @ ones.T  # brute-force Hamming distances by matrix product
    expected = sorted((i, j, int(dist[i, j])) for i, j in zip(*np.nonzero(dist <= 12), strict=True) if i < j)
    assert sorted(hamming_pairs(bits, 12)) == expected == [(3, 400, 0), (10, 11, 5), (20, 599, 12)]
    assert hamming_pairs(bits[:0], 10) == []


@pytest.fixture(scope="module")
def ucsd_report(shared_dir: Path) -> dict:
    return audit_manifest(read_manifest(shared_dir / "data" / "ucsd-ct" / "labels.csv"))


@pytest.mark.shared
def test_real_ucsd_ct_label_conflict_is_found(ucsd_report: dict) -> None:
    near = ucsd_report["near_duplicates"]
    conflict = [p for p in near["pairs"] if p["a"].endswith("kjr-21-e24-p5-29.png")]
    assert len(conflict) == 1
    pair = conflict[0]
    assert Path(pair["b"]).parts[-2:] == ("non_covid", "71%0.png")
    assert pair["kind"] == "cross_label" and pair["cross_split"]
    assert (pair["split_a"], pair["split_b"]) == ("test", "train")  # the official split is used
    assert ucsd_report["patients"]["n_across_splits"] == 0  # the official split is patient-disjoint
    assert "original_format" in ucsd_report["shortcuts"]["flagged"]  # non_covid were half JPEG originally


def test_audit_quality_section_and_label_problems(tmp_path: Path) -> None:
    from badinputs import bomb_png

    good = [_save(_ct(i, 160), tmp_path / f"g{i}.png") for i in (1, 2, 3)]  # the gate judges content: CT
    black = _save(np.zeros((160, 160), np.uint8), tmp_path / "black.png")
    small = _save(_ct(7, 64), tmp_path / "small.png")  # 64 px: doubtful, kept
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    df = pd.DataFrame({
        "path": [*good, black, small, str(bomb)],
        "label": ["covid", "non_covid", "covid", "covid", "non_covid", "covid"],
        "patient_id": ["p1", "p1", "p2", "p3", "p4", "p5"],  # p1 carries both labels
    })
    with pytest.warns(Image.DecompressionBombWarning):
        report = audit_manifest(df, modality="ct")
    quality = report["quality"]
    assert (quality["modality"], quality["n_refused"], quality["n_doubtful"]) == ("ct", 2, 1)
    refused = {Path(q["path"]).name: q["reasons"][0].split(":")[0] for q in quality["refused"]}
    assert refused == {"black.png": "constant", "bomb.png": "too_large"}
    assert [Path(q["path"]).name for q in quality["doubtful"]] == ["small.png"]
    assert report["n_decoded"] == 5 and report["unreadable"] == []  # the bomb is refused, never decoded
    assert report["labels"]["mixed_label_patients"] == [
        {"patient_id": "p1", "labels": {"covid": 1, "non_covid": 1}}]
    assert report["warnings"][0].startswith("1 patients carry both labels: p1 (covid 1, non_covid 1)")
    assert any(w.startswith("2 images are refused by the quality gate") for w in report["warnings"])
    text = format_audit(report)
    assert "Quality gate (modality ct): 2 refused, 1 doubtful" in text
    assert "refused  black.png: constant: every pixel is 0.00 (all black)" in text
    json.dumps(report)  # stays JSON-able
    one_class = audit_manifest(df.iloc[[0, 2]].assign(patient_id=["a", "b"]))
    assert one_class["labels"]["problems"][0].startswith("one-class dataset (covid 2 images)")
    assert one_class["warnings"][0] == one_class["labels"]["problems"][0]
