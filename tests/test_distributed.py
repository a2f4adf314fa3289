"""Training in several processes (torch's elastic launcher, gloo on the CPU) gives what one process gives.

The tests that start two real worker processes are ``slow``: most of their time is the workers' imports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from covidscan.config import TrainConfig, load_config
from covidscan.models import build_model
from covidscan.preprocess import eval_transform, train_transform
from covidscan.training.checkpointing import TrainingState, state_path
from covidscan.training.engine import EmbedSet, EpochShare, embed_sets, fit, loader


@pytest.mark.parametrize("n", [16, 21])
def test_the_ranks_batches_together_are_the_single_process_batches(n: int):
    data = TensorDataset(torch.arange(n))
    seeded = torch.Generator().manual_seed(2 * 100_003 + 5)  # how earlier versions shuffled epoch 5 of seed 2
    old = DataLoader(data, batch_size=6, shuffle=True, generator=seeded)
    single = [b[0].tolist() for b in loader(data, 6, shuffle=True, seed=2, epoch=5)]
    assert single == [b[0].tolist() for b in old]  # the order of earlier versions
    for world in (2, 3):
        shares = [list(EpochShare(n, 2, 5, rank, world)) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # as many batches on every rank
        b = 6 // world
        for j, batch in enumerate(single):
            together = [i for share in shares for i in share[j * b : (j + 1) * b]]
            if len(batch) == 6:
                assert sorted(together) == sorted(batch)
            else:  # the last, short batch: its items plus the padding (fewer than `world` repeats)
                assert set(batch) <= set(together) and len(together) - len(batch) < world


def mlp() -> nn.Module:
    """No dropout: each rank would draw its own masks, a different (equally valid) random run."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one_on_the_same_global_batch(tmp_path: Path):
    gen = torch.Generator().manual_seed(0)
    x, xv = torch.randn(32, 16, generator=gen), torch.randn(8, 16, generator=gen)
    train, val = TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(xv, (xv[:, 0] > 0).long())
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01)
    one, two = mlp(), mlp()
    expected = fit(one, train, val, cfg, progress=False)
    saved = TrainingState(state_path(tmp_path), "data", cfg.model_dump())
    result = fit(two, train, val, cfg, progress=False, nproc=2, training_state=saved)

    # Gradients are averaged over the ranks' halves of each batch: equal up to float summation order.
    for name, weight in one.state_dict().items():
        assert torch.allclose(two.state_dict()[name], weight, atol=1e-6, rtol=0), name
    assert [r["epoch"] for r in result.history] == [1, 2]
    for got, want in zip(result.history, expected.history, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    # Rank 0 alone wrote the state, whole: it holds the final epoch, and nothing else is in the folder.
    assert [p.name for p in state_path(tmp_path).parent.iterdir()] == ["state.pt"]
    assert torch.load(state_path(tmp_path), weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_sharded_features_equal_single_process_features():
    cfg = load_config("paper-a-resnet50", ["model.backbone=timm:resnet18", "model.weights=none",
                                           "model.input_size=64"])
    model = build_model(cfg.model)
    images = np.random.default_rng(0).random((11, 64, 64), dtype=np.float32)  # not a multiple of 2
    sets = [  # augmented training views, and plain validation images: both in one start of the workers
        EmbedSet(images, train_transform("paper_a", model.input_size, mean=model.mean, std=model.std), 2, 3),
        EmbedSet(images[:5], eval_transform(model.input_size, mean=model.mean, std=model.std)),
    ]
    single = embed_sets(model, sets, batch_size=4, progress=False)
    sharded = embed_sets(model, sets, batch_size=4, progress=False, nproc=2)
    assert [f.shape[:2] for f in sharded] == [f.shape[:2] for f in single] == [(11, 2), (5, 1)]
    # Same images, same augmentation seeds; only the batches differ (BLAS may sum in another order).
    for got, want in zip(sharded, single, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
