"""Process-wide settings: the compute device and the CPU's features, covidscan's cache folder, glibc's
allocator, how long OpenMP's idle threads spin, and whether another process still runs."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import socket
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from covidscan.errors import ConfigError, StorageError

if TYPE_CHECKING:
    import torch

# glibc's mallopt parameters and defaults (malloc.h): no more than M_MMAP_MAX chunks from mmap; free memory
# at the heap top above M_TRIM_THRESHOLD bytes goes back to the system.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP = 2**31 - 1  # mallopt takes an int
# libgomp's idle threads spin this many times before they sleep (its default with free cores is 300,000).
SPIN_COUNT = 20_000


@cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory(enable: bool = True) -> bool:
    """Serve large tensors from the heap and keep freed memory for reuse (glibc only); ``False`` elsewhere.

    By default glibc maps every allocation over 32 MiB (a ResNet50 activation at batch 32 is 100 MiB) with
    a fresh ``mmap`` and unmaps it when freed, so each layer of each batch page-faults its output in again.
    On a 2-core VM that kernel time slowed a ResNet50 batch-32 forward pass from 19.9 to 11.2 images/s
    (``benchmarks/bench_predict.py`` with and without ``--default-malloc``).
    ``enable=False`` restores glibc's defaults. The price is a process that keeps its peak memory.
    """
    libc = _libc()
    if libc is None:
        return False
    mmap_max, trim = (0, _KEEP) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))


def short_spin_waits(spins: int = SPIN_COUNT) -> bool:
    """Let PyTorch's OpenMP threads sleep soon after a parallel region instead of spinning for milliseconds.

    ``predict`` decodes images in threads while the model runs; libgomp's spinning threads take the cores
    those threads need. On the 2-core AMD EPYC VM (2026-12-06) end-to-end ``predict`` on 96 ucsd-ct files
    with the torch engine went from 68-72 to 79-81 images/s with ``GOMP_SPINCOUNT=20000``, and the model
    alone stayed at 162-167 images/s. libgomp reads the variable once, when PyTorch loads it, so this must
    run before ``import torch``; it returns whether the setting is in force. A ``GOMP_SPINCOUNT`` (or
    ``OMP_WAIT_POLICY``) already in the environment is the user's choice and is left alone.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    if "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(int(spins))
    return True


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts): a folder or lease named
    after a process that is gone was left by a killed command. On Windows always True (never guessed)."""
    if os.name == "nt":
        return True  # there os.kill(pid, 0) would send the process group a Ctrl+C, not test for the pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_device(name: str = "cpu") -> torch.device:
    """The one place a device is chosen: ``cpu`` (default), ``cuda`` or ``auto`` (CUDA when present)."""
    import torch  # here, not at the top: the command line imports this module before it needs torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; use the CPU "
                          "(--set train.device=cpu, or train.device: cpu in the config) or auto")
    return torch.device(name)


def cache_dir(*parts: str) -> Path:
    """A folder under covidscan's cache (``$COVIDSCAN_CACHE``, else ``~/.cache/covidscan``), created."""
    root = Path(os.environ.get("COVIDSCAN_CACHE") or Path.home() / ".cache" / "covidscan")
    folder = root.joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the cache folder {folder}: {exc.strerror or exc}; set COVIDSCAN_CACHE to a "
            "writable folder"
        ) from None
    return folder


@cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU's model name and instruction-set flags (Linux ``/proc/cpuinfo``; elsewhere the platform's
    name and no flags, so that nothing relying on a flag is chosen)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor(), frozenset()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = frozenset(" ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)).split())
    return (model.group(1).strip() if model else platform.processor()), flags


def inaccessible(paths: list[tuple[str, str, int]]) -> tuple[str, list[tuple[str, str, str]]] | None:
    """Those of ``paths`` (what it is, the path, an ``os.access`` mode) that this process cannot use so, as
    this host's name and (what, path, "not there" / "not readable" / "not writable") each; None when it can
    use all. Run on another machine (a Ray task) to learn all it lacks at once; it imports nothing heavy."""
    lacking = []
    for what, path, mode in paths:
        if not os.access(path, mode):
            state = "not readable" if mode == os.R_OK else "not writable"
            lacking.append((what, path, state if os.path.exists(path) else "not there"))
    return (socket.gethostname(), lacking) if lacking else None


INT8_KERNELS = ("vnni", "saturating", "other")
"""onnxruntime's kinds of int8 (U8S8) matrix product, see :func:`int8_kernels`."""


def int8_kernels_of(machine: str, flags: frozenset[str]) -> str:
    """The kind of int8 matrix product onnxruntime runs on a CPU of this architecture and these flags.

    ``vnni``: x86 with AVX-512 VNNI, AVX-VNNI or AMX, whose instructions add each u8 x s8 product into 32
    bits: the exact result of the quantised model. ``saturating``: x86 without them, where VPMADDUBSW adds
    pairs of products into 16 bits, which clip (``benchmarks/measure_int8_kernels.py``: on such a CPU a run's
    int8 model moved 35 of 203 test labels, computed exactly 9). ``other``: anything else (Arm, or a CPU
    whose flags cannot be read)."""
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "other"
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "vnni"
    return "saturating" if "avx2" in flags else "other"


@cache
def int8_kernels() -> str:
    """This CPU's kind of int8 matrix product (:func:`int8_kernels_of`): an int8 model checked on one kind
    gives other results on another, so its check holds only where the kind is the same."""
    return int8_kernels_of(platform.machine(), cpu_info()[1])
