"""Classification heads of the two papers. Every head returns LOGITS for ``covidscan.CLASSES``.

The papers end with a 2-way softmax trained with categorical cross-entropy on one-hot labels. Here the
softmax is left to the loss: ``nn.CrossEntropyLoss(logits, index)`` == ``-log softmax(logits)[index]`` ==
categorical cross-entropy of the softmax output against the one-hot label, but numerically stabler. Apply
``logits.softmax(1)`` at prediction time to get the published probabilities.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from timm.layers.adaptive_avgmax_pool import AdaptiveCatAvgMaxPool2d
from torch import nn

from covidscan import CLASSES
from covidscan.models.config import Pooling

NUM_CLASSES = len(CLASSES)


def global_pool(pooling: Pooling = "avg") -> nn.Module:
    """The parameter-free pooling a pooled head starts with. ``avgmax`` is timm's average and maximum side by
    side, ``(N, C, h, w)`` -> ``(N, 2C, 1, 1)``: the average says how much of a pattern the image holds, the
    maximum how strongly its strongest spot shows it (a small lesion barely moves an average)."""
    if pooling == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if pooling == "max":
        return nn.AdaptiveMaxPool2d(1)
    return AdaptiveCatAvgMaxPool2d(1)


def pooled_width(channels: int, pooling: Pooling = "avg") -> int:
    """Features per image after :func:`global_pool` of a ``channels``-channel map."""
    return 2 * channels if pooling == "avgmax" else channels


def paper_a_head(
    in_channels: int, hidden: int = 256, dropout: float = 0.3, pooling: Pooling = "avg"
) -> nn.Sequential:
    """Paper A (CT, ResNet50): avg pool -> Linear(C, hidden) -> ReLU -> Linear(hidden, 2) -> Dropout.

    ``pooling`` other than the published ``avg`` replaces the first step (:func:`global_pool`)."""
    # This is the published order: dense -> ReLU -> dense -> dropout 0.3 -> softmax. Dropout therefore acts on
    # the logits (during training only); unusual, but kept as published.
    return nn.Sequential(
        OrderedDict(
            pool=global_pool(pooling),
            flatten=nn.Flatten(),
            fc1=nn.Linear(pooled_width(in_channels, pooling), hidden),
            relu=nn.ReLU(),
            fc2=nn.Linear(hidden, NUM_CLASSES),
            dropout=nn.Dropout(dropout),
        )
    )


def mlp_head(in_features: int, hidden: Sequence[int]) -> nn.Sequential:
    """Flatten -> (Linear -> ReLU) per hidden size -> Linear(., 2).

    Paper B (X-ray, VGG19 / MobileNet): ``hidden=(512, 256)`` on the flattened feature map (512x7x7 = 25088
    for VGG19 at 224 px). BPNN baseline (paper A): ``hidden=(512, 256, 128, 64)`` on the flattened pixels.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for i, size in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, size)
        layers[f"relu{i}"] = nn.ReLU()
        width = size
    layers["out"] = nn.Linear(width, NUM_CLASSES)
    return nn.Sequential(layers)


def linear_head(in_channels: int, pooling: Pooling = "avg") -> nn.Sequential:
    """Cheap baseline: global pool (average unless ``pooling`` says otherwise) -> Linear(C, 2)."""
    return nn.Sequential(
        OrderedDict(
            pool=global_pool(pooling),
            flatten=nn.Flatten(),
            fc=nn.Linear(pooled_width(in_channels, pooling), NUM_CLASSES),
        )
    )
