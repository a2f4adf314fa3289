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
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from covidscan.config import TrainConfig
from covidscan.errors import ConfigError
from covidscan.models.align import standardizer
from covidscan.preprocess import seeded
from covidscan.training.checkpointing import TrainingState, rng_states, set_rng_states
from covidscan.training.distributed import (
    all_sum,
    gather,
    is_main,
    launch,
    rank_and_world,
    shard,
    worker_device,
)

log = logging.getLogger(__name__)


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


class EpochShare(Sampler[int]):
    """This process's items of one epoch's shuffle, a permutation drawn from ``(seed, epoch)`` alone.

    Rank ``r`` of ``world`` takes items ``r, r + world, ...``, so the ranks' ``j``-th batches of
    ``batch_size / world`` together are the single process's ``j``-th batch. The permutation is padded with
    its first items to a multiple of ``world`` (as ``DistributedSampler`` does): every rank runs as many
    batches, and a single process sees each item once.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, epoch, rank, world

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        # The draw a shuffling DataLoader makes before its permutation: the orders of earlier versions stay.
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(self.n, generator=generator).tolist()
        order += (order * self.world)[: len(self) * self.world - self.n]
        return iter(order[self.rank :: self.world])


def loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling depends only on ``(seed, epoch)``; the data stay in this process.

    Shuffled, it yields this process's share of global batches of ``batch_size`` (:class:`EpochShare`).
    """
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, num_workers=0)
    rank, world = rank_and_world()
    share = EpochShare(len(dataset), seed, epoch, rank, world)  # type: ignore[arg-type]
    # A generator of its own: loading never draws from torch's global one (dropout's).
    return DataLoader(dataset, batch_size=batch_size // world, sampler=share, generator=torch.Generator(),
                      num_workers=0)


class EmbedSet(NamedTuple):
    """Images to embed with :func:`embed_sets`: ``views`` copies each through ``transform`` (seeded)."""

    images: np.ndarray
    transform: Callable
    views: int = 1
    seed: int = 0
    desc: str = "features"


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
    nproc: int = 1,
) -> torch.Tensor:
    """Cache ``model.embed`` outputs of ``views`` transformed copies of each image: (N, views, D) on CPU."""
    return embed_sets(model, [EmbedSet(images, transform, views, seed, desc)], batch_size=batch_size,
                      device=device, progress=progress, nproc=nproc)[0]


def embed_sets(
    model: nn.Module, sets: Sequence[EmbedSet], *, batch_size: int = 32, device: torch.device | None = None,
    progress: bool = True, nproc: int = 1,
) -> list[torch.Tensor]:
    """:func:`embed` of several image sets, in one start of the workers when ``nproc`` > 1.

    Then each of ``nproc`` processes (:func:`~covidscan.training.distributed.launch`) embeds a contiguous
    block of every set, with the same per-image augmentation seeds as one process, and the blocks are
    gathered in order.
    """
    device = device or torch.device("cpu")
    if nproc > 1:
        blocks = launch(_embed_rank, nproc, device, model, list(sets), batch_size, device, progress)
        return [torch.cat([torch.from_numpy(blocks[rank][i]) for rank in range(nproc)])
                for i in range(len(sets))]
    return [_embed_rows(model, s, np.arange(len(s.images)), batch_size, device, progress) for s in sets]


@torch.inference_mode()
def _embed_rows(
    model: nn.Module, todo: EmbedSet, rows: np.ndarray, batch_size: int, device: torch.device, progress: bool
) -> torch.Tensor:
    """The features of the images of ``todo`` at ``rows`` (seeded by their place in the whole set)."""
    model.eval()
    data = AugmentedImages(todo.images, np.zeros(len(todo.images), np.int64), todo.transform, todo.seed)
    chunks: list[list[torch.Tensor]] = []
    with tqdm(total=len(rows) * todo.views, desc=todo.desc, disable=not progress, leave=False) as bar:
        for v in range(todo.views):
            data.set_view(v)
            chunks.append([])
            for x, _ in loader(Subset(data, rows.tolist()), batch_size):
                chunks[-1].append(model.embed(x.to(device)).cpu())
                bar.update(len(x))
    return torch.stack([torch.cat(view) for view in chunks], dim=1)


def _embed_rank(
    model: nn.Module, sets: list[EmbedSet], batch_size: int, device: torch.device, progress: bool
) -> list[np.ndarray]:
    """One worker of a sharded :func:`embed_sets`: the features of this rank's block of every set."""
    rank, world = rank_and_world()
    device = worker_device(device)
    model.to(device)
    progress = progress and rank == 0
    return [_embed_rows(model, s, shard(len(s.images), rank, world), batch_size, device, progress).numpy()
            for s in sets]


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
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy) over every process."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.set_grad_enabled(optimizer is not None):
            logits = module(x)
            loss = loss_fn(logits, y)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DistributedDataParallel averages the gradients of the ranks' shares here
            optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    total_loss, correct, count = all_sum([total_loss, correct, count], device)
    return total_loss / max(count, 1), correct / max(count, 1)


def fit(
    module: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    cfg: TrainConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    training_state: TrainingState | None = None,
    nproc: int = 1,
) -> FitResult:
    """Adam + cross-entropy for ``cfg.epochs``; early stopping on validation loss restores the best weights.

    ``train_data`` may have ``set_view(epoch)`` (a fresh augmentation or cached view per epoch); it is
    shuffled reproducibly from ``cfg.seed`` and the epoch. Cross-entropy on logits is the categorical
    cross-entropy of the published 2-way softmax with one-hot labels, computed in a numerically stable way.

    ``training_state`` saves the whole state after every epoch and, when it resumes, continues the saved run
    exactly where it stopped (same weights at the end as an uninterrupted run). ``nproc`` > 1 trains in that
    many processes with DistributedDataParallel, each on its share of every global batch of
    ``cfg.batch_size``; ``module`` then gets rank 0's final weights.
    """
    device = device or torch.device("cpu")
    if nproc > 1:
        if cfg.batch_size % nproc:
            raise ConfigError(f"--nproc {nproc}: train.batch_size {cfg.batch_size} must be a multiple of the "
                              "number of processes (each takes an equal share of every batch)")
        results = launch(_fit_rank, nproc, device, module, train_data, val_data, cfg, device, progress,
                         training_state)
        weights, result = results[0]
        module.load_state_dict(weights)
        return result
    rank, world = rank_and_world()
    torch.manual_seed(cfg.seed + rank)  # each rank its own dropout masks
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    result = FitResult()
    best_loss, best_state, waited, first = float("inf"), None, 0, 1
    saved = training_state.load() if training_state is not None else None
    if saved is not None:
        module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        if len(saved["rng"]) == world:
            set_rng_states(saved["rng"][rank])
        else:
            log.warning("resumed on %d processes, interrupted on %d: the random draws (dropout) of the "
                        "remaining epochs differ from an uninterrupted run's", world, len(saved["rng"]))
        best_loss, best_state, waited = saved["best_loss"], saved["best_module"], saved["waited"]
        result = FitResult(saved["history"], saved["best_epoch"], saved["seconds"], saved["stopped_early"])
        first = cfg.epochs + 1 if result.stopped_early else saved["epoch"] + 1
    # Wrapped after loading: DistributedDataParallel starts every rank from rank 0's weights.
    trained = DistributedDataParallel(module) if world > 1 else module
    start = time.perf_counter() - result.seconds
    bar = tqdm(range(first, cfg.epochs + 1), desc="train", disable=not progress or rank > 0, leave=False)
    for epoch in bar:
        if hasattr(train_data, "set_view"):
            train_data.set_view(epoch)
        module.train()
        batches = loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch)
        train_loss, train_acc = _run_epoch(trained, batches, loss_fn, optimizer, device)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        if val_data is not None:
            module.eval()
            share = Subset(val_data, shard(len(val_data), rank, world).tolist())  # type: ignore[arg-type]
            val_loss, val_acc = _run_epoch(module, loader(share, cfg.batch_size), loss_fn, None, device)
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
        result.stopped_early = cfg.early_stopping is not None and waited >= cfg.early_stopping
        result.seconds = time.perf_counter() - start
        if training_state is not None:
            generators = gather(rng_states())  # every rank's, so that each continues its own draws
        if training_state is not None and rank == 0:  # one writer: the file is never written concurrently
            training_state.save({
                "epoch": epoch, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": generators, "best_loss": best_loss, "best_module": best_state, "waited": waited,
                "best_epoch": result.best_epoch, "history": result.history, "seconds": result.seconds,
                "stopped_early": result.stopped_early,
            })
        if result.stopped_early:
            break
    if best_state is not None:
        module.load_state_dict(best_state)  # the best-validation weights, not the last epoch's
    result.seconds = time.perf_counter() - start
    return result


def fit_head(
    head: nn.Module, train_data: CachedFeatures, val_data: CachedFeatures | None, cfg: TrainConfig, *,
    standardize: bool | np.ndarray = False, **options,
) -> FitResult:
    """:func:`fit` of a head's trainable part on cached features (``options`` are ``fit``'s).

    With ``standardize`` it learns on the features standardised by the training features' mean and
    standard deviation, as a scikit-learn ``StandardScaler`` would give them: features that vary little
    around large means (a chest-CT encoder's) no longer slow or stall Adam. The map is then folded into the
    head's first linear layer, so the fitted head takes the raw features like any other. A boolean array
    standardises only the features it marks (an ensemble's members that were trained standardised).
    """
    if not np.any(standardize):
        return fit(head, train_data, val_data, cfg, **options)
    features = train_data.features
    scaler = standardizer(features.reshape(-1, features.shape[-1]).numpy(),
                          None if isinstance(standardize, bool) else standardize)

    def scaled(data: CachedFeatures) -> CachedFeatures:
        x = data.features
        x = torch.from_numpy(scaler.transform(x.reshape(-1, x.shape[-1]).numpy())).float().reshape(x.shape)
        return CachedFeatures(x, data.labels.numpy(), data.seed)

    result = fit(head, scaled(train_data), None if val_data is None else scaled(val_data), cfg, **options)
    scaler.fold_into(head)
    return result


def _fit_rank(
    module: nn.Module, train_data: Dataset, val_data: Dataset | None, cfg: TrainConfig, device: torch.device,
    progress: bool, training_state: TrainingState | None,
) -> tuple[dict[str, torch.Tensor], FitResult] | None:
    """One worker of a distributed :func:`fit`; rank 0 returns the final weights (on the CPU) and result."""
    # Spawned workers receive tensors in memory shared with each other: every rank trains its own copy.
    module = copy.deepcopy(module)
    result = fit(module, train_data, val_data, cfg, device=worker_device(device), progress=progress,
                 training_state=training_state)
    return ({k: v.cpu() for k, v in module.state_dict().items()}, result) if is_main() else None
