"""Synthetic phantoms: shapes, masks, anatomy, determinism, dataset layout and bad arguments."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covidscan.data.synthetic import MANIFEST_COLUMNS, Phantom, make_phantom, write_phantom_dataset
from covidscan.errors import ConfigError

SIZE = 96  # small and fast; the drawing is relative to the size, so the anatomy is the same


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("modality", ["ct", "cxr"])
@pytest.mark.parametrize("covid", [False, True])
def test_phantom_types_ranges_and_masks(modality: str, covid: bool) -> None:
    for seed in range(4):
        p = make_phantom(seed, modality=modality, covid=covid, size=SIZE)
        assert isinstance(p, Phantom)
        assert p.image.shape == p.lung_mask.shape == p.lesion_mask.shape == (SIZE, SIZE)
        assert p.image.dtype == np.float32
        assert p.lung_mask.dtype == bool and p.lesion_mask.dtype == bool
        assert p.image.min() >= 0.0 and p.image.max() <= 1.0
        assert p.image.std() > 0.1  # real contrast, not a flat picture
        assert p.label == ("covid" if covid else "non_covid") and p.modality == modality
        # two lungs covering a plausible part of the image
        assert 0.08 < p.lung_mask.mean() < 0.5
        n_lungs, _ = cv2.connectedComponents(p.lung_mask.astype(np.uint8))
        assert n_lungs - 1 == 2
        assert not (p.lesion_mask & ~p.lung_mask).any()
        assert p.lesion_mask.any() == covid


def test_ct_intensities_mimic_a_lung_window() -> None:
    p = make_phantom(3, modality="ct", covid=False, size=128)
    body = cv2.erode((p.image > 0).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    lung_core = cv2.erode(p.lung_mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    tissue = body & ~cv2.dilate(p.lung_mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert p.image[0:5, :].max() == 0.0  # air outside the body is black
    assert np.median(p.image[lung_core]) < 0.3
    assert np.median(p.image[tissue]) > 0.45
    assert p.image[lung_core].mean() + 0.3 < p.image[tissue].mean()
    assert p.image.max() > 0.8  # bone (spine, ribs)


def test_cxr_lungs_darker_than_mediastinum() -> None:
    p = make_phantom(5, modality="cxr", covid=False, size=128)
    centre = np.zeros_like(p.lung_mask)
    centre[20:90, 60:68] = True
    assert not (centre & p.lung_mask).any()
    assert p.image[p.lung_mask].mean() + 0.15 < p.image[centre].mean()


@pytest.mark.parametrize("modality", ["ct", "cxr"])
def test_lesions_brighten_the_lung_where_the_mask_says(modality: str) -> None:
    healthy = make_phantom(11, modality=modality, covid=False, size=128)
    sick = make_phantom(11, modality=modality, covid=True, size=128)
    np.testing.assert_array_equal(healthy.lung_mask, sick.lung_mask)  # same slice, lesions added
    diff = sick.image - healthy.image
    assert diff[sick.lesion_mask].mean() > 0.1
    assert abs(diff[~sick.lung_mask].mean()) < 0.01


def test_mean_intensity_alone_is_a_weak_cue() -> None:
    covid = [make_phantom(s, covid=True, size=64).image.mean() for s in range(20)]
    normal = [make_phantom(s + 100, covid=False, size=64).image.mean() for s in range(20)]
    # the patients' brightness varies more than the lesions shift it
    assert np.std(normal) > abs(np.mean(covid) - np.mean(normal))


@pytest.mark.parametrize("modality", ["ct", "cxr"])
def test_deterministic_per_seed(modality: str) -> None:
    a = make_phantom(7, modality=modality, covid=True, size=SIZE)
    b = make_phantom(7, modality=modality, covid=True, size=SIZE)
    c = make_phantom(8, modality=modality, covid=True, size=SIZE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.lesion_mask, c.lesion_mask)


@pytest.mark.parametrize("modality", ["ct", "cxr"])
def test_anatomy_seed_fixes_the_patient(modality: str) -> None:
    slices = [make_phantom(s, modality=modality, covid=False, size=128, anatomy_seed=42) for s in range(5)]
    for other in slices[1:]:
        assert _iou(slices[0].lung_mask, other.lung_mask) > 0.6
        assert not np.array_equal(slices[0].image, other.image)
    others = [make_phantom(0, modality=modality, covid=False, size=128, anatomy_seed=a) for a in range(5)]
    assert min(_iou(others[0].lung_mask, o.lung_mask) for o in others[1:]) < 0.99  # patients differ


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_phantom_dataset_layout(tmp_path: Path) -> None:
    manifest = write_phantom_dataset(tmp_path / "ds", n=11, modality="cxr", seed=3, slices_per_patient=3,
                                     size=64)
    assert manifest == tmp_path / "ds" / "manifest.csv"
    df = pd.read_csv(manifest)
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert len(df) == 11
    assert df["label"].value_counts().to_dict() == {"non_covid": 6, "covid": 5}
    assert df["patient_id"].str.fullmatch(r"phantom-cxr-\d{4}").all()
    assert df.groupby("patient_id")["label"].nunique().max() == 1  # a patient has one label
    assert df.groupby("patient_id").size().max() == 3
    assert sorted(p.name for p in (tmp_path / "ds" / "images" / "covid").iterdir()) == sorted(
        Path(p).name for p in df.loc[df["label"] == "covid", "path"])
    for row in df.itertuples():
        assert row.path == f"images/{row.label}/{Path(row.path).name}"
        image = cv2.imread(str(manifest.parent / row.path), cv2.IMREAD_UNCHANGED)
        lung = cv2.imread(str(manifest.parent / row.lung_mask), cv2.IMREAD_UNCHANGED)
        lesion = cv2.imread(str(manifest.parent / row.lesion_mask), cv2.IMREAD_UNCHANGED)
        assert image.shape == lung.shape == lesion.shape == (64, 64) and image.dtype == np.uint8
        assert set(np.unique(lung)) <= {0, 255} and set(np.unique(lesion)) <= {0, 255}
        assert not ((lesion > 0) & (lung == 0)).any()
        assert (lesion > 0).any() == (row.label == "covid")


def test_write_phantom_dataset_is_byte_identical_per_seed(tmp_path: Path) -> None:
    write_phantom_dataset(tmp_path / "a", n=6, seed=1, size=64)
    write_phantom_dataset(tmp_path / "b", n=6, seed=1, size=64)
    write_phantom_dataset(tmp_path / "c", n=6, seed=2, size=64)
    a, b, c = (_digest(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["manifest.csv"] == c["manifest.csv"]
    assert sum(a[k] != c[k] for k in a) > 6  # different images for a different seed


def test_rewriting_a_smaller_dataset_removes_stale_phantoms(tmp_path: Path) -> None:
    write_phantom_dataset(tmp_path, n=8, size=64)
    with pytest.raises(ConfigError, match="not empty"):
        write_phantom_dataset(tmp_path, n=4, size=64)
    write_phantom_dataset(tmp_path, n=4, size=64, overwrite=True)
    assert len(list((tmp_path / "images").rglob("*.png"))) == 4
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 1}, "n=1 is invalid"),
        ({"n": 2.5}, "n=2.5 is invalid"),
        ({"modality": "mri"}, "modality='mri' is unknown: use one of ct, cxr"),
        ({"size": 32}, "size=32 is invalid: must be an integer >= 64"),
        ({"slices_per_patient": 0}, "slices_per_patient=0 is invalid"),
        ({"seed": -1}, "seed=-1 is invalid"),
    ],
)
def test_write_phantom_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        write_phantom_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()  # nothing written


def test_write_phantom_dataset_rejects_a_file_as_folder(tmp_path: Path) -> None:
    target = tmp_path / "taken.txt"
    target.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"taken\.txt is an existing file"):
        write_phantom_dataset(target, n=2, size=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "xray"}, "modality='xray' is unknown"),
        ({"size": 63}, "size=63 is invalid"),
        ({"anatomy_seed": -3}, "anatomy_seed=-3 is invalid"),
    ],
)
def test_make_phantom_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_phantom(0, covid=True, **kwargs)
    with pytest.raises(ConfigError, match="seed='0' is invalid"):
        make_phantom("0", covid=True)  # type: ignore[arg-type]
