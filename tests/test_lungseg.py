"""The X-ray lung U-Net: the model, its weights file and errors, training on generated images, the masked
mode for chest X-rays and the ``covidscan lungseg`` commands."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from covidscan.data.synthetic import make_phantom
from covidscan.errors import ConfigError
from covidscan.preprocess import PreprocessConfig, prepare_image, preprocess
from covidscan.preprocess.lungseg import (
    FORMAT,
    LungSegmenter,
    UNet,
    clean_mask,
    default_lung_model,
    lung_segmenter,
)
from covidscan.training.lungseg import (
    WHEEL_MEMBER,
    iou,
    match_masks,
    read_lung_masks,
    train_lung_model,
)
from test_cli import covidscan


def _constant_model(tmp_path: Path, bias: float) -> Path:
    """A U-Net file whose head says "lung" (bias > 0) or "no lung" (bias < 0) everywhere."""
    model = UNet()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(bias)
    return LungSegmenter(model, 64).save(tmp_path / f"const{bias:+.0f}.safetensors")


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net trained for 1 epoch on 4 phantom X-rays (seconds): a real weights file."""
    out = tmp_path_factory.mktemp("lungseg") / "phantom.safetensors"
    train_lung_model(out, phantoms=4, epochs=1, size=64, progress=False)
    return out


def _xray(seed: int = 1, size: int = 128) -> np.ndarray:
    return make_phantom(seed, modality="cxr", covid=False, size=size).image


# ------------------------------------------------------------------------------------------------ model
def test_unet_is_small_and_keeps_the_input_size():
    model = UNet()
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 600_000
    assert model(torch.zeros(2, 1, 64, 96)).shape == (2, 1, 64, 96)


def test_trained_weights_give_a_boolean_mask_at_the_image_size(phantom_model):
    segmenter = LungSegmenter.load(phantom_model)
    for shape in ((128, 128), (150, 120)):
        image = cv2.resize(_xray(), (shape[1], shape[0]))
        mask = segmenter(image)
        assert mask.dtype == bool and mask.shape == shape
        prob = segmenter.probability(image)
        assert prob.dtype == np.float32 and prob.shape == shape and 0 <= prob.min() <= prob.max() <= 1
    with safe_open(str(phantom_model), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == FORMAT and meta["split"] == "image" and "CC BY 4.0" in meta["masks_license"]
    assert 0 <= float(meta["val_iou"]) <= 1
    assert phantom_model.stat().st_size < 2_000_000


def test_clean_mask_keeps_the_two_largest_regions_and_fills_holes():
    prob = np.zeros((100, 100), np.float32)
    prob[20:80, 10:40] = prob[20:80, 60:90] = 0.9  # two lungs
    prob[40:50, 20:30] = 0.1  # a hole in one
    prob[2:5, 2:5] = prob[90:95, 45:50] = 0.9  # specks
    mask = clean_mask(prob)
    assert mask[45, 25] and not mask[3, 3] and not mask[92, 47]
    assert mask.sum() == 2 * 60 * 30


# ------------------------------------------------------------------------------------------------ errors
def test_missing_weights_name_the_file_and_the_command(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=r"nope\.safetensors not found.*covidscan lungseg train"):
        LungSegmenter.load(missing)
    with pytest.raises(ConfigError, match="covidscan lungseg train"):
        preprocess(_xray(), {"modality": "cxr", "mask_outside_lungs": True, "lung_model": str(missing)})


def test_damaged_or_foreign_weights_are_config_errors(tmp_path, phantom_model):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(ConfigError, match=r"garbage\.safetensors.*damaged"):
        LungSegmenter.load(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ConfigError, match="not a covidscan lung model"):
        LungSegmenter.load(foreign)
    wrong = tmp_path / "wrong.safetensors"
    save_file(load_file(str(phantom_model)), str(wrong), metadata={"format": FORMAT, "widths": "4,8",
                                                                    "size": "64"})
    with pytest.raises(ConfigError, match="do not fit the U-Net"):
        LungSegmenter.load(wrong)


def test_default_location_is_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path))
    assert default_lung_model() == tmp_path / "models" / "cxr_lungs.safetensors"
    with pytest.raises(ConfigError, match=r"cxr_lungs\.safetensors not found"):
        lung_segmenter()


# ------------------------------------------------------------------------------------------------ masked mode
def test_masked_cxr_mode_uses_the_lung_model(tmp_path):
    everywhere, nowhere = _constant_model(tmp_path, 20.0), _constant_model(tmp_path, -20.0)
    image = _xray()
    found = preprocess(image, {"modality": "cxr", "mask_outside_lungs": True, "lung_model": str(everywhere)})
    assert found.crop.found and found.crop.mask.all()  # the U-Net's mask, not the contour finder's
    assert np.array_equal(found.enhanced, found.unmasked)  # all lung: nothing to blank
    cfg = PreprocessConfig(modality="cxr", mask_outside_lungs=True, lung_model=str(nowhere))
    lost = preprocess(image, cfg)
    assert not lost.crop.found and lost.crop.reason == "the lung model found no lungs"
    assert lost.unmasked is None and (lost.enhanced > 0).mean() > 0.9  # not blanked
    prepared = prepare_image(image, cfg, (64, 64))
    assert prepared.lungs_found is False and prepared.warnings[0].startswith("unmasked: no lungs found")


def _dark_is_lung(tmp_path: Path) -> Path:
    """A U-Net file set by hand to call every dark pixel lung: the input passes unchanged through the
    first block and the skip connection into the last block, and the head thresholds it at 0.5."""
    model = UNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        for conv, channel in ((model.down[0][0], 0), (model.down[0][3], 0), (model.merge[-1][0], 8),
                              (model.merge[-1][3], 0)):
            conv.weight[0, channel, 1, 1] = 1.0  # identity on channel 0 (BatchNorm starts as identity)
        model.head.weight[0, 0] = -40.0
        model.head.bias.fill_(20.0)
    return LungSegmenter(model, 64).save(tmp_path / "dark.safetensors")


def test_masked_cxr_mode_blanks_outside_the_predicted_lungs(tmp_path):
    image = np.full((128, 128), 0.8, np.float32)
    lungs = np.zeros((128, 128), np.uint8)
    for cx in (40, 88):
        cv2.ellipse(lungs, (cx, 64), (18, 36), 0, 0, 360, 1, -1)
    image[lungs > 0] = 0.15
    marker = cv2.putText(np.zeros((128, 128), np.uint8), "R", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1, 2)
    image[marker > 0] = 1.0  # a burnt-in side marker
    cfg = {"modality": "cxr", "mask_outside_lungs": True, "lung_model": str(_dark_is_lung(tmp_path)),
           "mask_dilation": 0.0}
    result = preprocess(image, cfg)
    assert result.crop.found and iou(result.crop.mask, lungs > 0) > 0.9
    outside = ~result.crop.mask
    assert (result.enhanced[outside] == 0).all() and (result.unmasked[outside] > 0.5).mean() > 0.9
    assert np.array_equal(result.enhanced[~outside], result.unmasked[~outside])
    assert result.enhanced[:25, :25].max() == 0  # the marker is gone


def test_plain_cxr_lung_crop_still_uses_the_contour_finder(tmp_path):
    image = _xray()
    plain = preprocess(image, {"modality": "cxr", "lung_model": str(_constant_model(tmp_path, 20.0))})
    assert plain.crop.found and not plain.crop.mask.all() and plain.unmasked is None


# ------------------------------------------------------------------------------------------------ training
def _write_dataset(root: Path, n: int = 6) -> tuple[Path, Path]:
    """Phantom X-rays as PNGs under root/images and their lung masks as JPEGs in a zip (as in the V7 zip)."""
    (root / "images").mkdir(parents=True)
    archive = root / "masks.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("semantic_masks_v7labs_lungs/", "")
        for i in range(n):
            ph = make_phantom(i, modality="cxr", covid=bool(i % 2), size=96)
            cv2.imwrite(str(root / "images" / f"case-{i}.png"), (ph.image * 255).astype(np.uint8))
            big = cv2.resize(ph.lung_mask.astype(np.uint8) * 255, (192, 192), interpolation=cv2.INTER_NEAREST)
            zf.writestr(f"semantic_masks_v7labs_lungs/case-{i}.jpeg", cv2.imencode(".jpg", big)[1].tobytes())
        zf.writestr("semantic_masks_v7labs_lungs/other.png", cv2.imencode(".png", big)[1].tobytes())
        wide = np.zeros((96, 200), np.uint8)
        zf.writestr("semantic_masks_v7labs_lungs/case-0-wide.png", cv2.imencode(".png", wide)[1].tobytes())
    cv2.imwrite(str(root / "images" / "case-0-wide.png"), np.full((96, 96), 128, np.uint8))
    return root / "images", archive


def test_masks_are_read_from_a_zip_or_a_wheel_and_matched_by_name(tmp_path):
    images, archive = _write_dataset(tmp_path)
    masks = read_lung_masks(archive)
    assert set(masks) == {*(f"case-{i}" for i in range(6)), "other", "case-0-wide"}
    assert masks["case-1"].dtype == bool and masks["case-1"].shape == (192, 192)
    wheel = tmp_path / "torchxrayvision-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(archive, WHEEL_MEMBER)
    assert set(read_lung_masks(wheel)) == set(masks)
    samples, skipped, by_patient = match_masks(images, masks)
    assert sorted(s.name for s in samples) == [f"case-{i}.png" for i in range(6)] and not by_patient
    assert len(skipped) == 1 and "aspect ratio" in skipped[0]
    truth = cv2.resize(make_phantom(2, modality="cxr", covid=False, size=96).lung_mask.astype(np.uint8),
                       (96, 96)) > 0
    assert iou(next(s for s in samples if s.name == "case-2.png").mask, truth) > 0.95


def test_mask_sources_that_do_not_work_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_lung_masks(tmp_path / "missing.zip")
    (tmp_path / "bad.zip").write_bytes(b"no zip")
    with pytest.raises(ConfigError, match="not a zip"):
        read_lung_masks(tmp_path / "bad.zip")
    with zipfile.ZipFile(tmp_path / "x.whl", "w") as zf:
        zf.writestr("other.txt", "")
    with pytest.raises(ConfigError, match="has no torchxrayvision/data"):
        read_lung_masks(tmp_path / "x.whl")
    images, _ = _write_dataset(tmp_path / "d")
    with pytest.raises(ConfigError, match="matches a lung mask"):
        match_masks(images, {"unrelated": np.ones((4, 4), bool)})
    with pytest.raises(ConfigError, match="safetensors"):
        train_lung_model(tmp_path / "w.pt", phantoms=4, epochs=1)
    with pytest.raises(ConfigError, match="at least 2 phantoms"):
        train_lung_model(tmp_path / "w.safetensors", epochs=1)
    with pytest.raises(ConfigError, match="multiple of 16"):
        train_lung_model(tmp_path / "w.safetensors", phantoms=4, epochs=1, size=100)


def test_train_on_images_and_masks_reports_held_out_iou(tmp_path):
    images, archive = _write_dataset(tmp_path)
    result = train_lung_model(tmp_path / "w.safetensors", images=images, masks=archive, epochs=1,
                              phantoms=2, size=64, progress=False)
    assert (result.n_train, result.n_val, result.n_phantoms, result.split) == (4, 2, 2, "image")
    assert 0 <= result.val_iou <= 1 and 0 <= result.baseline_iou <= 1
    assert len(result.skipped) == 1 and "held-out IoU" in result.summary()
    assert LungSegmenter.load(result.path)(_xray()).shape == (128, 128)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_lungseg_train_and_preview(tmp_path, phantom_model):
    weights = tmp_path / "w.safetensors"
    outcome = covidscan("-q", "lungseg", "train", "--phantoms", "4", "--epochs", "1", "--size", "64",
                        "--out", str(weights))
    assert outcome.returncode == 0 and "held-out IoU" in outcome.stdout and weights.is_file()
    folder = tmp_path / "xrays"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"x{i}.png"), (_xray(i) * 255).astype(np.uint8))
    sheet = tmp_path / "sheet.png"
    outcome = covidscan("lungseg", "preview", str(folder), "--weights", str(phantom_model),
                        "--out", str(sheet))
    assert outcome.returncode == 0 and "of 3 images" in outcome.stdout
    assert cv2.imread(str(sheet)).shape[0] > 100
    outcome = covidscan("lungseg", "preview", str(folder), "--weights", str(tmp_path / "none.safetensors"),
                        "--out", str(sheet))
    assert outcome.returncode == 2 and "covidscan lungseg train" in outcome.stderr
