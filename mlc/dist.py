"""Process groups: joining torchrun's, tearing it down, gathering objects, and a local launcher.

``run_local_group`` runs an `mlc` command as N local processes of one gloo group (a small
torchrun for one host): `mlc eval --processes N` uses it on CPUs, each process scoring a share of
the images with 1/N of the cores' threads, so one process decodes and updates its metrics while
the others run their forward passes. The children get the environment torchrun gives (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and OMP_NUM_THREADS; the parent only waits.
When one child fails, the others are stopped (they would wait for it in a collective) and its
exit code is returned.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when there is one.

    ``device`` is a train.device / --device name (mlc.accel.resolve_device): under torchrun
    each rank takes cuda:LOCAL_RANK and the group talks NCCL; on CPUs, gloo."""
    from mlc.accel import local_rank, resolve_device

    world = int(os.environ.get("WORLD_SIZE", 1))
    chosen = resolve_device(device, local_rank())
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # before the group: NCCL binds to the current device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, chosen


def teardown(finished: bool) -> None:
    """Leave the process group before the interpreter exits: a gloo group left alive can abort
    the process at exit ("terminate called without an active exception"). After a clean finish
    every rank first waits for the others' last collectives and writes; after an error the
    other ranks may be inside a collective, so no barrier then."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_gather(obj, world: int) -> list:
    """Every rank's ``obj``, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_to_first(obj, rank: int, world: int) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rerun_as_local_group(argv: list[str], processes: int) -> int:
    """`--processes N` of a command: the same command line in N local ranks, each with
    ``--processes 1`` (the last one given wins); rank 0 reports."""
    from mlc.config import UsageError

    if "WORLD_SIZE" in os.environ:
        raise UsageError("--processes > 1 inside torchrun: set torchrun's --nproc-per-node")
    return run_local_group([*argv, "--processes", "1"], processes)


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
