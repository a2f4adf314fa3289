"""Resumable training: a run killed after epoch k continues to exactly the weights of an uninterrupted run;
the state on disk survives a crash mid-write; a resume on other data or another config is refused."""

from __future__ import annotations

import os
import random
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.config import TrainConfig, load_config
from covidscan.errors import ConfigError, StorageError
from covidscan.training import train_experiment
from covidscan.training.checkpointing import TrainingState, data_fingerprint, state_path
from covidscan.training.engine import CachedFeatures, fit


class Killed(Exception):
    """Stands for the process being killed at that point."""


def kill_after(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make training die right after the state of ``epoch`` is saved."""
    save = TrainingState.save

    def save_then_die(self: TrainingState, state: dict) -> None:
        save(self, state)
        if state["epoch"] == epoch:
            raise Killed

    monkeypatch.setattr(TrainingState, "save", save_then_die)


def features(n: int, views: int, seed: int) -> CachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, views, 16, generator=gen)
    return CachedFeatures(x, (x[:, 0, 0] > 0).numpy().astype(np.int64), seed)


def head(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # dropout makes the resume depend on the saved random generators too
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))


def test_fit_killed_after_epoch_k_resumes_to_the_uninterrupted_weights(tmp_path: Path, monkeypatch):
    cfg = TrainConfig(epochs=5, batch_size=8, lr=0.02)
    train, val = features(40, 3, 0), features(16, 1, 1)
    state = TrainingState(state_path(tmp_path / "whole"), data_fingerprint(train.features), cfg.model_dump())
    whole = head(0)
    expected = fit(whole, train, val, cfg, progress=False, training_state=state)

    path = state_path(tmp_path / "killed")
    killed = TrainingState(path, state.data, state.config)
    kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        fit(head(0), train, val, cfg, progress=False, training_state=killed)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 2
    random.seed(7)  # a new process: its generators are elsewhere
    np.random.seed(7)
    torch.manual_seed(7)
    resumed = head(123)  # other initial weights: they must all come from the state
    result = fit(resumed, train, val, cfg, progress=False, training_state=replace(killed, resume=True))

    for name, weight in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weight), name  # max |Δw| == 0
    assert result.history == expected.history and result.best_epoch == expected.best_epoch


class HalfWriter:
    """A file that takes half of what it is given and then dies (a kill or power cut mid-write)."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data) -> None:
        self.handle.write(bytes(data)[: len(data) // 2])
        raise Killed


def test_a_crash_while_writing_leaves_the_previous_state_whole(tmp_path: Path, monkeypatch):
    path = state_path(tmp_path)
    saved = TrainingState(path, "data", {"lr": 1})
    saved.save({"epoch": 1, "w": torch.ones(1000)})
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(fdopen(fd, mode)))
    with pytest.raises(Killed):
        saved.save({"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    state = replace(saved, resume=True).load()
    assert state is not None and state["epoch"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no side file left behind

    # A torn file (what a writer straight into state.pt leaves) is refused, not loaded.
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(StorageError, match=r"cannot read the training state .*state\.pt.*--overwrite"):
        replace(saved, resume=True).load()


def test_concurrent_saves_never_tear_the_state(tmp_path: Path):
    """Writers never share a file (the cause of torch.save's "unexpected pos"): the last whole one wins."""
    saved = TrainingState(state_path(tmp_path), "data", {})
    threads = [threading.Thread(target=lambda i=i: [saved.save({"epoch": i, "w": torch.full((5000,), i)})
                                                  for _ in range(3)]) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = replace(saved, resume=True).load()
    assert state is not None and torch.equal(state["w"], torch.full((5000,), state["epoch"]))
    assert [p.name for p in state_path(tmp_path).parent.iterdir()] == ["state.pt"]


def test_data_fingerprint_tells_arrays_apart():
    images = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert data_fingerprint(images) == data_fingerprint(images.copy())
    assert data_fingerprint(images) != data_fingerprint(images.reshape(2, 4, 3))  # same bytes, other shape
    assert data_fingerprint(images) != data_fingerprint(images[::-1])
    assert data_fingerprint(np.zeros((0, 3, 4))) != data_fingerprint(np.zeros((0, 4, 3)))  # an empty split


def test_resume_refuses_other_data_or_config(tmp_path: Path):
    saved = TrainingState(state_path(tmp_path), "data-a", {"train": {"lr": 0.001, "epochs": 5}})
    saved.save({"epoch": 1})
    with pytest.raises(ConfigError, match=r"config differs .*train\.lr: 0\.001 -> 0\.01"):
        replace(saved, config={"train": {"lr": 0.01, "epochs": 5}}, resume=True).load()
    with pytest.raises(ConfigError, match="training data differ"):
        replace(saved, data="data-b", resume=True).load()
    with pytest.raises(ConfigError, match="no interrupted training"):
        TrainingState(state_path(tmp_path / "none"), "data-a", {}, resume=True).load()


BPNN = ["model.input_size=32", "train.epochs=3", "evaluation.n_bootstrap=20"]


def covidscan(*args: str):
    return CliRunner().invoke(app, ["-q", *args], prog_name="covidscan")


@pytest.mark.slow
def test_train_resume_from_the_command_line(phantom_manifest: Path, tmp_path: Path, monkeypatch):
    whole = train_experiment(load_config("paper-a-bpnn", BPNN), phantom_manifest, tmp_path / "whole",
                             progress=False)
    run = tmp_path / "run"
    kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        train_experiment(load_config("paper-a-bpnn", BPNN), phantom_manifest, run, progress=False)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stage left over
    assert [p.name for p in run.iterdir()] == [".training"]

    sets = [f"--set={s}" for s in BPNN]
    retrain = covidscan("train", "paper-a-bpnn", "--data", str(phantom_manifest), "--out", str(run), *sets)
    assert retrain.exit_code == 2 and f"--resume {run}" in retrain.output

    other = tmp_path / "other.csv"
    table = pd.read_csv(phantom_manifest).iloc[2:]
    table["path"] = [str(phantom_manifest.parent / p) for p in table["path"]]
    table.to_csv(other, index=False)
    refused = covidscan("train", "paper-a-bpnn", "--data", str(other), "--resume", str(run), *sets)
    assert refused.exit_code == 2 and "training data differ" in refused.output
    refused = covidscan("train", "paper-a-bpnn", "--data", str(phantom_manifest), "--resume", str(run), *sets,
                        "--set", "train.lr=0.01")
    assert refused.exit_code == 2 and "train.lr: 0.001 -> 0.01" in refused.output

    resumed = covidscan("train", "paper-a-bpnn", "--data", str(phantom_manifest), "--resume", str(run), *sets)
    assert resumed.exit_code == 0, resumed.output
    assert not (run / ".training").exists()
    expected, got = load_file(whole.run_dir / "model.safetensors"), load_file(run / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (run / "history.json").read_text() == (whole.run_dir / "history.json").read_text()
