"""Process-wide CPU settings that make PyTorch faster on small Linux machines."""

from __future__ import annotations

import ctypes
import platform
from functools import cache

# glibc's mallopt parameters and defaults (malloc.h): no more than M_MMAP_MAX chunks from mmap; free memory
# at the heap top above M_TRIM_THRESHOLD bytes goes back to the system.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP = 2**31 - 1  # mallopt takes an int


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
