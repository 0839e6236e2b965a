"""Run an `mlc` command as N local processes of one gloo group (a small torchrun for one host).

`mlc eval --processes N` uses it on CPUs: each process scores a share of the images with
1/N of the cores' threads, so one process decodes and updates its metrics while the others run
their forward passes; in a single process they take turns with a forward that occupies every
core. It pays off on long evaluations: each process costs ~2 s of start-up (docs/eval.md has
the measurements). The children get the environment torchrun gives
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and OMP_NUM_THREADS; the parent only
waits. When one child fails, the others are stopped (they would wait for it in a collective)
and its exit code is returned.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_group(argv: list[str], processes: int, poll: float = 0.1) -> int:
    """``python -m mlc.cli *argv`` as ``processes`` ranks; the first failing exit code, or 0."""
    threads = max(1, torch.get_num_threads() // processes)
    base = {
        **os.environ,
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": str(threads),
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "mlc.cli", *argv],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(processes)
    ]
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                return failed[0] if failed else 0
            time.sleep(poll)
    finally:
        for child in children:  # after a failure or Ctrl-C: nobody waits for the dead rank
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
