"""Server 0's watch over the worker slots: which are alive, done, lost or back.

Every ``protocol.PING_EVERY`` seconds the coordinator has it look: a replacement that
registered for a slot since the last look rejoins (logged, and a record of kind ``worker``,
event ``rejoined``, in metrics.jsonl); a worker that neither answers a ping nor has said it is
done (``protocol.leave``) is lost (the same, event ``lost``), and the others go on. A lost slot
that still has ``ps.restart_workers`` left counts as possibly coming back for
``ps.start_timeout``: the launcher starts its replacement at once.
"""

from __future__ import annotations

import time

import torch.distributed.rpc as rpc

from mlc.train.async_ps import protocol


class WorkerWatch:
    def __init__(self, config, metrics, say):
        self.config, self.metrics, self.say = config, metrics, say
        self.lost: set[int] = set()
        self.lost_at: dict[int, float] = {}  # slot -> when it was found gone
        self.started = time.time()

    def alive(self, w: int) -> bool:
        """The slot's current process answers a ping. One not in the group yet (dynamic
        membership) counts as alive for ps.start_timeout from the start."""
        ps = self.config.ps
        name = protocol.WORKERS.name(w)
        try:
            rpc.get_worker_info(name or f"worker{w}")
        except RuntimeError:
            return name is None and time.time() - self.started < ps.start_timeout
        try:
            protocol.call(name or f"worker{w}", protocol.ping, timeout=min(5.0, ps.rpc_timeout))
            return True
        except RuntimeError:
            return False

    def check(self) -> None:
        """Report the replacements that registered since the last look (rejoined), then the
        workers that neither answer nor have left (lost)."""
        for event in protocol.WORKERS.take_joined():
            w = event["worker"]
            self.lost.discard(w)
            self.lost_at.pop(w, None)
            self.metrics.write(event, kind="worker")
            self.say(
                f"worker {w} rejoined ({event['name']}, restart {event['restart']}) at "
                f"{event['samples']} samples; its data continues from {event['position']}"
            )
        names = protocol.WORKERS.current_names()
        for w in sorted(protocol.WORKERS.not_done(self.config.ps.workers, self.lost)):
            # A worker says it is done (leave) before it exits: if it did so while its ping
            # was on the way, the ping fails but the worker finished.
            if self.alive(w) or protocol.WORKERS.has_left(w):
                continue
            self.lost.add(w)
            self.lost_at[w] = time.time()
            name = names.get(w, f"worker{w}")
            samples = protocol.SERVER.samples
            self.metrics.write(
                {"event": "lost", "worker": w, "name": name, "samples": samples}, kind="worker"
            )
            self.say(f"worker {w} is gone ({name} does not answer); the others go on")

    def every_worker_gone(self) -> bool:
        """Every slot lost, and none can still be replaced (ps.restart_workers left, and lost
        less than ps.start_timeout ago: the launcher restarts a slot at once)."""
        ps = self.config.ps
        if len(self.lost) < ps.workers:
            return False
        restarts = protocol.WORKERS.restart_counts()
        return not any(
            restarts.get(w, 0) < ps.restart_workers
            and time.time() - self.lost_at.get(w, 0.0) < ps.start_timeout
            for w in self.lost
        )

    def wait_until_done(self) -> None:
        """Until every worker has left or is lost; after ps.stop_timeout + ps.rpc_timeout the
        ones still missing count as lost."""
        ps = self.config.ps
        deadline = time.time() + ps.stop_timeout + ps.rpc_timeout
        while time.time() < deadline:
            self.check()
            if not protocol.WORKERS.not_done(ps.workers, self.lost):
                return
            time.sleep(0.2)
        missing = protocol.WORKERS.not_done(ps.workers, self.lost)
        self.say(f"warning: workers {sorted(missing)} did not finish in time; going on without")
        self.lost |= missing
