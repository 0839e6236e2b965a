"""A parameter server: its pieces of the model and their optimizer state, updated under a lock.

Other processes reach this process's Server through the endpoints of protocol.py; each call
runs in one of the RPC agent's threads, so everything that touches the tensors holds
``Server.lock``.

Batch-norm running statistics are server state like the parameters: a worker pushes the batch
statistics of its forward pass with the gradients, and the server folds them in with the
model's momentum, one push at a time, exactly as a single process does after each batch.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter, deque

import torch

from mlc.train.async_ps.plan import Piece
from mlc.train.optim import learning_rate, make_optimizer

PAUSE_LIMIT = 300.0  # seconds a push waits for a checkpoint cut before it goes ahead anyway


def is_count(name: str) -> bool:
    return name.endswith("num_batches_tracked")


class Server:
    def __init__(self, index: int, config, pieces: list[Piece], model: torch.nn.Module):
        self.index, self.config = index, config
        state = model.state_dict()
        trainable = {name for name, _ in model.named_parameters()}
        self.param_pieces = [p for p in pieces if p.name in trainable]
        self.buffer_pieces = [p for p in pieces if p.name not in trainable]
        self.params = [torch.nn.Parameter(p.take(state[p.name])) for p in self.param_pieces]
        self.buffers = [p.take(state[p.name]) for p in self.buffer_pieces]
        # running_mean / running_var of module "a.b" move with that module's momentum
        self.momentum = [
            None if is_count(p.name) else model.get_submodule(p.name.rsplit(".", 1)[0]).momentum
            for p in self.buffer_pieces
        ]
        self.optimizer = make_optimizer(config, self.params)
        self.limit = config.ps.max_staleness
        self.lock = threading.Condition()
        self.paused = False
        self.stop = False  # set by the coordinator: workers finish after their next reply
        self.version = 0  # updates applied
        self.received = 0  # pushes received (applied or dropped)
        self.samples = 0  # samples in those pushes: the job's clock (lr schedule, budget)
        self.staleness: Counter = Counter()  # staleness of applied updates -> count
        self.dropped = 0
        self.pushes: Counter = Counter()  # worker process name -> pushes received (this start)
        self.own: dict[int, int] = {}  # worker -> max own updates applied since its pull
        self.recent: dict[int, deque] = {}  # worker -> versions its last updates applied at
        self.loader: dict[int, dict] = {}  # worker -> data position after its last push
        self.loss_sum, self.loss_count = 0.0, 0  # since the coordinator last asked

    # ------------------------------------------------------------------ called by workers

    def push(self, worker, pulled, grads, stats, batch, loss=None, loader=None, name=None):
        """Apply one worker batch's gradients (or drop them if too stale); returns
        (version, stop). ``pulled``: this server's version the gradients were computed from;
        ``stats``: the batch statistics of the buffer pieces (None for the batch counters);
        ``name``: the worker process's RPC name (a replacement has its own)."""
        with self.lock:
            if not self.lock.wait_for(lambda: not self.paused, timeout=PAUSE_LIMIT):
                print(f"server {self.index}: checkpoint cut took > {PAUSE_LIMIT}s; going on")
            before = self.samples
            self._receive(worker, batch, loss, loader, name)
            staleness = self.version - pulled
            recent = self.recent.setdefault(worker, deque(maxlen=256))
            own = sum(1 for v in recent if v >= pulled)
            if self.limit is not None and staleness > self.limit:
                self.dropped += 1
                return self.version, self.stop
            self._apply(grads, stats, learning_rate(self.config, before, batch))
            recent.append(self.version)
            self.version += 1
            self.staleness[staleness] += 1
            self.own[worker] = max(self.own.get(worker, 0), own)
            return self.version, self.stop

    def _receive(self, worker, batch, loss, loader, name) -> None:
        """Count a push, applied or not: the sample clock, the budget, the loss, the position."""
        self.received += 1
        self.pushes[name if name is not None else f"worker{worker}"] += 1
        self.samples += batch
        # The budget is spent: this reply already tells the worker (pushes in flight still
        # land, so a run ends within W x (push_in_flight + 1) batches of train.samples).
        self.stop = self.stop or self.samples >= self.config.train.samples
        if loader is not None and _later(loader, self.loader.get(worker)):
            # Pushes in flight may be applied out of order: keep the furthest position
            self.loader[worker] = loader
        if loss is not None:
            self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1

    def _apply(self, grads, stats, lr: float) -> None:
        """One optimizer step on the pieces, and the batch statistics folded into the
        running ones with the model's momentum."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = grad
        self.optimizer.step()
        for param in self.params:
            param.grad = None
        with torch.no_grad():
            for buffer, momentum, stat in zip(self.buffers, self.momentum, stats, strict=True):
                if momentum is None:
                    buffer += 1
                else:
                    buffer.mul_(1 - momentum).add_(stat, alpha=momentum)

    def pull(self):
        """(version, copies of the parameters, stop)."""
        with self.lock:
            return self.version, [p.detach().clone() for p in self.params], self.stop

    # ------------------------------------------------------------- called by the coordinator

    def pause(self) -> None:
        """Hold every push from now until resume(): the checkpoint cut."""
        with self.lock:  # an update in progress holds the lock: it completes first
            self.paused = True

    def resume(self) -> None:
        with self.lock:
            self.paused = False
            self.lock.notify_all()

    def set_stop(self) -> None:
        with self.lock:
            self.stop = True

    def stats(self) -> dict:
        """Counters for the log; the loss window restarts."""
        with self.lock:
            out = {
                "version": self.version,
                "received": self.received,
                "samples": self.samples,
                "staleness": dict(self.staleness),
                "dropped": self.dropped,
                "own_staleness_max": dict(self.own),
                "pushes": dict(self.pushes),
                "loss_sum": self.loss_sum,
                "loss_count": self.loss_count,
            }
            self.loss_sum, self.loss_count = 0.0, 0
            return out

    def snapshot(self) -> dict:
        """Copies of everything a checkpoint holds of this server (taken while paused)."""
        with self.lock:
            return {
                "params": [p.detach().clone() for p in self.params],
                "buffers": [b.clone() for b in self.buffers],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "version": self.version,
                "received": self.received,
                "samples": self.samples,
                "staleness": dict(self.staleness),
                "dropped": self.dropped,
                "loader": dict(self.loader),
            }

    def load(self, state: dict) -> None:
        """Continue from a snapshot (resume): parameters, optimizer, counters."""
        with self.lock, torch.no_grad():
            for param, saved in zip(self.params, state["params"], strict=True):
                param.copy_(saved)
            for buffer, saved in zip(self.buffers, state["buffers"], strict=True):
                buffer.copy_(saved)
            self.optimizer.load_state_dict(state["optimizer"])
            self.version, self.received = state["version"], state["received"]
            self.samples, self.dropped = state["samples"], state["dropped"]
            self.staleness = Counter({int(k): v for k, v in state["staleness"].items()})
            self.loader = {int(k): v for k, v in state["loader"].items()}


def _later(position: dict, than: dict | None) -> bool:
    """A loader position ({"epoch", "batch"}) after another (or the first one)."""
    return than is None or (position["epoch"], position["batch"]) > (than["epoch"], than["batch"])
