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
    coordinator.py  server 0's loop: log, validation, checkpoints, the end
    liveness.py     server 0's watch over the workers: lost, rejoined, all gone
    group.py        server 0's calls to every server: counters, the consistent cut, stop, ping
    cut.py          a cut as a checkpoint (the gathered model), a checkpoint back as servers'
                    states on resume
    torch_support.py  the torch releases this mode runs on (it uses torch.distributed.rpc
                    internals), checked before any process starts

docs/async.md describes the design, the guarantees and the failure behaviour.
"""

from mlc.train.async_ps.launcher import launch
from mlc.train.async_ps.torch_support import TorchVersionError, check_torch

__all__ = ["TorchVersionError", "check_torch", "launch"]
