"""Process-wide CPU settings.

The allocator is process state that every earlier test changes, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from covidscan.system import SPIN_COUNT, keep_freed_memory, process_alive

MIB = 1024 * 1024

# glibc's own accounting around one 64 MiB tensor: growth of (mmapped bytes, heap bytes) while it lives,
# and growth of the heap once it is freed.
_MEASURE = """
import ctypes, json, sys
import torch
from covidscan.system import SPIN_COUNT, keep_freed_memory

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


_SPIN = """
import json, os, sys
if sys.argv[1] == "torch-first":
    import torch
from covidscan.system import short_spin_waits
print(json.dumps([short_spin_waits(), os.environ.get("GOMP_SPINCOUNT")]))
"""


def _run(code: str, *args: str, **env: str) -> list:
    """The last line of ``code``'s output (JSON), run in a fresh interpreter without any spin setting."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=clean | env)
    return json.loads(done.stdout.splitlines()[-1])


def test_short_spin_waits_is_set_before_torch_loads_and_never_over_the_users_choice():
    assert _run(_SPIN, "fresh") == [True, str(SPIN_COUNT)]
    assert _run(_SPIN, "torch-first") == [False, None]  # libgomp has read its settings already: say so
    assert _run(_SPIN, "fresh", GOMP_SPINCOUNT="5") == [False, "5"]
    assert _run(_SPIN, "fresh", OMP_WAIT_POLICY="PASSIVE") == [False, None]


_COMMAND = """
import atexit, json, os, sys
atexit.register(lambda: print(json.dumps([os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules])))
sys.argv = ["covidscan", "predict", "--help"]
from covidscan.cli import main
main()
"""


def test_the_covidscan_command_shortens_spin_waits_before_it_loads_torch():
    assert _run(_COMMAND) == [str(SPIN_COUNT), False]


def test_process_alive_tells_a_running_process_from_one_that_has_ended():
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    assert process_alive(os.getpid())
    assert not process_alive(int(ended.stdout))
