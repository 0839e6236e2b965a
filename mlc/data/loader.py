"""ShardLoader: what training and evaluation iterate; runs EpochStream in DataLoader workers."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mlc.data.pipeline import EpochStream, LoaderConfig, batch_views
from mlc.data.ring import BatchRing
from mlc.data.urls import Shard, dataset_shards, read_dataset_json
from mlc.format import CLASSES_FILE


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W], channels_last; normalize() makes it [-1, 1]
    targets: torch.Tensor  # uint8 [B, classes]: 1 = positive
    mask: torch.Tensor  # uint8 [B, classes]: 1 = label known (positive or verified negative)
    valid: torch.Tensor  # bool [B]: False for eval padding
    keys: list[str]  # sample keys ("" for padding)

    def valid_rows(self) -> Batch:
        """The batch without its eval padding, for inference: the padded rows' forward is work
        thrown away (at 10,000 images in batches of 256, 2.4% of the pass). A view when the
        valid rows come first, as the loader writes them; possibly an empty batch."""
        n = int(self.valid.sum())
        if n == len(self.valid):
            return self
        if bool(self.valid[:n].all()):
            rows = slice(0, n)
            images = self.images[rows]
        else:
            rows = self.valid
            images = self.images[rows].contiguous(memory_format=torch.channels_last)
        keys = [key for key, ok in zip(self.keys, self.valid.tolist(), strict=True) if ok]
        return Batch(images, self.targets[rows], self.mask[rows], self.valid[rows], keys)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardLoader:
    """Batches of one rank. Train mode is endless (epoch after epoch); eval mode is one pass.

    ``state_dict()`` is the position after the batches handed out so far; a loader given it by
    ``load_state_dict`` continues with the very next batch (docs/loader.md). ``counts()`` is
    what this rank read against the split's stats: lost samples by shard, repeats, problems.
    """

    def __init__(
        self,
        shards: list[Shard],
        num_classes: int,
        config: LoaderConfig,
        full_annotation: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ):
        if not shards:
            raise ValueError("no shards given")
        if not config.allow_pipe and any(s.url.startswith("pipe:") for s in shards):
            raise ValueError(
                "the shard list has pipe: URLs, which run commands: set allow_pipe (config "
                "data.allow_pipe) to true if the list is yours"
            )
        default_rank, default_world = _rank_and_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.shards, self.num_classes, self.config = shards, num_classes, config
        self.full_annotation, self.pin_memory = full_annotation, pin_memory
        self.epoch, self.batch = 0, 0
        # This rank's counts (docs/loader.md, mlc.data.counts):
        self.problems: Counter = Counter()  # unreadable shards, corrupt samples, ... by reason
        self.lost: Counter = Counter()  # shard URL -> samples of its stats that reached no batch
        self.repeated = 0  # samples handed out a second time in their epoch (train)
        self.expected = 0  # samples of the split this rank was to read in the passes begun
        self.skipped_keys: list[str] = []  # corrupt samples' keys (first 1000)
        slots = self.world_size * max(1, config.num_workers)
        if config.mode == "train" and sum(s.samples for s in shards) < slots * config.batch_size:
            raise ValueError(
                f"{sum(s.samples for s in shards)} samples in {len(shards)} shards cannot give "
                f"every one of {self.world_size} ranks x {max(1, config.num_workers)} workers a "
                f"full batch of {config.batch_size} of its own: use fewer workers or a smaller "
                "batch"
            )

    @classmethod
    def from_dataset(cls, folder: str | Path, split: str, config: LoaderConfig, **kwargs):
        """An `mlc shard` folder, by path or URL (s3://, gs://, http(s)://, ...: read through
        mlc.storage): shards and counts from <split>.stats.json, classes from classes.json."""
        shards = dataset_shards(folder, split)  # first: its error says what the folder should be
        classes = read_dataset_json(folder, CLASSES_FILE)
        return cls(
            shards,
            len(classes["classes"]),
            config,
            full_annotation=classes["annotation"] == "full",
            **kwargs,
        )

    def _stream(self, epoch: int, start: int, ring: BatchRing | None = None) -> EpochStream:
        return EpochStream(
            self.shards,
            self.num_classes,
            self.full_annotation,
            self.config,
            self.rank,
            self.world_size,
            epoch,
            start,
            ring,
        )

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches this rank yields in an epoch: the same on every rank."""
        stream = self._stream(self.epoch if epoch is None else epoch, 0)
        return stream.batches_per_worker() * stream.workers()

    def counts(self) -> dict:
        """What this rank read against the split's stats so far (mlc.data.counts merges ranks)."""
        return {
            "expected": self.expected,
            "lost": sum(self.lost.values()),
            "lost_by_shard": dict(self.lost),
            "repeated": self.repeated,
            "problems": dict(self.problems),
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        while True:
            workers = self.config.num_workers
            # Reused shared-memory buffers between the workers and this process (mlc.data.ring);
            # not with pin_memory, whose thread would pin a copy of a buffer, not the buffer.
            ring = BatchRing(workers) if workers and not self.pin_memory else None
            stream = self._stream(self.epoch, self.batch, ring)
            self.expected += stream.rank_samples()
            if workers == 0 and not self.pin_memory:
                # In this process: a DataLoader would only walk every batch's key list again
                # (default_convert), per-sample work with nothing to show for it.
                loader = stream
            else:
                loader = DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=workers,
                    pin_memory=self.pin_memory,
                    prefetch_factor=2 if workers else None,
                    # Its own generator: creating an iterator must not draw from torch's global
                    # RNG, or a resumed run's dropout masks would differ from an uninterrupted
                    # one.
                    generator=torch.Generator(),
                )
            for raw in loader:
                self.batch += 1
                self.problems.update(raw["problems"])
                self.lost.update(raw["lost"])
                self.repeated += raw["repeated"]
                if len(self.skipped_keys) < 1000:
                    self.skipped_keys.extend(raw["skipped"][: 1000 - len(self.skipped_keys)])
                c = self.config
                packed = raw.get("packed")
                if packed is None:
                    packed = ring.take(*raw["slot"], raw["buffer"])
                images, targets, mask, valid = batch_views(
                    packed, c.batch_size, c.image_size, c.channels, self.num_classes
                )
                # NHWC storage viewed as NCHW: channels_last, no copy.
                images = images.permute(0, 3, 1, 2)
                yield Batch(images, targets, mask, valid.view(torch.bool), raw["keys"])
            if self.config.mode == "eval":
                self.batch = 0  # the next pass (the next validation) starts from the top
                return
            self.epoch, self.batch = self.epoch + 1, 0
