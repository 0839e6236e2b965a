"""Everything of the async job that crosses a process boundary: the functions that other
processes call through torch.distributed.rpc, and the state of this process that they act on.

RPC sends a function by its module path and runs it in one of the callee's RPC agent threads,
so every endpoint is a top-level function of this module and the state it reaches is a module
global of the callee (each process imports this module once). Other modules call an endpoint
with ``call`` (waits for the answer) or ``send`` (returns a future); both refuse a function
that is not in ``ENDPOINTS``. Server 0 calls its own server directly (coordinator, group.py).

Every server; state ``SERVER``, ``BUILT``, ``READY``:

    push(worker, pulled, grads, stats, batch, loss, loader, name) -> (version, stop)   workers
    pull() -> (version, copies of the parameters, stop)                                 workers
    load(state or None)      a resumed state, or keep the initial weights; then READY  server 0
    pause() / resume()       hold pushes for a consistent cut, and let them go on      server 0
    set_stop()               answer every later push with "stop"                        server 0
    stats() -> counters      for the log (the loss window restarts)                     server 0
    snapshot() -> state      what a checkpoint holds of this server                     server 0

Server 0 only; state ``WORKERS`` (the record of the worker processes):

    register(worker, name, restart) -> (data position, stop)   a worker process starts
    leave(worker)                                              it is done (then waits for finish)
    fail(worker, message)                                      its loss is not finite

Every process: ``ping() -> time``. Server 0 pings the other servers and the workers, the other
servers and the workers that are done ping server 0, every ``PING_EVERY`` seconds; one that does
not answer is gone.

Every process but server 0; state ``FINISHED``, ``TOGETHER``:

    finish(together)         the job is over: leave the RPC group and exit; together:   server 0
                             every process is alive and done, all leave at once

Besides these, a joiner of the dynamic group (membership.py) calls every member with torch's
own ``_update_group_membership``: torch's join protocol, not the job's.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import torch.distributed.rpc as rpc

if TYPE_CHECKING:
    from mlc.train.async_ps.server import Server

PING_EVERY = 2.0  # seconds between liveness checks
WAIT_LIMIT = 300.0  # seconds a call waits for this process's server to be built and ready


class PeerLost(RuntimeError):
    """Another process of the job stopped answering."""


# ------------------------------------------------------------------ this process's state

SERVER: Server | None = None  # this process's parameter server (server processes only)
BUILT = threading.Event()  # set once SERVER exists (calls can arrive before that)
READY = threading.Event()  # set once SERVER holds its initial (or resumed) state
FINISHED = threading.Event()  # set by server 0 when the job is over
TOGETHER = threading.Event()  # set with FINISHED when all processes leave the group together


class Workers:
    """Server 0's record of the worker processes: written by register / leave / fail (in RPC
    threads), read by the coordinator's loop, so every access holds ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[int, str] = {}  # slot -> RPC name of its latest registered process
        self.restarts: dict[int, int] = {}  # slot -> incarnation of that process (0: the first)
        self.joined: list[dict] = []  # registrations of replacements, not reported yet
        self.left: set[int] = set()  # slots whose process said it is done
        self.failures: list[str] = []

    def registered(self, worker: int, name: str, restart: int, samples: int, position) -> None:
        with self.lock:
            self.names[worker] = name
            self.restarts[worker] = restart
            if restart:
                self.joined.append(
                    {
                        "event": "rejoined",
                        "worker": worker,
                        "name": name,
                        "restart": restart,
                        "samples": samples,
                        "position": position,
                    }
                )

    def name(self, worker: int) -> str | None:
        """The RPC name of the slot's latest registered process (None: none registered)."""
        with self.lock:
            return self.names.get(worker)

    def current_names(self) -> dict[int, str]:
        with self.lock:
            return dict(self.names)

    def restart_counts(self) -> dict[int, int]:
        with self.lock:
            return dict(self.restarts)

    def take_joined(self) -> list[dict]:
        """The replacements that registered since the last call."""
        with self.lock:
            joined = list(self.joined)
            self.joined.clear()
            return joined

    def has_left(self, worker: int) -> bool:
        with self.lock:
            return worker in self.left

    def not_done(self, workers: int, lost: set[int]) -> set[int]:
        """The slots of 0..workers-1 whose process has neither left nor been lost."""
        with self.lock:
            return set(range(workers)) - self.left - lost

    def first_failure(self) -> str | None:
        with self.lock:
            return self.failures[0] if self.failures else None


WORKERS = Workers()


def serve(server: Server) -> None:
    """This process is a parameter server: calls that waited for it to be built go on."""
    global SERVER
    SERVER = server
    BUILT.set()


def _ready() -> Server:
    if not READY.wait(timeout=WAIT_LIMIT):
        raise RuntimeError("the parameter server did not get ready in time")
    return SERVER


# --------------------------------------------------------------- endpoints on every server


def push(*args):
    return _ready().push(*args)


def pull():
    return _ready().pull()


def load(state):
    """From the coordinator: a resumed state, or None (start from the initial weights)."""
    if not BUILT.wait(timeout=WAIT_LIMIT):
        raise RuntimeError("the parameter server was not built in time")
    if state is not None:
        SERVER.load(state)
    READY.set()


def pause():
    _ready().pause()


def resume():
    _ready().resume()


def set_stop():
    _ready().set_stop()


def stats():
    return _ready().stats()


def snapshot():
    return _ready().snapshot()


# ------------------------------------------------------------------ endpoints on server 0


def register(worker: int, name: str | None = None, restart: int = 0):
    """A worker process starts: its data position and stop. The position is the one after the
    slot's last push that server 0 received (from a resumed checkpoint, or from the process
    this one replaces), else None (the start of its stream)."""
    srv = _ready()
    with srv.lock:
        position, stop, samples = srv.loader.get(worker), srv.stop, srv.samples
    WORKERS.registered(worker, name or f"worker{worker}", restart, samples, position)
    return position, stop


def leave(worker: int) -> None:
    with WORKERS.lock:
        WORKERS.left.add(worker)


def fail(worker: int, message: str) -> None:
    with WORKERS.lock:
        WORKERS.failures.append(message)


# ------------------------------------------------- endpoints on every process (finish: not 0)


def ping() -> float:
    return time.time()


def finish(together: bool = False) -> None:
    """From the coordinator: the job is over. ``together``: every process of the job is alive
    and done, so all of them leave the RPC group at once (node.py), which closes no connection
    that another process still watches."""
    if together:
        TOGETHER.set()
    FINISHED.set()


ENDPOINTS = frozenset(
    {push, pull, load, pause, resume, set_stop, stats, snapshot}
    | {register, leave, fail}
    | {ping, finish}
)


# ------------------------------------------------------------------------- calling them


def call(to: str, endpoint, *args, timeout: float):
    """``endpoint(*args)`` in process ``to`` (an RPC name); waits for the answer. RuntimeError
    when ``to`` does not answer within ``timeout`` seconds, or the call fails there."""
    return rpc.rpc_sync(to, _listed(endpoint), args=args, timeout=timeout)


def send(to: str, endpoint, *args, timeout: float):
    """``endpoint(*args)`` in process ``to`` without waiting: a future of the answer."""
    return rpc.rpc_async(to, _listed(endpoint), args=args, timeout=timeout)


def _listed(endpoint):
    if endpoint not in ENDPOINTS:
        raise ValueError(f"{endpoint!r} is not an endpoint of the async protocol")
    return endpoint
