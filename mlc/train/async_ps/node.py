"""One process of the async job (a server or a worker): join the RPC group, do the role, leave.

Exit codes: 0 done, 2 a user-facing error (message on stderr and to the launcher), 3 another
process stopped answering, 1 anything else. A process never outlives its launcher: it exits
when its parent is gone (a launcher killed with -9 leaves no orphans training on).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback

PARENT_POLL = 0.5  # seconds
PEER_LOST = 3  # exit code: another process of the job stopped answering
LEFT = "mlc_left"  # rendezvous store key: processes that left the RPC group together


def rank_of(role: str, index: int, servers: int) -> int:
    return index if role == "server" else servers + index


def main(role: str, index: int, config, resume, port: int, messages, restart: int = 0) -> None:
    """Target of the launcher's spawned processes; never returns (os._exit). ``restart``: the
    incarnation of a worker slot (0 first, k the k-th replacement: it joins a running job)."""
    stop_signal = _watch_parent_and_signals(role, index)

    import warnings

    import torch
    import torch.distributed.rpc as rpc

    from mlc.config import ConfigError

    # torch's RPC rendezvous itself uses a deprecated gloo call: not the operator's concern
    warnings.filterwarnings("ignore", message="You are using a Backend")
    from mlc.train.async_ps import membership
    from mlc.train.loop import TrainingError

    ps = config.ps
    torch.set_num_threads(ps.threads)
    code = 1
    name = membership.worker_name(index, restart) if role == "worker" else f"{role}{index}"
    try:
        _join(rpc, name, role, index, restart, ps, port)
        together = False
        try:
            together = _run(role, index, config, resume, stop_signal, restart)
            code = 0
        finally:
            _leave(rpc, name, ps, together, host=(role, index) == ("server", 0))
    except (TrainingError, ConfigError, ValueError, OSError) as e:
        code = 2
        _report(messages, role, index, f"{name}: {e}")
    except RuntimeError as e:  # PeerLost, or RPC failures: a peer died, the rendezvous timed out
        code = PEER_LOST
        _report(messages, role, index, f"{name}: {e}")
    except BaseException:  # noqa: BLE001 (report anything, then exit with 1)
        _report(messages, role, index, f"{name}: {traceback.format_exc()}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: RPC threads must not keep a finished process


def _watch_parent_and_signals(role: str, index: int) -> dict:
    """Exit when the launcher is gone; Ctrl-C is the launcher's to handle; on server 0,
    SIGTERM asks the coordinator for a checkpoint and a clean stop. Returns the
    ``{"signal": name or None}`` that the SIGTERM handler sets."""
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_signal = {"signal": None}
    if role == "server" and index == 0:
        signal.signal(signal.SIGTERM, lambda s, _f: stop_signal.update(signal="SIGTERM"))
    return stop_signal


def _join(rpc, name: str, role: str, index: int, restart: int, ps, port: int) -> None:
    """Join the job's RPC group as ``name``: a static group fixed at the rendezvous, or with
    ps.restart_workers > 0 the dynamic one that a replacement worker can join (membership.py)."""
    from mlc.train.async_ps import membership

    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{ps.addr}:{port}",
        # The rendezvous waits this long for every process; calls pass their own timeouts.
        rpc_timeout=ps.start_timeout,
        num_worker_threads=max(16, 4 * ps.workers + 8),
    )
    if ps.restart_workers:  # dynamic membership: replacements can join (membership.py)
        if restart:
            dead = [membership.worker_name(index, k) for k in range(restart)]
            membership.release_tokens(ps.addr, port, ps.start_timeout, dead)
        membership.install(ps.start_timeout)
        rank = (
            membership.worker_rank(index, restart, ps.servers, ps.workers)
            if role == "worker"
            else index
        )
        rpc.init_rpc(name, rank=rank, rpc_backend_options=options)
        if membership.forgotten:
            left_out = ", ".join(membership.forgotten)
            print(f"{name}: joined; gone members left out: {left_out}", flush=True)
        membership.wait_for([f"server{s}" for s in range(ps.servers)], ps.start_timeout)
    else:  # a static group: fixed at the rendezvous
        rpc.init_rpc(
            name,
            rank=rank_of(role, index, ps.servers),
            world_size=ps.servers + ps.workers,
            rpc_backend_options=options,
        )


def _run(role: str, index: int, config, resume, stop_signal, restart: int = 0) -> bool:
    """This process's part of the job, until the job is over; True if all processes leave the
    RPC group together (server 0 says so: every one of them is alive and done)."""
    import torch

    from mlc.models import build_model
    from mlc.train.async_ps import coordinator, protocol
    from mlc.train.async_ps.plan import plan_shards
    from mlc.train.async_ps.server import Server
    from mlc.train.async_ps.worker import run_worker
    from mlc.train.loop import dataset_classes

    d, ps = config.data, config.ps
    class_ids, reference = dataset_classes(config)
    # Every process builds the same initial model (same seed): the plan and the servers'
    # starting weights agree without sending them around.
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, len(class_ids), d.channels)
    plan = plan_shards({k: tuple(v.shape) for k, v in model.state_dict().items()}, ps.servers)
    if role == "worker":
        del model
        run_worker(index, config, plan, len(class_ids), restart)
        return _wait_until_finished(ps.rpc_timeout)  # it has left: the job goes on without it
    protocol.serve(Server(index, config, plan[index], model))
    if index > 0:
        return _wait_until_finished(ps.rpc_timeout)  # its RPC threads do the work
    job = coordinator.Coordinator(config, plan, model, class_ids, reference, stop_signal)
    ended = False
    try:
        job.run(resume)
        ended = True
    finally:
        together = job.finish(ended)
    return together


def _wait_until_finished(rpc_timeout: float) -> bool:
    """Until the coordinator says the job is over (protocol.finish), or PeerLost when it stops
    answering; whether all processes leave the RPC group together."""
    from mlc.train.async_ps import protocol

    while not protocol.FINISHED.wait(protocol.PING_EVERY):
        try:
            protocol.call("server0", protocol.ping, timeout=min(10.0, rpc_timeout))
        except RuntimeError:
            raise protocol.PeerLost("server 0 (the coordinator) does not answer") from None
    return protocol.TOGETHER.is_set()


def _leave(rpc, name: str, ps, together: bool, host: bool) -> None:
    """Leave the RPC group, in a thread so that it cannot hang the exit (ps.stop_timeout).

    TensorPipe warns about every connection that fails while its own agent is not shutting
    down ("pipe closed", "eof"): a process that closes its connections, or exits, while the
    others still run makes each of them print one line per connection it had with them.
    ``together`` (every process of the job is alive and done, and each one knows): first every
    process marks its agent as shutting down, with no call of its own in flight, and only then
    does any of them close a connection. A static group does this in torch's graceful shutdown
    (its join barrier); a dynamic one in membership.leave_together. Otherwise this process
    leaves on its own at once (graceful shutdown would wait for every process, dead ones too).

    ``host``: this process (server 0) runs the rendezvous store, which the others use until
    they are out: it leaves last (each one that left counts itself in the store).
    """
    from mlc.train.async_ps import membership

    def leave() -> None:
        if not together:
            rpc.shutdown(graceful=False)
            return
        store = rpc.api._get_current_rpc_agent().store  # kept: it outlives the agent here
        try:
            if ps.restart_workers:
                membership.leave_together(ps.servers + ps.workers, ps.stop_timeout)
            else:
                rpc.shutdown(graceful=True, timeout=ps.stop_timeout)
        except Exception as e:  # noqa: BLE001 (a process died at the very end: leave alone)
            print(f"{name}: could not leave the RPC group with the others ({e})", file=sys.stderr)
            with contextlib.suppress(Exception):
                rpc.shutdown(graceful=False)
            return
        with contextlib.suppress(Exception):  # the store is gone: nothing left to wait for
            if not host:
                store.add(LEFT, 1)
                return
            others = ps.servers + ps.workers - 1
            deadline = time.time() + ps.stop_timeout
            while store.add(LEFT, 0) < others and time.time() < deadline:
                time.sleep(0.02)

    thread = threading.Thread(target=leave, daemon=True)
    thread.start()
    thread.join(ps.stop_timeout)


def _report(messages, role: str, index: int, text: str) -> None:
    print(f"mlc train (async): {text}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):  # the launcher may be gone
        messages.put((role, index, text))


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL)
        if os.getppid() != parent:
            os._exit(PEER_LOST)
