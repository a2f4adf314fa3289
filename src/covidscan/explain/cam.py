"""Grad-CAM maps of a classifier, their mapping back onto the original image, and how well they localise.

The maps come from ``pytorch_grad_cam`` on the model's ``cam_layers`` (the backbone's final feature map; for
an ensemble every member's, whose normalised maps it averages); everything here is plain NumPy after that. A
CAM is an ``(H, W)`` float32 array in [0, 1] (each map is scaled so that its maximum is 1, or is all zeros
when the target has no positive evidence anywhere).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from torch import nn

from covidscan import CLASSES
from covidscan.errors import ConfigError, CovidscanError
from covidscan.models import Classifier

CAM_METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
}


class LogitMargin:
    """Grad-CAM score of class ``target``: its logit minus the other class's logit.

    P(target) = sigmoid(margin / T) depends on nothing else; the part both logits share (which the raw
    logit ``ClassifierOutputTarget(target)`` would also explain) does not change the decision.
    """

    def __init__(self, target: int) -> None:
        self.target = target

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Margin of one sample's logits ``(2,)``."""
        return logits[self.target] - logits[1 - self.target]


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Undo what a CAM pass does to a model: train/eval flags, requires_grad flags and ``.grad`` tensors.

    pytorch_grad_cam switches the model to eval mode and calls ``model.zero_grad()``; the parameters are
    also frozen for the pass so that ``backward`` only computes activation gradients. The input is what
    requires grad instead, so the target layer's output requires grad even in a frozen backbone (without
    that, pytorch_grad_cam silently records no gradient).
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad, grad in params:
            param.requires_grad_(requires_grad)
            param.grad = grad


def gradcam(
    model: Classifier, batch: torch.Tensor, *, target: int = 1, method: str = "gradcam"
) -> np.ndarray:
    """CAMs ``(N, H, W)`` float32 in [0, 1] at the batch's resolution for class ``target`` (1 = covid).

    The explained score is the :class:`LogitMargin` of ``target`` (z = logit_covid - logit_non_covid for
    covid); a map is all zeros where nothing in the image speaks for the target class. ``batch`` is a
    normalised ``(N, 3, H, W)`` model input. Works with frozen backbones; the model comes back exactly as
    it was (modes, requires_grad, gradients, no hooks left).
    """
    if method not in CAM_METHODS:
        raise ConfigError(f"CAM method {method!r} is unknown; use one of {', '.join(CAM_METHODS)}")
    if target not in range(len(CLASSES)):
        raise ConfigError(f"CAM target {target!r} is not a class index of {list(CLASSES)} (use 0 or 1)")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise CovidscanError(
            f"Grad-CAM needs a normalised (N, 3, H, W) batch, got shape {tuple(batch.shape)}"
        )
    try:
        layers = model.cam_layers
    except ConfigError as err:
        raise ConfigError(
            f"{err}: Grad-CAM needs a convolutional backbone (the BPNN sees raw pixels and has no feature "
            "map); explain a CNN run instead"
        ) from None
    if len(batch) == 0:
        return np.zeros((0, *batch.shape[-2:]), np.float32)
    # Grad-CAM needs autograd even when called from inference code; inference tensors cannot take part.
    with torch.inference_mode(False), torch.enable_grad(), _restored(model):
        batch = batch.detach().clone().requires_grad_(True)
        cam = CAM_METHODS[method](model, layers)
        try:
            maps = cam(batch, targets=[LogitMargin(target)] * len(batch))
        finally:
            # Not a `with` block: BaseCAM.__exit__ swallows IndexErrors and would return nothing.
            cam.activations_and_grads.release()
    return np.clip(maps, 0.0, 1.0).astype(np.float32, copy=False)


def cam_to_original(
    cam: np.ndarray, bbox: Sequence[int], original_shape: Sequence[int]
) -> np.ndarray:
    """Map a CAM of the model input (the crop ``bbox`` = (y0, x0, y1, x1) of the original) to the original.

    The map is resized to the box and pasted into zeros of ``original_shape[:2]``: the model saw nothing
    outside the box.
    """
    height, width = (int(v) for v in original_shape[:2])
    y0, x0, y1, x1 = (int(v) for v in bbox)
    if cam.ndim != 2:
        raise CovidscanError(f"cam_to_original takes one (H, W) CAM, got shape {cam.shape}")
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise CovidscanError(f"crop box {tuple(bbox)} does not fit in an image of {height}x{width} px")
    out = np.zeros((height, width), np.float32)
    out[y0:y1, x0:x1] = cv2.resize(cam.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return out


def _check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"CAM threshold {threshold!r} must be in (0, 1] (a fraction of the map's maximum)")
    return float(threshold)


def cam_region(cam: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """The CAM turned into a region (paper B's "infected region localization"): ``cam >= threshold * max``.

    Empty when the CAM is all zeros.
    """
    threshold = _check_threshold(threshold)
    peak = float(cam.max(initial=0.0))
    if peak <= 0.0:
        return np.zeros(cam.shape, bool)
    return cam >= threshold * peak


def region_bbox(region: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, x0, y1, x1), end-exclusive, of a boolean region; None when it is empty."""
    if not region.any():
        return None
    x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
    return (y, x, y + h, x + w)


def _as_mask(mask: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    """A boolean mask of ``shape``, or None when absent or empty (no pixel set)."""
    if mask is None:
        return None
    mask = np.asarray(mask) > 0
    if mask.shape != shape:
        raise CovidscanError(f"{name} has shape {mask.shape} but the CAM has shape {shape}; map them alike")
    return mask if mask.any() else None


def cam_metrics(
    cam: np.ndarray,
    lung_mask: np.ndarray | None = None,
    lesion_mask: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    tolerance: int = 0,
) -> dict[str, float | bool | None]:
    """How well a CAM localises, in the CAM's coordinates; a metric is None when it is undefined.

    * ``energy_in_lungs``: share of the CAM's mass inside the lung mask (a model looking outside the
      lungs uses a shortcut).
    * ``pointing_game_hit``: whether the CAM's maximum (its first pixel, in row-major order, on a plateau)
      lies inside the lesion mask grown by ``tolerance`` px (0 = strict; Zhang et al.'s pointing game
      uses 15 px at 224 px).
    * ``iou``: intersection over union of :func:`cam_region` and the lesion mask.

    Undefined: all metrics for an all-zero CAM, lung/lesion metrics without (or with an empty) mask.
    """
    cam = np.asarray(cam, np.float32)
    if cam.ndim != 2:
        raise CovidscanError(f"cam_metrics takes one (H, W) CAM, got shape {cam.shape}")
    if tolerance < 0:
        raise ConfigError(f"pointing-game tolerance {tolerance!r} must be >= 0 pixels")
    lungs = _as_mask(lung_mask, cam.shape, "lung mask")
    lesion = _as_mask(lesion_mask, cam.shape, "lesion mask")
    region = cam_region(cam, threshold=threshold)
    total = float(cam.sum(dtype=np.float64))
    metrics: dict[str, float | bool | None] = dict.fromkeys(("energy_in_lungs", "pointing_game_hit", "iou"))
    if total <= 0.0:
        return metrics
    if lungs is not None:
        metrics["energy_in_lungs"] = float(cam[lungs].sum(dtype=np.float64)) / total
    if lesion is not None:
        if tolerance:
            size = 2 * tolerance + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            target = cv2.dilate(lesion.astype(np.uint8), kernel).astype(bool)
        else:
            target = lesion
        metrics["pointing_game_hit"] = bool(target.flat[int(np.argmax(cam))])
        metrics["iou"] = float((region & lesion).sum()) / float((region | lesion).sum())
    return metrics
