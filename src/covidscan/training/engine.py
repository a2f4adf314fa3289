"""The training loop, plain and readable in the spirit of torchvision's ``references/`` scripts.

Two paths share one loop:

* **cached** (frozen base): backbone features of ``views`` augmented copies of every training image are
  computed once; each epoch the head sees one randomly chosen view per image. The backbone never runs
  again, which is what makes 20–50 epoch schedules cheap on a CPU.
* **full** (fine-tuning, or caching switched off): every epoch re-augments and re-runs the whole model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from covidscan.config import TrainConfig
from covidscan.preprocess import seeded

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> float (1, H, W) in [0, 1]."""
    return torch.from_numpy(pixels).unsqueeze(0).float().div_(255.0)


def view_seed(seed: int, index: int, view: int) -> int:
    """A distinct, reproducible seed for every (image, view) pair."""
    return (seed * 1_000_003 + index * 7_919 + view) % (2**63)


def transform_batch(images: np.ndarray, idx: np.ndarray, transform, seed: int, view: int) -> torch.Tensor:
    """Apply ``transform`` to each image of ``idx`` with its own seed; stack into a batch."""
    return torch.stack(
        [seeded(transform, image_tensor(images[i]), view_seed(seed, int(i), view)) for i in idx]
    )


@torch.inference_mode()
def embed(
    model: nn.Module,
    images: np.ndarray,
    transform,
    *,
    views: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Cache ``model.embed`` outputs of ``views`` transformed copies of each image: (N, views, D)."""
    model.eval()
    n = len(images)
    out: torch.Tensor | None = None
    bar = tqdm(total=n * views, desc=desc, disable=not progress, leave=False)
    for v in range(views):
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            feats = model.embed(transform_batch(images, idx, transform, seed, v))
            if out is None:
                out = torch.empty((n, views, feats.shape[1]), dtype=feats.dtype)
            out[idx, v] = feats
            bar.update(len(idx))
    bar.close()
    assert out is not None
    return out


@dataclass
class FitResult:
    """What training produced: the per-epoch history and timing."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def _run_epoch(
    module: nn.Module, batches, loss_fn: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy)."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        with torch.set_grad_enabled(optimizer is not None):
            logits = module(x)
            loss = loss_fn(logits, y)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return total_loss / max(count, 1), correct / max(count, 1)


def fit(
    module: nn.Module,
    train_batches: Batches,
    val_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None,
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> FitResult:
    """Adam + cross-entropy for ``cfg.epochs``; early stopping on validation loss restores the best weights.

    Cross-entropy on logits is the categorical cross-entropy of the published 2-way softmax with one-hot
    labels, computed in a numerically stable way.
    """
    torch.manual_seed(cfg.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    result = FitResult()
    best_loss, best_state, waited = float("inf"), None, 0
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", disable=not progress, leave=False)
    for epoch in bar:
        module.train()
        train_loss, train_acc = _run_epoch(module, train_batches(epoch), loss_fn, optimizer)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        if val_batches is not None:
            module.eval()
            val_loss, val_acc = _run_epoch(module, val_batches(), loss_fn, None)
            row.update(val_loss=val_loss, val_acc=val_acc)
            if val_loss < best_loss - 1e-6:
                best_loss, waited, result.best_epoch = val_loss, 0, epoch
                best_state = copy.deepcopy(module.state_dict())
            else:
                waited += 1
        else:
            result.best_epoch = epoch
        result.history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
        if cfg.early_stopping is not None and waited >= cfg.early_stopping:
            result.stopped_early = True
            break
    if cfg.early_stopping is not None and best_state is not None:
        module.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result
