"""Tests of covidscan.explain: Grad-CAM maps, mapping to the original, overlays, localisation metrics."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from covidscan.errors import ConfigError, CovidscanError, ImageReadError
from covidscan.explain import (
    cam_metrics,
    cam_region,
    cam_to_original,
    explain_image,
    gradcam,
    overlay,
    region_bbox,
    save_overlay,
)
from covidscan.explain.render import MIN_SIDE
from covidscan.inference import Predictor
from covidscan.models import build_model, gradcam_target_layer

SMALL = 64


def small(backbone: str = "timm:resnet18", **kwargs) -> nn.Module:
    settings = {"backbone": backbone, "weights": "none", "head": "paper_a", "input_size": SMALL}
    # Seeded: a random network's CAM can be all zeros (no positive evidence anywhere) for some draws.
    torch.manual_seed(0)
    return build_model({**settings, **kwargs})


def batch(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


# ---------------------------------------------------------------- gradcam


@pytest.mark.parametrize(
    ("backbone", "head"),
    [("timm:resnet18", "paper_a"), pytest.param("mobilenet_v2", "paper_b", marks=pytest.mark.slow),
     pytest.param("timm:tf_efficientnet_lite0", "linear", marks=pytest.mark.slow)],
)
def test_gradcam_maps_have_input_shape_and_unit_range(backbone, head):
    model, x = small(backbone, head=head), batch(3)
    covid, non_covid = gradcam(model, x), gradcam(model, x, target=0)
    for cams in (covid, non_covid):
        assert cams.shape == (3, SMALL, SMALL)
        assert cams.dtype == np.float32
        assert cams.min() >= 0.0 and cams.max() <= 1.0
    # The two targets explain opposite margins, so every image has evidence for one class or the other,
    # and each map with evidence is scaled to peak at 1.
    peaks = np.maximum(covid.reshape(3, -1).max(1), non_covid.reshape(3, -1).max(1))
    np.testing.assert_allclose(peaks, 1.0, atol=1e-3)


def test_gradcam_equals_the_textbook_definition():
    """ReLU(sum_k mean(dz/dA_k) * A_k), z = logit_covid - logit_non_covid, min-max scaled and resized."""
    model = small().eval()
    x = batch(2, seed=3)
    saved: dict[str, torch.Tensor] = {}
    handle = gradcam_target_layer(model).register_forward_hook(lambda _m, _i, out: saved.update(a=out))
    try:
        logits = model(x.requires_grad_(True))
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), saved["a"])
    weights = grads.mean(dim=(2, 3), keepdim=True)
    raw = torch.relu((weights * saved["a"]).sum(1)).detach().numpy()
    for got, ref in zip(gradcam(model, x.detach()), raw, strict=True):
        ref = (ref - ref.min()) / (ref.max() - ref.min() + 1e-7)
        np.testing.assert_allclose(got, cv2.resize(ref, (SMALL, SMALL)), atol=1e-4)


def test_frozen_model_works_and_comes_back_unchanged():
    model = small("mobilenet_v2")  # frozen base by default, model in train mode
    model.backbone.set_train_mode("finetune", unfreeze_last=1)
    assert not all(p.requires_grad for p in model.backbone.parameters())
    grad = torch.full_like(model.head.fc1.weight, 0.5)
    model.head.fc1.weight.grad = grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    cams = gradcam(model, batch(2))

    assert cams.max() > 0  # gradients reached the frozen feature map
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.head.fc1.weight.grad is grad
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.fc1.weight")
    assert hook_count(model) == 0


def test_gradcam_works_inside_inference_mode():
    model = small()
    with torch.inference_mode():
        x = batch(2)
        cams = gradcam(model, x, target=0)
    np.testing.assert_array_equal(cams, gradcam(model, batch(2), target=0))


def test_bpnn_has_no_convolution_to_explain():
    model = build_model({"backbone": "pixels", "weights": "none", "head": "bpnn", "input_size": 32})
    with pytest.raises(ConfigError, match="Grad-CAM needs a convolutional backbone"):
        gradcam(model, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "magic"}, ConfigError, "unknown"),
        ({"target": 2}, ConfigError, "class index"),
        ({"x": torch.zeros(3, SMALL, SMALL)}, CovidscanError, r"\(N, 3, H, W\)"),
    ],
)
def test_bad_gradcam_arguments_are_explained(kwargs, error, match):
    x = kwargs.pop("x", batch(1))
    with pytest.raises(error, match=match):
        gradcam(small(), x, **kwargs)


def test_empty_batch_gives_no_maps():
    assert gradcam(small(), torch.zeros(0, 3, SMALL, SMALL)).shape == (0, SMALL, SMALL)


# ---------------------------------------------------------------- geometry and regions


def test_cam_to_original_puts_the_hot_spot_where_the_crop_was():
    cam = np.zeros((32, 32), np.float32)
    cam[8:12, 24:28] = 1.0
    # The crop (rows 10..74, cols 20..148) is 64 x 128 px: 2x taller and 4x wider than the CAM.
    full = cam_to_original(cam, (10, 20, 74, 148), (100, 200))
    assert full.shape == (100, 200) and full.dtype == np.float32
    hot = region_bbox(full >= 0.5)
    assert hot == pytest.approx((10 + 16, 20 + 96, 10 + 24, 20 + 112), abs=2)
    outside = np.ones((100, 200), bool)
    outside[10:74, 20:148] = False
    assert not full[outside].any()


def test_cam_to_original_rejects_a_box_outside_the_image():
    with pytest.raises(CovidscanError, match="does not fit"):
        cam_to_original(np.ones((8, 8), np.float32), (0, 0, 50, 50), (40, 40))


def test_cam_region_is_relative_to_the_peak_and_empty_for_a_zero_map():
    cam = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    np.testing.assert_array_equal(cam_region(cam, threshold=0.5), [[False, True], [True, True]])
    assert not cam_region(np.zeros((4, 4), np.float32)).any()
    assert region_bbox(np.zeros((4, 4), bool)) is None
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        cam_region(cam, threshold=0.0)


# ---------------------------------------------------------------- metrics


def test_cam_metrics_on_hand_built_masks():
    cam = np.zeros((10, 10), np.float32)
    cam[2:4, 2:4] = 1.0  # the peak: 4 px of mass 1 (argmax = (2, 2))
    cam[6:8, 6:8] = 0.25  # 4 px of mass 0.25, below the 0.5 region threshold
    lungs = np.zeros((10, 10), bool)
    lungs[:5] = True  # holds the peak only: 4 / (4 + 1) of the mass
    lesion = np.zeros((10, 10), bool)
    lesion[2:4, 3:6] = True  # 6 px; shares column 3 (2 px) with the region rows 2:4, cols 2:4

    metrics = cam_metrics(cam, lungs, lesion)
    assert metrics["energy_in_lungs"] == pytest.approx(4.0 / 5.0)
    assert metrics["pointing_game_hit"] is False  # (2, 2) is one pixel left of the lesion
    assert metrics["iou"] == pytest.approx(2 / (4 + 6 - 2))
    assert cam_metrics(cam, lungs, lesion, tolerance=1)["pointing_game_hit"] is True
    # A lower threshold takes the weak block into the region too: 8 px, still 2 px shared.
    assert cam_metrics(cam, lesion_mask=lesion, threshold=0.2)["iou"] == pytest.approx(2 / (8 + 6 - 2))


def test_cam_metrics_are_none_when_undefined():
    none = {"energy_in_lungs": None, "pointing_game_hit": None, "iou": None}
    full = np.ones((6, 6), bool)
    assert cam_metrics(np.zeros((6, 6), np.float32), full, full) == none
    assert cam_metrics(np.ones((6, 6), np.float32)) == none
    empty = np.zeros((6, 6), bool)
    assert cam_metrics(np.ones((6, 6), np.float32), empty, empty) == none


def test_cam_metrics_reject_mismatched_masks_and_bad_tolerance():
    cam = np.ones((6, 6), np.float32)
    with pytest.raises(CovidscanError, match="lesion mask has shape"):
        cam_metrics(cam, lesion_mask=np.ones((5, 6), bool))
    with pytest.raises(ConfigError, match="tolerance"):
        cam_metrics(cam, tolerance=-1)


# ---------------------------------------------------------------- overlays


def test_overlay_is_rgb_uint8_of_the_image_size():
    image = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)
    cam = np.zeros((48, 40), np.float32)
    cam[10:20, 10:20] = 1.0
    for picture in (overlay(image, cam), overlay((image * 255).astype(np.uint8), cam, alpha=0.7)):
        assert picture.shape == (48, 40, 3) and picture.dtype == np.uint8
    hot, cold = overlay(image, cam)[15, 15], overlay(image, cam)[40, 30]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # JET: red where the CAM is high, blue where it is 0
    with pytest.raises(CovidscanError, match="map it first"):
        overlay(image, np.zeros((10, 10), np.float32))


def test_save_overlay_writes_a_png_with_the_region_outlined(tmp_path):
    image = np.full((64, 64), 0.5, np.float32)
    cam = np.zeros((64, 64), np.float32)
    cam[20:40, 20:40] = 1.0
    plain = save_overlay(tmp_path / "plain.png", image, cam)
    outlined = save_overlay(tmp_path / "sub" / "cam.png", image, cam, region=cam_region(cam), title="x")
    assert outlined == tmp_path / "sub" / "cam.png"
    a, b = cv2.imread(str(plain)), cv2.imread(str(outlined))
    assert a.shape == b.shape == (512, 512, 3)  # small images are drawn 8x larger, to stay legible
    # white contour on the region's (scaled) top edge, rows 20 -> 160, columns 20..39 -> 160..319
    assert (b[160, 170:310] == 255).all() and not (a[160, 170:310] == 255).all()
    large = save_overlay(tmp_path / "large.png", np.full((600, 700), 0.5), np.zeros((600, 700)))
    assert cv2.imread(str(large)).shape == (600, 700, 3)
    with pytest.raises(CovidscanError, match=r"give the PNG a \.png name"):
        save_overlay(tmp_path / "cam.notanimage", image, cam)


def test_save_overlay_layer_is_transparent_heat_without_gray_or_text(tmp_path):
    image = np.full((64, 64), 0.5, np.float32)
    cam = np.zeros((64, 64), np.float32)
    cam[20:40, 20:40] = 1.0
    layer = save_overlay(tmp_path / "layer.png", image, cam, region=cam_region(cam), layer=True)
    bgra = cv2.imread(str(layer), cv2.IMREAD_UNCHANGED)
    assert bgra.shape == (512, 512, 4)
    assert (bgra[:100, :, 3] == 0).all()  # clear where the CAM is 0: no gray image, no title
    assert bgra[250, 250, 3] == 255 and bgra[250, 250, 2] > bgra[250, 250, 0]  # opaque JET red at CAM 1
    assert (bgra[160, 170:310] == 255).all()  # the region's outline, opaque white
    with pytest.raises(CovidscanError, match="no text"):
        save_overlay(tmp_path / "titled.png", image, cam, title="p(covid) 0.97: covid", layer=True)


# ---------------------------------------------------------------- whole files


def test_explain_image_on_a_trained_run(tiny_run: Path, phantom_manifest: Path, tmp_path):
    df = pd.read_csv(phantom_manifest)
    row = df[df["label"] == "covid"].iloc[0]
    image_path = phantom_manifest.parent / row["path"]
    run = Predictor.from_run(tiny_run)
    original = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    # A barely trained model may see no evidence for one class (all-zero CAM, no region); never for both.
    results = [explain_image(run, image_path, tmp_path / "cams" / f"{t}.png", target=t) for t in (0, 1)]
    for result in results:
        assert set(result) == {"cam_png", "cam_region_bbox", "cam_energy_in_lungs",
                               "cam_pointing_game_hit", "cam_iou"}
        scale = max(1.0, MIN_SIDE / min(original.shape))  # drawn enlarged, at the original's aspect ratio
        assert cv2.imread(result["cam_png"]).shape == (*(round(n * scale) for n in original.shape), 3)
    result = next(r for r in results if r["cam_region_bbox"] is not None)
    y0, x0, y1, x1 = result["cam_region_bbox"]
    assert 0 <= y0 < y1 <= original.shape[0] and 0 <= x0 < x1 <= original.shape[1]
    assert 0.0 <= result["cam_energy_in_lungs"] <= 1.0
    assert result["cam_pointing_game_hit"] is None  # no lesion mask given
    assert hook_count(run.model) == 0 and not run.model.training


def test_explain_image_reports_unreadable_files(tiny_run: Path, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        explain_image(Predictor.from_run(tiny_run), bad, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
