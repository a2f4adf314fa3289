"""Several training processes on one machine, started the way ``torchrun --standalone`` starts them.

:func:`launch` runs a function in ``nproc`` worker processes through torch's elastic launcher (a c10d
rendezvous on a free local port, no restarts) with a process group already set up: gloo on the CPU, nccl on
CUDA (one GPU per rank). Inside a worker, :func:`rank_and_world` says who it is; outside, it is ``(0, 1)``,
so the same training loop serves one process and many.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from covidscan.errors import ConfigError, CovidscanError


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` outside a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True in the one process that writes checkpoints, logs and progress bars (rank 0)."""
    return rank_and_world()[0] == 0


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over every process (unchanged in a single process)."""
    if rank_and_world()[1] == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (``[value]`` in a single process)."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """The contiguous block of ``range(n)`` that ``rank`` handles (the blocks in rank order: ``range(n)``)."""
    return np.array_split(np.arange(n), world)[rank]


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse a process count this machine cannot run (CUDA: at most one process per GPU)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give 1 or more processes")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) here; give at most that "
                          "many processes, or train on the CPU (--set train.device=cpu)")


def worker_device(device: torch.device) -> torch.device:
    """The device of this worker: its own GPU (``LOCAL_RANK``) on CUDA, else ``device``."""
    if device.type != "cuda":
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def launch(fn: Callable[..., Any], nproc: int, device: torch.device, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` processes joined in one process group; returns ``{rank: result}``.

    Arguments and results travel pickled (spawned processes), so ``fn`` must be a module-level function.
    A worker that fails makes this raise a :class:`CovidscanError` naming the rank and its error.
    """
    check_nproc(nproc, device)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn", monitor_interval=0.1,
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        return elastic_launch(config, _joined)(fn, backend, logging.getLogger().level, *args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = failure.message  # the worker's "Type: text", inside a dict with its traceback
        message = message.get("message", message) if isinstance(message, dict) else message
        raise CovidscanError(f"training process {rank} of {nproc} failed: {message}") from None


@record  # the worker's exception reaches the parent's ChildFailedError
def _joined(fn: Callable[..., Any], backend: str, log_level: int, *args: Any) -> Any:
    """A worker's body: join the process group, run ``fn``, leave the group (rank 0 keeps the log level)."""
    dist.init_process_group(backend)
    if backend == "gloo":  # the CPU's cores shared among the workers, not each taking them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    logging.getLogger().setLevel(log_level if dist.get_rank() == 0 else logging.WARNING)
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()
