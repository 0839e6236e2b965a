"""Which server owns which tensor: the head split by class rows, the rest balanced by size.

A plan is a list per server of ``Piece(name, start, stop)``: rows ``start:stop`` of the model
tensor ``name`` (``start = stop = None``: the whole tensor). Every class row of the head is on
exactly one server, in contiguous ranges; every other tensor (parameters and batch-norm
statistics) is whole on one server, placed largest first on the server with the fewest
elements so far. The plan depends only on the tensor names and shapes, so every process
computes the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEAD = ("head.weight", "head.bias")  # split by class rows (dim 0)


@dataclass(frozen=True)
class Piece:
    name: str
    start: int | None = None
    stop: int | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of the full tensor, as its own contiguous copy: views would make RPC send
        the whole storage."""
        part = tensor if self.start is None else tensor[self.start : self.stop]
        return part.detach().contiguous().clone()


def plan_shards(shapes: dict[str, tuple[int, ...]], servers: int) -> list[list[Piece]]:
    """shapes: name -> shape of every tensor the servers keep (parameters, then buffers)."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    plan: list[list[Piece]] = [[] for _ in range(servers)]
    load = [0] * servers
    rows = shapes[HEAD[0]][0]
    if rows < servers:
        raise ValueError(f"{rows} classes cannot be split across {servers} servers")
    bounds = [rows * s // servers for s in range(servers + 1)]  # sizes differ by <= 1 row
    for s in range(servers):
        for name in HEAD:
            if name in shapes:
                piece = Piece(name, bounds[s], bounds[s + 1])
                plan[s].append(piece)
                load[s] += _numel(shapes[name]) // rows * (piece.stop - piece.start)
    others = sorted((n for n in shapes if n not in HEAD), key=lambda n: (-_numel(shapes[n]), n))
    for name in others:
        s = min(range(servers), key=lambda i: (load[i], i))
        plan[s].append(Piece(name))
        load[s] += _numel(shapes[name])
    # Each server keeps its pieces in model order: the optimizer state follows that order.
    order = {name: i for i, name in enumerate(shapes)}
    return [sorted(p, key=lambda x: (order[x.name], x.start or 0)) for p in plan]


def assemble(plan: list[list[Piece]], parts: list[list[torch.Tensor]]) -> dict:
    """The full tensors (name -> tensor) from every server's pieces (in plan order)."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for server, part in zip(plan, parts, strict=True):
        for piece, tensor in zip(server, part, strict=True):
            pieces.setdefault(piece.name, []).append((piece.start or 0, tensor))
    return {
        name: found[0][1] if len(found) == 1 else torch.cat([t for _, t in sorted(found)])
        for name, found in pieces.items()
    }


def split(plan: list[list[Piece]], tensors: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """The inverse of assemble: every server's pieces of the full tensors."""
    return [[piece.take(tensors[piece.name]) for piece in server] for server in plan]


def piece_bytes(piece: Piece, shapes: dict, element_size: int = 4) -> int:
    shape = shapes[piece.name]
    rows = shape[0] if shape else 1
    if piece.start is None:
        return _numel(shape) * element_size
    return _numel(shape) // rows * (piece.stop - piece.start) * element_size


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
