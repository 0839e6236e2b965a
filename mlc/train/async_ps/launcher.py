"""The launcher: starts this machine's servers and workers and watches them.

``torchrun`` and ``mp.spawn`` stop the whole job when one process dies, which would throw away
what the asynchronous mode is for. Here a worker that dies is reported and the others go on
(with ``ps.restart_workers`` > 0 a replacement is started for its slot, at most that many times
per slot, and rejoins the running job: membership.py); a server that dies stops every local
process (the job cannot go on without its parameters: the last checkpoint is the resume point);
SIGTERM or Ctrl-C asks server 0 for a checkpoint and a clean stop. Every wait has a timeout:
after the coordinator is done, or after a failure, the remaining processes get
``ps.stop_timeout`` seconds, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from mlc.dist import free_port
from mlc.io import atomic_write_json
from mlc.train.async_ps import node
from mlc.train.async_ps.torch_support import check_torch
from mlc.train.checkpoint import list_checkpoints, write_run_config
from mlc.train.logs import summary_writer_class
from mlc.train.loop import TrainingError

POLL = 0.1  # seconds


def local_roles(ps) -> list[tuple[str, int]]:
    """This machine's processes: server i on node i % nodes, worker j on node j % nodes."""
    servers = [("server", i) for i in range(ps.servers) if i % ps.nodes == ps.node_rank]
    workers = [("worker", j) for j in range(ps.workers) if j % ps.nodes == ps.node_rank]
    return servers + workers


def launch(config, resume: str | None = None, log=print) -> dict:
    """Run this machine's part of the async job; returns the summary (on node 0) or {}.
    TorchVersionError (before any process starts) for a torch it does not support."""
    check_torch()
    ps, out = config.ps, Path(config.train.out)
    if ps.node_rank == 0:  # node 0's server 0 logs: say now whether TensorBoard can be on
        write_run_config(out, config)
        summary_writer_class(config.train.tensorboard, log)
    port = ps.port or free_port()
    context = mp.get_context("spawn")  # a fork would copy torch's threads and locks
    messages = context.SimpleQueue()  # put() writes at once: children end with os._exit

    def make(role: str, index: int, restart: int = 0) -> mp.Process:
        return context.Process(
            target=node.main,
            args=(role, index, config, resume, port, messages, restart),
            name=f"mlc-{role}{index}" + (f"-r{restart}" if restart else ""),
            daemon=False,
        )

    procs: dict[tuple[str, int], mp.Process] = {}
    for role, index in local_roles(ps):
        procs[(role, index)] = make(role, index)
    stop = {"signal": None}
    failure = None
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in handlers:
        signal.signal(sig, lambda s, _f: stop.update(signal=signal.Signals(s).name))
    try:
        for proc in procs.values():
            proc.start()
        _write_processes(out, ps, port, procs)
        log(
            f"async: {ps.servers} servers, {ps.workers} workers ({len(procs)} here, node "
            f"{ps.node_rank}/{ps.nodes}), rendezvous {ps.addr}:{port}"
        )
        failure = _watch(procs, ps, stop, log, make, lambda: _write_processes(out, ps, port, procs))
    except BaseException:
        failure = "the launcher failed"
        raise
    finally:
        # After a failure nothing is waited for: the job cannot go on without a server.
        _end(procs, ps.stop_timeout if failure is None else 0.0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    errors = _drain(messages)
    if failure:
        last = list_checkpoints(out)
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise TrainingError(
            f"{failure}{detail}; the job stopped. Last checkpoint: "
            f"{last[-1] if last else 'none'}; resume with --resume auto"
        )
    return _summary(out) if ("server", 0) in procs else {}


def _watch(procs, ps, stop, log, make, record) -> str | None:
    """Until every local process has ended; returns what failed, or None. A worker that dies
    is replaced (``make``, then ``record`` rewrites the pid file) while its slot has restarts
    left and the job goes on."""
    reported: set = set()
    restarts = {index: 0 for role, index in procs if role == "worker"}
    forwarded = False
    coordinator_done = None
    while True:
        time.sleep(POLL)
        if stop["signal"] and not forwarded:
            forwarded = True
            if ("server", 0) in procs:
                log(f"{stop['signal']}: asking server 0 for a checkpoint and a clean stop")
                _signal(procs[("server", 0)], signal.SIGTERM)
            else:
                return f"{stop['signal']} on node {ps.node_rank}"
        failed = []  # servers that ended badly since the last look
        for (role, index), proc in procs.items():
            if proc.exitcode is None or (role, index) in reported:
                continue
            reported.add((role, index))
            if proc.exitcode == 0:
                if (role, index) == ("server", 0):
                    coordinator_done = time.time()
                continue
            if role == "server":
                failed.append((index, proc.exitcode))
            elif restarts[index] < ps.restart_workers and not (coordinator_done or stop["signal"]):
                restarts[index] += 1
                log(
                    f"async: worker {index} {_how(proc.exitcode)}; starting a replacement "
                    f"(restart {restarts[index]} of {ps.restart_workers})"
                )
                procs[(role, index)] = make(role, index, restarts[index])
                procs[(role, index)].start()
                reported.discard((role, index))
                record()
            else:
                log(f"async: worker {index} {_how(proc.exitcode)}; the other workers go on")
        if failed:
            # Name the cause: exit code 3 means "another process stopped answering", the
            # consequence of a death that another server of the same look shows.
            index, code = min(failed, key=lambda f: f[1] == node.PEER_LOST)
            return f"server {index} {_how(code)}"
        if all(p.exitcode is not None for p in procs.values()):
            return None
        if coordinator_done and time.time() - coordinator_done > ps.stop_timeout:
            left = [f"{r}{i}" for (r, i), p in procs.items() if p.exitcode is None]
            log(f"async: {', '.join(left)} still running after the job ended; stopping them")
            return None


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _signal(proc, sig) -> None:
    with contextlib.suppress(ProcessLookupError, TypeError):  # gone, or never started
        os.kill(proc.pid, sig)


def _end(procs, timeout: float) -> None:
    """Every process gone: a grace period, then SIGTERM, then SIGKILL (bounded waits)."""
    deadline = time.time() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        for proc in procs.values():
            if sig is not None and proc.is_alive():
                _signal(proc, sig)
        for proc in procs.values():
            proc.join(max(0.0, deadline - time.time()))
        if not any(p.is_alive() for p in procs.values()):
            return
        deadline = time.time() + 5.0


def _drain(messages) -> list[str]:
    found = []
    try:
        while not messages.empty():
            found.append(messages.get()[2])
    except (OSError, EOFError):
        pass
    return found


def _write_processes(out: Path, ps, port: int, procs) -> None:
    """<out>/async/processes-node<k>.json: role -> pid, for operators (and tests)."""
    data = {"port": port, "launcher": os.getpid()}  # a replaced worker: its latest process
    data.update({f"{role}{index}": p.pid for (role, index), p in procs.items()})
    atomic_write_json(out / "async" / f"processes-node{ps.node_rank}.json", data, indent=None)


def _summary(out: Path) -> dict:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r["kind"] == "summary"]
    return summaries[-1] if summaries else {}
