"""A consistent cut of the servers as a checkpoint, and a checkpoint back as every server's
state.

Server 0 takes the cut (``ServerGroup.cut``: every server paused, each one's snapshot, all
resumed). These functions turn the snapshots into the checkpoint's contents: the model gathered
into one state dict (head rows in order, so ``mlc eval`` and the synchronous job's tools read
it), each server's optimizer state and counters, each worker's data position. On
``--resume`` they check that the checkpoint fits this job and split it into each server's
part.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mlc.config import to_dict
from mlc.train.async_ps.plan import Piece, assemble, split
from mlc.train.loop import TrainingError

COUNTERS = ("version", "received", "samples", "staleness", "dropped")  # a server's, saved


def plan_entries(plan: list[list[Piece]]) -> list[list[tuple]]:
    """The plan as a checkpoint stores it: (name, start, stop) per piece, per server."""
    return [[(p.name, p.start, p.stop) for p in pieces] for pieces in plan]


def gathered_state(plan: list[list[Piece]], model: torch.nn.Module, snaps: list[dict]) -> dict:
    """The model's full state dict from every server's snapshot."""
    trainable = _trainable(model)
    parts = []
    for pieces, snap in zip(plan, snaps, strict=True):
        params, buffers = iter(snap["params"]), iter(snap["buffers"])
        parts.append([next(params) if p.name in trainable else next(buffers) for p in pieces])
    full = assemble(plan, parts)
    return {name: full[name] for name in model.state_dict()}


def checkpoint_state(config, plan, model, snaps: list[dict], best: float, class_ids) -> dict:
    """What an async checkpoint holds (docs/async.md); server 0's counters are the job's."""
    first = snaps[0]
    return {
        "mode": "async",
        "model": gathered_state(plan, model, snaps),
        "optimizer": [s["optimizer"] for s in snaps],
        "servers": [{k: s[k] for k in COUNTERS} for s in snaps],
        "plan": plan_entries(plan),
        "loader": [first["loader"].get(w) for w in range(config.ps.workers)],
        "samples": first["samples"],
        "step": first["version"],
        "best": best,
        "config": to_dict(config),
        "class_ids": class_ids,
    }


def check_resumable(path: Path, state: dict, plan, class_ids, ps) -> None:
    """TrainingError unless the checkpoint was written by an async job with the same classes,
    plan (ps.servers and model) and ps.workers; the message names the key to fix."""
    if state.get("mode") != "async":
        raise TrainingError(f"{path} was written by the synchronous job; resume it there")
    if state["class_ids"] != class_ids:
        raise TrainingError(f"{path} was trained on other classes than the dataset's")
    saved = [[tuple(x) for x in server_plan] for server_plan in state["plan"]]
    if saved != plan_entries(plan):
        raise TrainingError(
            f"{path} was written with ps.servers={len(saved)} (or another model); resume "
            f"with the same ps.servers and model (now {ps.servers})"
        )
    if len(state["loader"]) != ps.workers:
        raise TrainingError(
            f"{path} was written with ps.workers={len(state['loader'])}; resume with the "
            f"same number of workers (now {ps.workers}): each continues its own data"
        )


def server_parts(plan: list[list[Piece]], model: torch.nn.Module, state: dict) -> list[dict]:
    """Each server's state from a checkpoint, as Server.load takes it. Only server 0 gets the
    workers' data positions (it hands them out when the workers register)."""
    pieces = split(plan, state["model"])
    trainable = _trainable(model)
    positions = {w: pos for w, pos in enumerate(state["loader"]) if pos is not None}
    parts = []
    for s, counters in enumerate(state["servers"]):
        own = list(zip(plan[s], pieces[s], strict=True))
        parts.append(
            {
                "params": [t for p, t in own if p.name in trainable],
                "buffers": [t for p, t in own if p.name not in trainable],
                "optimizer": state["optimizer"][s],
                "loader": positions if s == 0 else {},
                **counters,
            }
        )
    return parts


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}
