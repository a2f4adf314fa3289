"""Which engine serves a run fastest on this CPU: the CPU's instruction sets, and a timed choice, cached.

``--engine auto`` considers the engines a run allows: ``torch`` (at the bf16 policy's precision, see
:func:`covidscan.models.use_bf16`), ``onnx`` where the run holds a ``model.onnx``, and ``int8`` where its
int8 check allowed ``model.int8.onnx``. With more than one, each runs a few batches once per (run, CPU,
library versions, batch size) and the fastest is kept as JSON in covidscan's cache (``engines/``), so later
loads only read that file. A run with nothing exported is served by ``torch`` without any timing.
``compiled`` is never a candidate: compiling costs seconds in every process that loads the run, more than a
short ``predict`` takes, so it is asked for by name (long jobs, servers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidscan.models import bf16_supported
from covidscan.outputs import write_atomic
from covidscan.preprocess import to_model_batch
from covidscan.runs import INT8_FILE, Checkpoint
from covidscan.system import cache_dir, cpu_info, int8_kernels

log = logging.getLogger(__name__)

ENGINES = ("torch", "compiled", "onnx", "int8")
"""The engines a Predictor serves with (Ray is a way to spread one of them, not an engine of its own)."""
TORCH_ENGINES = ("torch", "compiled")
"""The engines that run PyTorch and take channels_last batches."""
_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
             "avx512_bf16": "AVX-512 bf16", "amx_bf16": "AMX bf16", "amx_int8": "AMX int8"}
_TIMED_BATCHES = 3
_MAX_TIMED_BATCH = 32


@cache
def cpu_features() -> dict[str, Any]:
    """The CPU's model, cores and the instruction sets that decide the engines (Linux /proc/cpuinfo)."""
    model, flags = cpu_info()
    return {
        "model": model,
        "cores": os.cpu_count(),
        "features": [name for flag, name in _FEATURES.items() if flag in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bf16_supported(),
        "int8_kernels": int8_kernels(),
    }


def int8_allowed(run_dir: Path, checkpoint: Checkpoint) -> bool:
    """Whether the run's int8 check allowed int8, on a CPU with this one's kind of int8 kernels, and its
    ``model.int8.onnx`` is there."""
    verdict = checkpoint.int8
    if verdict is None or not verdict.allowed or not verdict.holds_here():
        return False
    return (run_dir / INT8_FILE).is_file()


def auto_candidates(
    run_dir: Path | None, checkpoint: Checkpoint, device: torch.device, *, precision: str, fast: bool,
    onnx_path: str | Path | None,
) -> list[str]:
    """The engines ``auto`` may choose among for this run (None: a model in memory, which has no exported
    files) and these settings, ``torch`` first."""
    if onnx_path is not None:
        return ["onnx"]  # a file given by name is the one to use
    if run_dir is None or device.type != "cpu" or precision == "bf16":
        return ["torch"]  # onnxruntime runs here on the CPU and in fp32 or int8 only
    found = ["torch"]
    if (run_dir / "model.onnx").is_file():
        found.append("onnx")
    # fp32 (or the unfolded model) was asked for to get the fp32 numbers: int8 would not give them.
    if precision == "auto" and fast and int8_allowed(run_dir, checkpoint):
        found.append("int8")
    return found


def choose_engine(
    run_dir: Path | None,
    checkpoint: Checkpoint,
    candidates: list[str],
    build: Callable[[str], Callable[[torch.Tensor], object]],
    *,
    batch_size: int,
) -> str:
    """The fastest of ``candidates`` on this CPU: from the cache, else timed now (``build(name)`` makes an
    engine's forward function) and cached. One candidate is returned without any timing."""
    if len(candidates) == 1 or run_dir is None:
        return candidates[0]
    batch = min(batch_size, _MAX_TIMED_BATCH)
    key = _cache_key(run_dir, checkpoint, candidates, batch)
    path = cache_dir("engines") / f"{key}.json"
    cached = _read_choice(path, candidates)
    if cached is not None:
        return cached
    height, width = checkpoint.input_size
    pixels = np.random.default_rng(0).random((batch, height, width), dtype=np.float32)
    rates = {name: _images_per_s(build(name), to_model_batch(pixels, checkpoint.mean, checkpoint.std,
                                                             channels_last=name in TORCH_ENGINES))
             for name in candidates}
    choice = max(rates, key=lambda name: rates[name])
    record = {"choice": choice, "images_per_s": rates, "batch": batch, "run": str(run_dir.resolve()),
              "cpu": cpu_features(), "threads": torch.get_num_threads()}
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    log.info("engine auto: %s on this CPU (%s images/s at batch %d; kept in %s)", choice,
             ", ".join(f"{name} {r:.1f}" for name, r in rates.items()), batch, path)
    return choice


def _images_per_s(forward: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Best of a few timed batches after a warm-up (the first call allocates and picks kernels)."""
    forward(x)
    best = float("inf")
    for _ in range(_TIMED_BATCHES):
        start = time.perf_counter()
        forward(x)
        best = min(best, time.perf_counter() - start)
    return len(x) / max(best, 1e-9)


def _cache_key(run_dir: Path, checkpoint: Checkpoint, candidates: list[str], batch: int) -> str:
    """What the choice depends on: the model and its exported files, the CPU, threads and libraries."""
    import onnxruntime  # the key needs its version; only runs with ONNX files get here

    onnx_file = run_dir / "model.onnx"
    identity = {
        "weights": checkpoint.weights_sha256,
        "int8": checkpoint.int8.sha256 if checkpoint.int8 is not None else None,
        # hashing a large model.onnx at every load would cost more than the choice saves
        "onnx": [onnx_file.stat().st_size, onnx_file.stat().st_mtime_ns] if onnx_file.is_file() else None,
        "candidates": candidates, "batch": batch, "cpu": cpu_features(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _read_choice(path: Path, candidates: list[str]) -> str | None:
    """The cached choice, or None when there is none (or it is unreadable: it is then measured again)."""
    try:
        choice = json.loads(path.read_text(encoding="utf-8")).get("choice")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return choice if choice in candidates else None


__all__ = ["ENGINES", "TORCH_ENGINES", "auto_candidates", "choose_engine", "cpu_features", "int8_allowed"]
