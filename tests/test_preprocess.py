"""CLAHE, lung finding (phantoms, failure cases, real CT), preprocess pipeline and preview sheets."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError, ManifestError
from covidscan.preprocess import (
    LungCrop,
    PreprocessConfig,
    apply_clahe,
    find_lungs,
    format_preview,
    preprocess,
    preview_sheet,
)
from covidscan.preprocess.clahe import as_gray_float


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _drawn_ct(size: int = 256) -> np.ndarray:
    """Simple drawn CT slice: gray body ellipse on black air, two dark lung ellipses inside."""
    img = np.zeros((size, size), np.float32)
    c = size // 2
    cv2.ellipse(img, (c, c), (int(0.42 * size), int(0.3 * size)), 0, 0, 360, 0.7, -1)
    for dx in (-1, 1):
        centre, axes = (c + dx * int(0.2 * size), c), (int(0.13 * size), int(0.2 * size))
        cv2.ellipse(img, centre, axes, 0, 0, 360, 0.1, -1)
    return img


# ------------------------------------------------------------------------------------------------ CLAHE
def test_clahe_raises_local_contrast_and_keeps_range_and_dtype():
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((128, 128), dtype=np.float32), (0, 0), 3)
    low = (0.45 + 0.05 * texture).astype(np.float32)
    out = apply_clahe(low)
    assert out.dtype == np.float32 and out.shape == low.shape
    assert out.min() >= 0.0 and out.max() <= 1.0

    def local_std(im: np.ndarray) -> float:
        return float(im.reshape(8, 16, 8, 16).std(axis=(1, 3)).mean())  # mean std of 16x16 blocks

    assert local_std(out) > 3 * local_std(low)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_limit": 0}, "clip_limit"),
        ({"clip_limit": -1.0}, "clip_limit"),
        ({"clip_limit": "2"}, "clip_limit"),
        ({"tile_grid": (0, 8)}, "tile_grid"),
        ({"tile_grid": (8,)}, "tile_grid"),
        ({"tile_grid": (8.5, 8)}, "tile_grid"),
        ({"tile_grid": "88"}, "tile_grid"),
    ],
)
def test_clahe_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        apply_clahe(np.zeros((32, 32), np.float32), **kwargs)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3)), np.zeros((0, 5)), np.array(["a", "b"]).reshape(1, 2)])
def test_clahe_rejects_non_gray_input(bad):
    with pytest.raises(ConfigError, match="gray image"):
        apply_clahe(bad)


# ------------------------------------------------------------------------------------------- find_lungs
def test_find_lungs_on_drawn_slice_finds_both_lungs_and_crops():
    img = _drawn_ct()
    crop = find_lungs(img, margin=0.0)
    assert crop.found and crop.reason == ""
    truth = img < 0.2
    truth[:, :] &= cv2.ellipse(np.zeros_like(img), (128, 128), (107, 76), 0, 0, 360, 1, -1) > 0
    assert _iou(crop.mask, truth) > 0.9
    y0, x0, y1, x1 = crop.bbox
    assert crop.image.shape == (y1 - y0, x1 - x0)
    assert np.array_equal(crop.image, img[y0:y1, x0:x1])
    # margin widens the box
    wide = find_lungs(img, margin=0.1).bbox
    assert wide[0] < y0 and wide[1] < x0 and wide[2] > y1 and wide[3] > x1


def test_find_lungs_large_input_is_worked_small_and_mask_scaled_back():
    big = cv2.resize(_drawn_ct(), (1024, 1024), interpolation=cv2.INTER_NEAREST)
    crop = find_lungs(big)
    assert crop.found and crop.mask.shape == (1024, 1024)
    assert _iou(crop.mask, cv2.resize(find_lungs(_drawn_ct()).mask.astype(np.uint8), (1024, 1024)) > 0) > 0.95


def test_find_lungs_one_lung_box_is_mirrored_to_cover_both_sides():
    img = _drawn_ct()
    right = img[60:200, 150:230]
    right[right < 0.2] = 0.7  # the right lung is "white" (consolidated)
    crop = find_lungs(img, margin=0.0)
    assert crop.found
    assert crop.mask[:, 128:].sum() == 0  # only the left lung is in the mask ...
    assert crop.bbox[3] > 200  # ... but the box reaches over the other side


@pytest.mark.parametrize("modality", ["ct", "cxr"])
@pytest.mark.parametrize(
    "image",
    [
        np.zeros((128, 128), np.float32),
        np.ones((128, 128), np.float32),
        np.full((8, 8), 0.5, np.float32),
        np.random.default_rng(0).random((128, 128), dtype=np.float32),
    ],
    ids=["blank", "white", "tiny", "noise"],
)
def test_find_lungs_fails_gracefully(image, modality):
    crop = find_lungs(image, modality=modality)
    assert not crop.found and crop.reason
    assert crop.bbox == (0, 0, *image.shape)
    assert crop.image.shape == image.shape and not crop.mask.any()


def test_find_lungs_cxr_given_as_ct_returns_a_valid_crop():
    # The CT finder is no modality detector: on an X-ray it may well find the two dark lung fields.
    image = make_phantom(3, modality="cxr", covid=True).image
    crop = find_lungs(image, modality="ct")
    y0, x0, y1, x1 = crop.bbox
    assert crop.image.size > 0 and crop.image.shape == (y1 - y0, x1 - x0) and crop.mask.shape == image.shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"modality": "mri"}, "modality"), ({"margin": 0.6}, "margin"), ({"margin": -0.1}, "margin"),
     ({"min_area": 0}, "min_area")],
)
def test_find_lungs_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        find_lungs(_drawn_ct(), **kwargs)


def test_find_lungs_ct_phantoms_mean_iou_at_least_0_90():
    ious, lesion_cover = [], []
    for seed in range(40):
        phantom = make_phantom(seed, modality="ct", covid=bool(seed % 2))
        crop = find_lungs(apply_clahe(phantom.image), modality="ct")
        assert crop.found
        ious.append(_iou(crop.mask, phantom.lung_mask))
        if phantom.lesion_mask.any():
            lesion_cover.append((crop.mask & phantom.lesion_mask).sum() / phantom.lesion_mask.sum())
    assert np.mean(ious) >= 0.90, f"mean IoU {np.mean(ious):.3f}"
    assert np.mean(lesion_cover) >= 0.6  # ground-glass lesions are part of the lung, not cut away


def test_find_lungs_cxr_phantoms():
    ious = []
    for seed in range(20):
        phantom = make_phantom(seed, modality="cxr", covid=bool(seed % 2))
        crop = find_lungs(apply_clahe(phantom.image), modality="cxr")
        assert crop.found
        ious.append(_iou(crop.mask, phantom.lung_mask))
    assert np.mean(ious) >= 0.85, f"mean IoU {np.mean(ious):.3f}"


@pytest.mark.shared
def test_find_lungs_real_ucsd_ct_found_share(shared_dir):
    from covidscan.data import read_manifest
    from covidscan.io import read_image

    df = read_manifest(shared_dir / "data" / "ucsd-ct" / "labels.csv")
    sample = df.sample(60, random_state=0)
    found = [find_lungs(apply_clahe(read_image(p).pixels)).found for p in sample["path"]]
    # Measured: 745 of 746 (99.9%) on the whole set; allow some slack for future changes.
    assert np.mean(found) >= 0.9


# --------------------------------------------------------------------------------------------- pipeline
def test_preprocess_applies_clahe_then_crops_on_the_clahe_image():
    img = _drawn_ct()
    result = preprocess(img, PreprocessConfig())
    crop = result.crop
    assert isinstance(crop, LungCrop) and crop.found
    y0, x0, y1, x1 = crop.bbox
    assert np.array_equal(result.enhanced, apply_clahe(img))
    assert np.array_equal(result.image, apply_clahe(img)[y0:y1, x0:x1])
    plain = preprocess(img, {"clahe": False, "lung_crop": False})
    assert plain.crop is None and np.array_equal(plain.image, img)
    only_clahe = preprocess(img, {"lung_crop": False, "clip_limit": 3.0, "tile_grid": (4, 4)})
    assert np.array_equal(only_clahe.image, apply_clahe(img, clip_limit=3.0, tile_grid=(4, 4)))


@pytest.mark.parametrize(
    "bad", [{"modality": "mri"}, {"margin": 0.7}, {"clip_limit": 0}, {"tile_grid": (0, 2)}, {"unknown": 1}]
)
def test_preprocess_config_errors_are_config_errors(bad):
    with pytest.raises(ConfigError, match="invalid preprocess settings"):
        preprocess(_drawn_ct(), bad)


# ---------------------------------------------------------------------------------------------- preview
def _phantom_manifest(tmp_path, n=6):
    rows = []
    for seed in range(n):
        phantom = make_phantom(seed, modality="ct", covid=bool(seed % 2), size=128)
        path = tmp_path / f"p{seed}.png"
        cv2.imwrite(str(path), np.rint(phantom.image * 255).astype(np.uint8))
        rows.append({"path": str(path), "label": phantom.label})
    return pd.DataFrame(rows)


def test_preview_sheet_writes_png_and_returns_stats(tmp_path):
    df = _phantom_manifest(tmp_path)
    df.loc[len(df)] = {"path": str(tmp_path / "missing.png"), "label": "covid"}
    out = tmp_path / "sheet" / "s.png"
    stats = preview_sheet(df, out, n=5, seed=1)
    assert stats["n"] == 5 and out.is_file()
    sheet = cv2.imread(str(out))
    assert sheet.shape[:2] == (220, 1000)  # 5 tiles of 200 px in one row, 220 px tall
    assert 0 <= stats["found"] <= 5 and stats["found_share"] == stats["found"] / 5
    assert "lungs found in" in format_preview(stats)
    # both classes are drawn, and the same seed draws the same sample
    assert preview_sheet(df, tmp_path / "again.png", n=5, seed=1)["found"] == stats["found"]
    full = preview_sheet(df, tmp_path / "all.png", n=32)
    assert full["n"] == len(df) and full["unreadable"] == 1 and full["reasons"]["unreadable"] == 1


def test_preview_sheet_bad_input(tmp_path):
    with pytest.raises(ManifestError, match="label"):
        preview_sheet(pd.DataFrame({"path": ["x.png"]}), tmp_path / "s.png")
    with pytest.raises(ManifestError, match="no rows"):
        preview_sheet(pd.DataFrame({"path": [], "label": []}), tmp_path / "s.png")
    df = _phantom_manifest(tmp_path, n=2)
    with pytest.raises(ConfigError, match="n must"):
        preview_sheet(df, tmp_path / "s.png", n=0)
    with pytest.raises(ConfigError, match="modality"):
        preview_sheet(df, tmp_path / "s.png", modality="mri")


def test_gray_float_maps_nan_and_infinities_as_nan_to_num_and_clip_would():
    image = np.array([[np.nan, np.inf, -np.inf, -0.5, 0.0, 0.25, 1.0, 7.0]], np.float64)
    out = as_gray_float(image)
    np.testing.assert_array_equal(out, np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    levels = np.array([[0, 128, 255]], np.uint8)
    # integers are clipped, not scaled
    np.testing.assert_array_equal(as_gray_float(levels), [[0.0, 1.0, 1.0]])
