"""Process-wide CPU settings."""

from __future__ import annotations

import ctypes

import pytest
import torch

from covidscan.system import keep_freed_memory

MIB = 1024 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _heap_and_mapped_bytes_around_a_64mib_tensor() -> tuple[int, int, int]:
    """glibc's own accounting: (mmapped bytes while the tensor lives, heap bytes then, heap bytes after)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    tensor = torch.ones(64 * MIB // 4)
    live = mallinfo2()
    del tensor
    return live.hblkhd, live.arena, mallinfo2().arena


def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_it():
    if not keep_freed_memory():
        pytest.skip("not a glibc system: the allocator setting does not apply")
    try:
        mapped, heap, heap_after = _heap_and_mapped_bytes_around_a_64mib_tensor()
        assert mapped < 64 * MIB <= heap  # from the heap, not from a fresh mmap
        assert heap_after >= 64 * MIB  # and still there once freed, ready for the next batch
        assert keep_freed_memory(enable=False)
        # Give back what the first half kept, or glibc reuses that free heap space instead of mapping.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        mapped, _, _ = _heap_and_mapped_bytes_around_a_64mib_tensor()
        assert mapped >= 64 * MIB  # glibc's default: a fresh mmap for every large block
    finally:
        keep_freed_memory(enable=False)
