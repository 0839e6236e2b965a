"""Process-wide settings that make long CPU jobs faster; the `mlc` command applies them.

glibc's malloc serves every buffer above its mmap threshold (at most 32 MB) with fresh pages
from the kernel and returns them on free, so a network whose activations exceed 32 MB (Xception
at 299x299 in batches of 8) page-faults through its whole working set on every step, a
sizeable share of the step's time on a CPU (docs/benchmarks.md has the measurement). Keeping
freed memory in the heap instead removes those faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    No mmap-served buffers (all come from the heap, where freed blocks are reused), no trimming
    of the heap's top, and growth in steps of 64 MB. The process keeps its peak memory until it
    exits, which suits training and evaluation jobs. Returns whether it applied; a no-op on
    other C libraries or when MLC_MALLOC=default is set in the environment. Idempotent.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MLC_MALLOC", "").lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(
        mallopt(_M_MMAP_MAX, 0)
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        and mallopt(_M_TOP_PAD, 64 << 20)
    )
    return _applied
