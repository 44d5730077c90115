"""Allocator settings for the long-running processes (``relay start`` and ``serve``).

Relay and connector build and drop buffers of 64 KiB to 1 MiB for every chunk they move. With
glibc's defaults, buffers that size come from ``mmap`` or from heap memory that ``free`` has
just given back to the kernel, so each one faults its pages in again: building a 256 KiB
message measured a tenth of the time at the median but ten times longer at the 90th
percentile than with the settings below. Keeping that memory in the heap is bounded by
:data:`TRIM_THRESHOLD`, well under the relay's own per-scope buffer bounds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Final

#: Allocations up to this size come from the heap rather than their own ``mmap``.
MMAP_THRESHOLD: Final = 4 * 1024 * 1024
#: Free memory at the top of the heap kept (not returned to the kernel) up to this size.
TRIM_THRESHOLD: Final = 32 * 1024 * 1024
#: Extra heap requested from the kernel each time the heap grows.
TOP_PAD: Final = 4 * 1024 * 1024

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD: Final = -1
_M_TOP_PAD: Final = -2
_M_MMAP_THRESHOLD: Final = -3


def tune_allocator() -> bool:
    """Apply the settings above when the process runs on glibc; returns whether they were
    applied. Anything else (musl, macOS, a libc without ``mallopt``) is left untouched."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    # mallopt returns 1 on success and 0 on error.
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
