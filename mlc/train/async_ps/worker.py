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
    t, d, ps = config.train, config.data, config.ps
    name = membership.worker_name(index, restart)
    torch.manual_seed(t.seed + index + ps.workers * restart)  # dropout masks differ
    # Its weights come from the servers.
    model = build_model(config.model, num_classes, d.channels, pretrained=False)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # The running statistics become this batch's statistics, which the servers fold
            # into theirs (server.py); the worker's own are never used (it only trains).
            module.momentum = 1.0
    model.train()
    trainable = {name for name, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    autocast = torch.bfloat16 if t.precision == "bf16" else None
    servers = [f"server{s}" for s in range(len(plan))]

    def call(to: str, func, *args):
        return protocol.send(to, func, *args, timeout=ps.rpc_timeout)

    loader = ShardLoader.from_dataset(
        d.dataset, d.train_split, d, rank=index, world_size=ps.workers
    )
    position, stop = call(servers[0], protocol.register, index, name, restart).wait()
    if position is not None:  # resumed or replaced: continue this slot's data stream
        loader.load_state_dict(position)
    if restart:
        print(
            f"{name}: rejoined as restart {restart} of worker {index}, data at {position}",
            flush=True,
        )

    def pull() -> tuple[list[int], bool]:
        replies = [f.wait() for f in [call(name, protocol.pull) for name in servers]]
        with torch.no_grad():
            for pieces, (_, tensors, _) in zip(plan, replies, strict=True):
                mine = [p for p in pieces if p.name in trainable]
                for piece, tensor in zip(mine, tensors, strict=True):
                    target = params[piece.name]
                    target = target if piece.start is None else target[piece.start : piece.stop]
                    target.copy_(tensor)
        return [r[0] for r in replies], any(r[2] for r in replies)

    versions, stop = pull()
    in_flight: deque[list] = deque()

    def answered(futures: list) -> bool:  # waits; True if a server says stop
        return any(f.wait()[1] for f in futures)

    batches = iter(loader)
    step = 0
    while not stop:
        batch = next(batches)
        images = normalize(batch.images)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            logits = model(images)
        loss = masked_bce(logits, batch.targets, batch.mask)
        if not math.isfinite(loss.item()):
            call(servers[0], protocol.fail, index, f"worker {index}: loss is {loss.item()}")
            raise TrainingError(f"worker {index}: loss is {loss.item()} at its step {step}")
        model.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:  # the worker has the whole gradient: clip before splitting
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        state = model.state_dict(keep_vars=True)
        futures = []
        for s, pieces in enumerate(plan):
            grads = [p.take(params[p.name].grad) for p in pieces if p.name in trainable]
            stats = [
                None if is_count(p.name) else p.take(state[p.name])
                for p in pieces
                if p.name not in trainable
            ]
            # The loss and the data position go to server 0 only: it keeps the log and the
            # positions a checkpoint records.
            extra = (loss.item(), loader.state_dict()) if s == 0 else (None, None)
            args = (index, versions[s], grads, stats, d.batch_size, *extra, name)
            futures.append(call(servers[s], protocol.push, *args))
        in_flight.append(futures)
        while len(in_flight) > ps.push_in_flight or (
            in_flight and all(f.done() for f in in_flight[0])
        ):
            stop = answered(in_flight.popleft()) or stop
        step += 1
        if not stop and step % ps.pull_every == 0:
            versions, stop = pull()
    while in_flight:
        answered(in_flight.popleft())
    call(servers[0], protocol.leave, index).wait()
