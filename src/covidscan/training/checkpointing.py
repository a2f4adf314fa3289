"""Resumable training: the state of a run after each epoch, written so that a crash never corrupts it.

The state (weights, optimiser, epoch, the python/numpy/torch random generators, the best-so-far weights and
the history) lives in ``RUN/.training/state.pt`` while the run trains and disappears with the finished run
(the run folder is swapped in whole, see :func:`covidscan.outputs.staged_folder`). It carries fingerprints of
the training data and of the config: ``covidscan train --resume RUN`` on other data or another config is
refused, naming what changed.

Writing: the state is serialised into memory first, then written to a uniquely named side file in the same
folder, flushed to disk (fsync) and renamed over the old state (``os.replace``), and the folder is synced.
A crash at any point leaves either the previous state or the new one, never half a file; only rank 0 of a
distributed run writes (the caller's duty, see :func:`covidscan.training.engine.fit`).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidscan.errors import ConfigError, StorageError
from covidscan.outputs import write_atomic, writing

STATE_DIR = ".training"
STATE_FILE = "state.pt"
FORMAT = 1


def state_path(run: str | Path) -> Path:
    """Where the training state of the run folder ``run`` is kept while it trains."""
    return Path(run) / STATE_DIR / STATE_FILE


def data_fingerprint(*arrays: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of the arrays' shapes, types and bytes: the exact data a fit sees, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else array)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.reshape(-1).view(np.uint8))  # no copy; an empty split hashes as its shape alone
    return digest.hexdigest()


def rng_states() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) random generators' states, as plain python data (they
    travel between processes and are loaded with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back the generators saved by :func:`rng_states`."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


def _changed(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted settings whose values differ between two config dumps, as ``key: old -> new``."""
    changes = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changed(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


@dataclass(frozen=True)
class TrainingState:
    """Saves and restores the training state of one run (``path``: see :func:`state_path`).

    ``data`` is the training data's fingerprint (:func:`data_fingerprint`) and ``config`` the config as
    plain data (``cfg.model_dump(mode="json")``); ``resume`` says whether a saved state is continued.
    """

    path: Path
    data: str
    config: dict[str, Any]
    resume: bool = False

    def load(self) -> dict[str, Any] | None:
        """The saved state to continue (None unless ``resume``); refuses one of other data or config."""
        if not self.resume:
            return None
        run = self.path.parent.parent
        if not self.path.is_file():
            raise ConfigError(f"--resume {run}: no interrupted training there (no {self.path}); train it "
                              "without --resume")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, corrupt or foreign file: torch raises several kinds
            raise StorageError(f"cannot read the training state {self.path}: {exc}; start the run again with "
                               "--overwrite instead of --resume") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise StorageError(f"{self.path} is not a covidscan training state; start the run again with "
                               "--overwrite instead of --resume")
        changes = _changed(state["config"], self.config)
        if changes:
            raise ConfigError(f"cannot resume {run}: its config differs from the interrupted run's "
                              f"({'; '.join(changes)}); resume with the same config, or start again with "
                              "--overwrite")
        if state["data"] != self.data:
            raise ConfigError(f"cannot resume {run}: the training data differ from the interrupted run's "
                              "(other images, labels, split or preprocessing); resume with the same data, or "
                              "start again with --overwrite")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (with this run's fingerprints) atomically: the old state or the new, never half."""
        buffer = io.BytesIO()  # serialise completely before touching the disk
        torch.save({**state, "format": FORMAT, "data": self.data, "config": self.config}, buffer)
        folder = self.path.parent
        with writing(self.path, "the training state "):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                write_atomic(self.path, buffer.getvalue(), durable=True)
            except BaseException:
                if not self.path.exists():  # nothing saved yet: leave the run folder as it was found
                    with suppress(OSError):
                        folder.rmdir()
                raise
            _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
