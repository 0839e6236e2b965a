"""Workers that decode only while the main process waits for a batch.

On a machine whose cores are all taken by torch's threads, a DataLoader worker that decodes
during the training step slows the step by more than the decoding it hides: an interrupted
thread holds up the others at every parallel region's barrier. So, there, the workers pause
during the step and decode together, in parallel, while the main process waits: with two
workers a batch's decoding takes about half the wall time it takes in the main process.

The gate is a pipe: open while it holds a byte. Workers poll it (about a microsecond per
sample); the main process writes the byte when it starts waiting and reads it back when it
has its batch. Not a multiprocessing.Event: Event.set() waits until every sleeping waiter has
woken, so it hangs for good once a worker has died while waiting (as the interpreter's exit,
which terminates the workers first, showed).
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable


class Turn:
    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._open = False
        self._poll = None  # made in the worker that waits

    def open(self) -> None:
        if not self._open:
            os.write(self._write, b"1")
            self._open = True

    def shut(self) -> None:
        if self._open:
            os.read(self._read, 1)
            self._open = False

    def wait(self) -> None:
        """Block until the gate is open (or the main process has closed the pipe)."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._read, select.POLLIN)
        self._poll.poll()

    def close(self) -> None:
        """End of the epoch: the gate stays open for good (a worker's copy of the pipe still
        reads the byte), so no worker can wait on it any more."""
        self.open()
        os.close(self._read)
        os.close(self._write)


def wait_for_turn(samples: Iterable, turn: Turn):
    """Worker stage: hold each sample until the main process waits for a batch."""
    for sample in samples:
        turn.wait()
        yield sample


def taking_turns(batches: Iterable, turn: Turn | None):
    """Main process: the loader's batches, the gate open only while waiting for one."""
    if turn is None:
        yield from batches
        return
    batches = iter(batches)
    try:
        while True:
            turn.open()
            try:
                batch = next(batches)
            except StopIteration:
                return
            turn.shut()
            yield batch
    finally:
        # Consumer gone (end, break, error): paused workers must run on to their shutdown
        # check, or the DataLoader waits 5 s for each before killing it.
        turn.close()
