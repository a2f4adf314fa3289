"""Process-wide CPU settings.

The allocator is process state that every earlier test changes, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from covidscan.system import keep_freed_memory

MIB = 1024 * 1024

# glibc's own accounting around one 64 MiB tensor: growth of (mmapped bytes, heap bytes) while it lives,
# and growth of the heap once it is freed.
_MEASURE = """
import ctypes, json, sys
import torch
from covidscan.system import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
for enable in sys.argv[1:]:
    assert keep_freed_memory(enable=enable == "on")
before = mallinfo2()
tensor = torch.ones(64 * 1024 * 1024 // 4)
live = mallinfo2()
del tensor
after = mallinfo2()
print(json.dumps([live.hblkhd - before.hblkhd, live.arena - before.arena, after.arena - before.arena]))
"""


def _measure(*settings: str) -> tuple[int, int, int]:
    done = subprocess.run([sys.executable, "-c", _MEASURE, *settings], capture_output=True, text=True,
                          check=True, timeout=120)
    return tuple(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture(autouse=True)
def _glibc_only():
    if not keep_freed_memory(enable=False):
        pytest.skip("not a glibc system: the allocator setting does not apply")


def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_it():
    mapped, heap, heap_after = _measure("on")
    assert mapped < 64 * MIB <= heap  # from the heap, not from a fresh mmap
    assert heap_after >= 64 * MIB  # and still there once freed, ready for the next batch


@pytest.mark.parametrize("settings", [(), ("on", "off")], ids=["glibc-default", "enabled-then-restored"])
def test_without_keep_freed_memory_large_tensors_get_a_fresh_mmap(settings):
    mapped, _, heap_after = _measure(*settings)
    assert mapped >= 64 * MIB  # glibc's default: a fresh mmap for every large block
    assert heap_after < 64 * MIB  # and handed back to the kernel once freed
