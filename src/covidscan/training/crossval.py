"""Patient-grouped cross-validation pieces shared by ``adapt`` (which mode a site gets) and ``tune`` (which
settings a preset gets): the groups, the folds, head logits of cached features, and a one-thread scope."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from covidscan import CLASSES


def patient_counts(y: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """Patients (groups) of each class."""
    return {name: len(set(groups[y == i])) for i, name in enumerate(CLASSES)}


def patient_folds(
    y: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped stratified folds, as many as the rarer class's patients allow; [] when under 2."""
    k = min(folds, *patient_counts(y, groups).values())
    if k < 2:
        return []
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def patient_groups(df: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """Patient ids when every row has one, else one group per image; and whether they are patients."""
    if "patient_id" in df and df["patient_id"].notna().all():
        return df["patient_id"].astype(str).to_numpy(), True
    return df["path"].to_numpy(), False


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a head of a few thousand weights trained on a few dozen images spends more
    on thread hand-offs than on arithmetic (one fit: 26 s on 2 threads, 1.9 s on 1, on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def head_logits(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    """Binary logits ``z = logit_covid - logit_non_covid`` of a head on cached features ``(N, D)``."""
    head.eval()
    logits = head(features)
    return (logits[:, 1] - logits[:, 0]).numpy().astype(np.float64)
