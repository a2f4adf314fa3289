"""The training loop, plain and readable in the spirit of torchvision's ``references/`` scripts.

Data reach the model through torch ``Dataset``/``DataLoader`` pairs, on a device chosen in one place
(``covidscan.system.resolve_device``). Two datasets share one loop:

* :class:`CachedFeatures` (frozen base): backbone features of ``views`` augmented copies of every training
  image are computed once; each epoch the head sees one randomly chosen view per image. The backbone never
  runs again, which is what makes 20–50 epoch schedules cheap on a CPU.
* :class:`AugmentedImages` (fine-tuning, or caching switched off): every epoch re-augments and re-runs the
  whole model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from covidscan.config import TrainConfig
from covidscan.preprocess import seeded


def view_seed(seed: int, index: int, view: int) -> int:
    """A distinct, reproducible seed for every (image, view) pair."""
    return (seed * 1_000_003 + index * 7_919 + view) % (2**63)


class AugmentedImages(Dataset):
    """Prepared float (N, H, W) images through a random ``transform``, reproducible per (image, view).

    ``view`` (set with :meth:`set_view`, e.g. to the epoch) picks which augmented copy each image gets.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, seed: int = 0) -> None:
        self.images, self.labels = images, torch.from_numpy(labels)
        self.transform, self.seed, self.view = transform, seed, 0

    def set_view(self, view: int) -> None:
        """Which augmented copy of every image the next pass yields."""
        self.view = view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.images[i]).unsqueeze(0)
        return seeded(self.transform, image, view_seed(self.seed, i, self.view)), self.labels[i]


class CachedFeatures(Dataset):
    """Cached features (N, views, D): each epoch one view per image, drawn reproducibly from ``seed``."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, seed: int = 0) -> None:
        self.features, self.labels, self.seed = features, torch.from_numpy(labels), seed
        self.pick = torch.zeros(len(features), dtype=torch.long)

    def set_view(self, epoch: int) -> None:
        """Draw the view every image shows in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        self.pick = torch.from_numpy(rng.integers(self.features.shape[1], size=len(self.features)))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i, self.pick[i]], self.labels[i]


def loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``(seed, epoch)``; the data stay in this process."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)


@torch.inference_mode()
def embed(
    model: nn.Module,
    images: np.ndarray,
    transform: Callable,
    *,
    views: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Cache ``model.embed`` outputs of ``views`` transformed copies of each image: (N, views, D) on CPU."""
    model.eval()
    device = device or torch.device("cpu")
    data = AugmentedImages(images, np.zeros(len(images), np.int64), transform, seed)
    chunks: list[list[torch.Tensor]] = []
    with tqdm(total=len(images) * views, desc=desc, disable=not progress, leave=False) as bar:
        for v in range(views):
            data.set_view(v)
            chunks.append([])
            for x, _ in loader(data, batch_size):
                chunks[-1].append(model.embed(x.to(device)).cpu())
                bar.update(len(x))
    return torch.stack([torch.cat(view) for view in chunks], dim=1)


@dataclass
class FitResult:
    """What training produced: the per-epoch history and timing."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False


def _run_epoch(
    module: nn.Module, batches: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer | None,
    device: torch.device,
) -> tuple[float, float]:
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy)."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
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
    train_data: Dataset,
    val_data: Dataset | None,
    cfg: TrainConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> FitResult:
    """Adam + cross-entropy for ``cfg.epochs``; early stopping on validation loss restores the best weights.

    ``train_data`` may have ``set_view(epoch)`` (a fresh augmentation or cached view per epoch); it is
    shuffled reproducibly from ``cfg.seed`` and the epoch. Cross-entropy on logits is the categorical
    cross-entropy of the published 2-way softmax with one-hot labels, computed in a numerically stable way.
    """
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    module.to(device)
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
        if hasattr(train_data, "set_view"):
            train_data.set_view(epoch)
        module.train()
        batches = loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
        train_loss, train_acc = _run_epoch(module, batches, loss_fn, optimizer, device)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        if val_data is not None:
            module.eval()
            val_loss, val_acc = _run_epoch(module, loader(val_data, cfg.batch_size), loss_fn, None, device)
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
    if best_state is not None:
        module.load_state_dict(best_state)  # the best-validation weights, not the last epoch's
    result.seconds = time.perf_counter() - start
    return result
