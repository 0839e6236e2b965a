"""A worker: streams its own shard slots, computes gradients on its batches, pushes them to the
servers without waiting for the answers (at most ``ps.push_in_flight`` unanswered), and pulls
fresh parameters every ``ps.pull_every`` steps. It stops when a server says the job has seen
``train.samples`` samples.

A replacement (``restart`` > 0, after the launcher saw the slot's process die) does the same:
server 0 gives it the slot's data position after the last push server 0 received, and its
first pull gives it the servers' current parameters.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from mlc.accel import resolve_precision
from mlc.data import ShardLoader, normalize
from mlc.models import build_model
from mlc.train.async_ps import membership, protocol
from mlc.train.async_ps.plan import Piece
from mlc.train.async_ps.server import is_count
from mlc.train.loop import TrainingError
from mlc.train.optim import masked_bce


def run_worker(
    index: int, config, plan: list[list[Piece]], num_classes: int, restart: int = 0
) -> None:
    Worker(index, config, plan, num_classes, restart).run()


class Worker:
    def __init__(self, index: int, config, plan, num_classes: int, restart: int = 0):
        t, ps = config.train, config.ps
        self.index, self.config, self.plan, self.restart = index, config, plan, restart
        self.name = membership.worker_name(index, restart)
        torch.manual_seed(t.seed + index + ps.workers * restart)  # dropout masks differ
        self.model = _training_model(config, num_classes)
        self.params = dict(self.model.named_parameters())
        # The async mode runs on the CPU (config.check refuses a cuda device).
        self.autocast = resolve_precision(t.precision, torch.device("cpu")).dtype
        self.servers = [f"server{s}" for s in range(len(plan))]

    def send(self, to: str, endpoint, *args):
        return protocol.send(to, endpoint, *args, timeout=self.config.ps.rpc_timeout)

    def run(self) -> None:
        ps = self.config.ps
        loader = self._register()
        versions, stop = self._pull()
        in_flight: deque[list] = deque()
        batches = iter(loader)
        step = 0
        while not stop:
            loss = self._gradients(next(batches), step)
            in_flight.append(self._push(versions, loss.item(), loader.state_dict()))
            # Wait only beyond the cap; answers that are in already are collected anyway.
            while len(in_flight) > ps.push_in_flight or (
                in_flight and all(f.done() for f in in_flight[0])
            ):
                stop = _answered(in_flight.popleft()) or stop
            step += 1
            if not stop and step % ps.pull_every == 0:
                versions, stop = self._pull()
        while in_flight:
            _answered(in_flight.popleft())
        self.send(self.servers[0], protocol.leave, self.index).wait()

    def _register(self) -> ShardLoader:
        """This slot's data stream, from where server 0 says it continues."""
        d, ps = self.config.data, self.config.ps
        loader = ShardLoader.from_dataset(
            d.dataset, d.train_split, d, rank=self.index, world_size=ps.workers
        )
        answer = self.send(self.servers[0], protocol.register, self.index, self.name, self.restart)
        position, _ = answer.wait()
        if position is not None:  # resumed or replaced: continue this slot's data stream
            loader.load_state_dict(position)
        if self.restart:
            print(
                f"{self.name}: rejoined as restart {self.restart} of worker {self.index}, "
                f"data at {position}",
                flush=True,
            )
        return loader

    def _pull(self) -> tuple[list[int], bool]:
        """Every server's parameters into the model; (each server's version, stop)."""
        replies = [f.wait() for f in [self.send(s, protocol.pull) for s in self.servers]]
        with torch.no_grad():
            for pieces, (_, tensors, _) in zip(self.plan, replies, strict=True):
                mine = [p for p in pieces if p.name in self.params]
                for piece, tensor in zip(mine, tensors, strict=True):
                    target = self.params[piece.name]
                    target = target if piece.start is None else target[piece.start : piece.stop]
                    target.copy_(tensor)
        return [r[0] for r in replies], any(r[2] for r in replies)

    def _gradients(self, batch, step: int) -> torch.Tensor:
        """The batch's loss, its gradients in the model (clipped); a non-finite loss is
        reported to server 0 and ends this worker."""
        images = normalize(batch.images)
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.model(images)
        loss = masked_bce(logits, batch.targets, batch.mask)
        if not math.isfinite(loss.item()):
            message = f"worker {self.index}: loss is {loss.item()}"
            self.send(self.servers[0], protocol.fail, self.index, message)
            raise TrainingError(f"{message} at its step {step}")
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optim.grad_clip
        if clip:  # the worker has the whole gradient: clip before splitting
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        return loss

    def _push(self, versions: list[int], loss: float, position: dict) -> list:
        """Every server its pieces of the gradients and batch statistics; the futures."""
        state = self.model.state_dict(keep_vars=True)
        futures = []
        for s, pieces in enumerate(self.plan):
            grads = [p.take(self.params[p.name].grad) for p in pieces if p.name in self.params]
            stats = [
                None if is_count(p.name) else p.take(state[p.name])
                for p in pieces
                if p.name not in self.params
            ]
            # The loss and the data position go to server 0 only: it keeps the log and the
            # positions a checkpoint records.
            extra = (loss, position) if s == 0 else (None, None)
            args = (self.index, versions[s], grads, stats, self.config.data.batch_size)
            futures.append(self.send(self.servers[s], protocol.push, *args, *extra, self.name))
        return futures


def _training_model(config, num_classes: int) -> torch.nn.Module:
    """The model a worker trains; its weights come from the servers."""
    model = build_model(config.model, num_classes, config.data.channels, pretrained=False)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # The running statistics become this batch's statistics, which the servers fold
            # into theirs (server.py); the worker's own are never used (it only trains).
            module.momentum = 1.0
    model.train()
    return model


def _answered(futures: list) -> bool:
    """Waits for one push's answers; True if a server says stop."""
    return any(f.wait()[1] for f in futures)
