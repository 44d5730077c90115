"""The allocator settings of the long-running processes take effect (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator settings apply to glibc only",
)

# Counts the blocks glibc serves with their own mmap (mallinfo2's hblks) around one 1 MiB
# allocation, in a fresh process, with or without the settings applied first.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from repowire._allocator import tune_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = tune_allocator() if sys.argv[1] == "tuned" else None
    before = libc.mallinfo2().hblks
    buffer = bytearray(1024 * 1024)
    during = libc.mallinfo2().hblks
    print(applied, during - before)
    """
)


def _probe(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_large_buffers_come_from_the_heap_once_tuned() -> None:
    assert _probe("default") == "None 1"  # glibc's default: a 1 MiB buffer is its own mmap
    assert _probe("tuned") == "True 0"
