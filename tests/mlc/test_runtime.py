"""mlc.runtime.keep_freed_memory: freed large buffers are reused instead of refaulted."""

import os
import subprocess
import sys

import pytest

# Allocate and free a 64 MB buffer 5 times; print the minor page faults of the last 4 rounds.
PROBE = """
import ctypes, resource
from mlc.runtime import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)  # write every page
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES_PER_BUFFER = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_buffers_are_reused_without_page_faults():
    applied, faults = probe()
    assert applied
    assert faults < PAGES_PER_BUFFER // 10  # reused heap memory: no fresh pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_opt_out_keeps_default_malloc_which_refaults():
    applied, faults = probe(MLC_MALLOC="default")
    assert not applied
    # glibc mmaps a 64 MB buffer and unmaps it on free: every round faults every page again
    assert faults >= 4 * PAGES_PER_BUFFER * 0.9
