"""The asynchronous mode of `mlc train` (train.mode=async): Downpour-style parameter servers.

    launcher.py     starts and watches this machine's processes (not torchrun: it would stop
                    the job when one worker dies)
    node.py         one process: join the torch.distributed.rpc group, be a server or a worker
    membership.py   the dynamic group (ps.restart_workers > 0): a replacement worker joins
    protocol.py     everything that crosses a process boundary: the RPC endpoints and the
                    state of this process they act on (this process's server, server 0's
                    record of the workers)
    plan.py         which server owns which tensor (the head split by class rows)
    server.py       a server's pieces, optimizer state, version counter, staleness counters
    worker.py       compute gradients, push them (bounded in flight), pull every n steps
    coordinator.py  server 0's loop: log, validation, consistent checkpoints, the end

docs/async.md describes the design, the guarantees and the failure behaviour.
"""

from mlc.train.async_ps.launcher import launch

__all__ = ["launch"]
