"""Reused shared-memory batch buffers: how a DataLoader worker hands its batches over.

torch sends a tensor made in a worker through a new shared-memory segment every time: the
worker copies the batch into fresh pages (page faults on every batch, a cost that shows
beside decoding), the main process maps the segment and faults its pages in again, and both
sides pay a file-descriptor handshake.
A BatchRing keeps a few buffers per worker alive instead. A worker writes a batch into a free
buffer of its own and sends only the buffer's number (the buffer itself, once, on first use);
the main process gives out views of it, and when the last view of a batch is gone, sends the
number back through a pipe. A worker that finds no buffer free (the main process holds them
all, e.g. ``list(loader)``) makes a batch the usual way: it never waits for one.

One ring serves one DataLoader iteration (one epoch): its workers start with every buffer of
theirs free, which only holds for a fresh ring.
"""

from __future__ import annotations

import contextlib
import multiprocessing

import numpy as np
import torch

SLOTS = 5  # per worker: 2 prefetched, 1 being filled, the batch in use and the one before it


class BatchRing:
    def __init__(self, workers: int, slots: int = SLOTS):
        self.slots = slots
        pipes = [multiprocessing.Pipe(duplex=False) for _ in range(workers)]
        self._release_readers = [reader for reader, _ in pipes]  # read by the workers
        self._release_writers = [writer for _, writer in pipes]  # written by the main process
        self._own: list[torch.Tensor] = []  # in a worker: its buffers
        self._free: list[int] = []  # in a worker: its buffers the main process gave back
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}  # in the main process

    # ---------------------------------------------------------------- in a worker

    def acquire(self, worker: int, nbytes: int) -> tuple[int, torch.Tensor, bool] | None:
        """(number, buffer, new) of a free buffer of this worker, or None if there is none.

        A reused buffer holds an older batch: the caller overwrites or zeroes every byte.
        """
        reader = self._release_readers[worker]
        while reader.poll():
            self._free.append(int.from_bytes(reader.recv_bytes(), "little"))
        if self._free:
            number = self._free.pop()
            return number, self._own[number], False
        if len(self._own) < self.slots:
            self._own.append(torch.zeros(nbytes, dtype=torch.uint8).share_memory_())
            return len(self._own) - 1, self._own[-1], True
        return None

    # ---------------------------------------------------------------- in the main process

    def take(self, worker: int, number: int, buffer: torch.Tensor | None) -> torch.Tensor:
        """The batch in buffer ``number`` of ``worker`` (``buffer``: sent with its first use),
        as a tensor that gives the buffer back when it and every view of it are gone."""
        if buffer is not None:
            self._buffers[worker, number] = buffer
        owner = _Lease(self._buffers[worker, number], self._release_writers[worker], number)
        return torch.from_numpy(np.asarray(owner))


class _Lease:
    """Owns a view of a ring buffer; gives the buffer back when garbage (numpy arrays made from
    it keep it alive, and torch.from_numpy keeps the array alive)."""

    def __init__(self, buffer: torch.Tensor, writer, number: int):
        self.buffer, self.writer, self.number = buffer, writer, number
        self.__array_interface__ = buffer.numpy().__array_interface__

    def __del__(self):
        # OSError, ValueError: the ring is gone (its epoch has ended), nothing to give back.
        with contextlib.suppress(OSError, ValueError):
            self.writer.send_bytes(self.number.to_bytes(4, "little"))
