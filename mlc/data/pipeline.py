"""The streaming loader: an explicit list of stages from shard URLs to batches.

    shards -> per-epoch shard shuffle -> split by node and worker (equal ranges of samples)
      -> tar expansion (counted against the stats) -> sample shuffle buffer (raw bytes)
      -> skip consumed -> decode + augment -> batch (a fixed number per worker)

Every (rank, worker) "slot" yields the same number of batches per epoch, computed from the
shard sample counts before anything is read, so DDP ranks never wait on each other; every
sample of the split is read once per epoch (docs/loader.md has the guarantees: equal counts,
coverage, padding and repeats, lost samples, resume).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mlc.config import LoaderConfig
from mlc.data.decode import DecodeError, KeyedRandom, as_array, resize_eval, resize_train
from mlc.data.ring import BatchRing
from mlc.data.tarstream import tar_members
from mlc.data.urls import Shard, ShardOpenError, open_with_retries
from mlc.format import IMAGE_EXTENSIONS

log = logging.getLogger("mlc.data")
IMAGE_SUFFIXES = set(IMAGE_EXTENSIONS.values())


@dataclass(frozen=True)
class Piece:
    """Samples ``start`` to ``stop`` (in tar order) of one shard: the unit given to a slot. A shard
    is cut into several pieces where a slot's range ends inside it."""

    url: str
    samples: int  # the shard's, from the split's stats
    start: int = 0
    stop: int = 0

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        if self.start == 0 and self.stop == self.samples:
            return self.url
        return f"{self.url} (samples {self.start}-{self.stop - 1} of {self.samples})"


# ---------------------------------------------------------------- stages on the shard list


def shuffle_shards(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    """A different shard order every epoch (seed + epoch), the same on every rank."""
    if not shuffle:
        return list(shards)
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def split_shards(shards: list[Shard], slots: int) -> list[list[Piece]]:
    """Lay the shards end to end and cut the sequence into ``slots`` consecutive sample ranges
    whose sizes differ by at most one; a shard that a cut falls into becomes two pieces (or
    more). Every sample is in exactly one slot, whatever the shard sizes; the plan is the same
    on every rank."""
    total = sum(s.samples for s in shards)
    bounds = [total * i // slots for i in range(slots + 1)]  # slot i: bounds[i] to bounds[i + 1]
    plan: list[list[Piece]] = [[] for _ in range(slots)]
    slot, first = 0, 0  # first: the shard's first sample in the whole sequence
    for shard in shards:
        start, end = first, first + shard.samples
        while start < end:
            while bounds[slot + 1] <= start:
                slot += 1
            stop = min(end, bounds[slot + 1])
            plan[slot].append(Piece(shard.url, shard.samples, start - first, stop - first))
            start = stop
        first = end
    return plan


def batches_per_slot(plan: list[list[Piece]], batch_size: int) -> int:
    """The batches the largest slot needs; the others fill theirs up: in train mode with a
    second look at some of their own samples (counted as repeated), in eval mode with padding
    (valid=False). Every sample is in a batch, every slot yields the same number."""
    return math.ceil(max(sum(p.size for p in pieces) for pieces in plan) / batch_size)


# ---------------------------------------------------------------- stages on samples


SAMPLE_REASONS = ("corrupt sample", "incomplete sample")  # problems that skip one sample


@dataclass
class Problems:
    """What a worker skipped or lost since its last batch (it travels with the next batch):
    counts by reason, samples lost by shard, and the keys of skipped samples.

    Lost samples are the samples of the split's stats that reach no batch: the rest of a piece
    whose shard cannot be opened, breaks off or ends early, and samples skipped as corrupt or
    incomplete. A quiet one counts and logs nothing (a repeat pass, whose damage the first pass
    has already reported).
    """

    counts: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)  # shard URL -> samples
    keys: list[str] = field(default_factory=list)
    quiet: bool = False
    logged: int = 0  # sample messages so far, for the rate limit

    def skip_sample(self, reason: str, key: str, shard: str, detail: object) -> None:
        if self.quiet:
            return
        self.counts[reason] += 1
        self.lost[shard] += 1
        self.keys.append(key)
        self.logged += 1
        if self.logged <= 10 or self.logged % 1000 == 0:  # rate-limited log; the counts are exact
            log.warning(
                "%s %s of shard %s skipped (%d in this worker): %s",
                reason,
                key,
                shard,
                self.logged,
                detail,
            )

    def short_piece(self, piece: Piece, read: int, position: int, why: str, kind: str) -> None:
        """A piece of which only ``read`` samples were there; the shard's damage is at key group
        ``position``, and the piece holding that position counts the shard (once per pass)."""
        if self.quiet:
            return
        lost = piece.size - read
        self.lost[piece.url] += lost
        if piece.start <= position < piece.stop:
            self.counts[kind] += 1
        log.error(
            "shard %s: read %d of %d samples (%s); %d lost",
            piece.describe(),
            read,
            piece.size,
            why,
            lost,
        )

    def clear(self) -> None:
        self.counts.clear()
        self.lost.clear()
        self.keys.clear()


def expand_tars(pieces: list[Piece], config: LoaderConfig, problems: Problems, repeat=False):
    """Raw samples {key, image, ext, json, shard, repeat} of the pieces, in order."""
    for piece in pieces:
        yield from read_piece(piece, config, problems, repeat)


def read_piece(piece: Piece, config: LoaderConfig, problems: Problems, repeat: bool = False):
    """The complete samples of a piece's range, counted against the shard's stats: what the
    shard does not deliver (it cannot be opened, breaks off or ends early) is lost. A shard is
    read from its start; the samples before the range are passed over, not decoded."""
    try:
        stream = open_with_retries(piece.url, config.retries, config.allow_pipe)
    except ShardOpenError as e:
        problems.short_piece(piece, 0, 0, f"cannot be opened: {e}", "unreadable shard")
        return
    read, position, error = 0, 0, None  # position: key groups of the shard passed so far
    try:
        for sample in _tar_samples(stream):
            if position >= piece.start:
                read += 1
                if _complete(sample, piece.url, problems):
                    sample["shard"], sample["repeat"] = piece.url, repeat
                    yield sample
            position += 1
            if position == piece.stop:
                break
    except (OSError, tarfile.TarError) as e:
        error = e
    finally:
        try:
            stream.close()  # a pipe: command's failure shows here
        except OSError as e:
            error = error or e
    if read < piece.size:
        why = str(error) if error else f"the shard ends after {position} of {piece.samples}"
        kind = "unreadable shard" if position == 0 else "damaged shard"  # read nothing / part
        problems.short_piece(piece, read, position, why, kind)
    elif error:
        log.warning("shard %s: every sample read, then: %s", piece.describe(), error)


def passes(make_pass: Callable[[int], Iterable[dict]], repeat: bool):
    """One pass over a slot's pieces, or (train) pass after pass: the samples a slot needs
    beyond its own (to fill its last batch, or what damaged data took) come from repeat passes.
    Each pass is shuffled on its own, so no sample comes back before the pass that holds it has
    ended."""
    for number in itertools.count():
        samples = iter(make_pass(number))
        first = next(samples, None)
        if first is not None:
            yield first
            yield from samples  # (not a Python loop: no per-sample interpreter step here)
        if not repeat:
            return
        if first is None and number > 0:  # a repeat pass reads every slot's pieces
            raise ShardOpenError("no readable sample in any of the shards")


def _tar_samples(stream) -> Iterator[dict]:
    """Group consecutive tar members by key (the name up to the first dot): every key's group,
    complete or not, so that positions in a shard count samples as its stats do. Where the tar
    breaks off, the group before the damage is kept if it has its image and json."""
    current: dict = {}
    try:
        for name, data in tar_members(stream):
            key, _, suffix = name.rpartition("/")[2].partition(".")
            if current and key != current["key"]:
                yield current
                current = {}
            current["key"] = key
            if suffix == "json":
                current["json"] = data
            elif suffix in IMAGE_SUFFIXES:
                current["image"], current["ext"] = data, suffix
    except (OSError, tarfile.TarError):
        if "json" in current and "image" in current:
            yield current
        raise
    if current:
        yield current


def _complete(sample: dict, url: str, problems: Problems) -> bool:
    """Whether a sample has its image and json; if not, it is counted as skipped."""
    if "json" in sample and "image" in sample:
        return True
    problems.skip_sample("incomplete sample", sample["key"], url, "no image or json")
    return False


def shuffle_samples(samples: Iterable[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """A shuffle buffer over raw (undecoded) samples: cheap to hold, decoded after."""
    return iter(samples) if size <= 1 else _shuffled(samples, size, rng)


def _shuffled(samples: Iterable[dict], size: int, rng: np.random.Generator):
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def skip(samples: Iterable[dict], count: int) -> Iterator[dict]:
    """Drop the samples a resumed run already consumed (before decoding them)."""
    return itertools.islice(samples, count, None)


def sample_rng(seed: int, epoch: int, key: str) -> KeyedRandom:
    """Augmentation randomness fixed by (seed, epoch, key): the same crops after a resume, in
    any process (a hash of the text, not Python's per-process salted hash())."""
    return KeyedRandom(f"{seed}:{epoch}:{key}")


# The layout mlc.format.encode_sample_json writes: {"id":"<JSON string>","positives":[ints],
# "negatives":[ints],... (compact, in that order; the ints as JSON writes them).
_INT = rb"(?:0|[1-9][0-9]*)"
_LIST = rb"\[((?:" + _INT + rb"(?:," + _INT + rb")*)?)\]"
_WRITTEN = re.compile(
    rb'\{"id":"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*","positives":'
    + _LIST
    + rb',"negatives":'
    + _LIST
)


def parse_labels(data: bytes, num_classes: int) -> tuple[list[int], list[int]]:
    """(positives, negatives) of a sample's json; ValueError if they are not class indices.

    A json in the layout mlc shard writes is read by one regular expression, up to its
    negatives, which is cheaper than the json module's full parse; any other goes through
    json.loads.
    """
    written = _WRITTEN.match(data)
    if written:
        lists = [[int(v) for v in text.split(b",")] if text else [] for text in written.groups()]
        if all(not values or max(values) < num_classes for values in lists):
            return lists[0], lists[1]
    labels = json.loads(data)
    lists = []
    for field_name in ("positives", "negatives"):
        values = labels.get(field_name) if isinstance(labels, dict) else None
        indices = (
            isinstance(values, list)
            and all(type(v) is int for v in values)  # not bool, a subclass of int
            and (not values or min(values) >= 0 and max(values) < num_classes)
        )
        if not indices:
            raise ValueError(f"{field_name} is not a list of class indices < {num_classes}")
        lists.append(values)
    return lists[0], lists[1]


def decode_samples(samples, config: LoaderConfig, epoch: int, num_classes: int, problems: Problems):
    train, size, channels = config.mode == "train", config.image_size, config.channels
    for sample in samples:
        try:
            labels = parse_labels(sample["json"], num_classes)
            if train:
                rng = sample_rng(config.seed, epoch, sample["key"])
                image, flip = resize_train(sample["image"], size, rng, channels, config.crop_scale)
            else:
                flip = False
                image = resize_eval(sample["image"], size, config.crop_fraction, channels)
        except (DecodeError, ValueError) as e:
            if not sample["repeat"]:  # (a repeat pass's damage was counted in the first pass)
                problems.skip_sample("corrupt sample", sample["key"], sample["shard"], e)
            continue
        yield sample["key"], image, flip, labels, sample["repeat"]


def batch_views(packed, batch: int, size: int, channels: int, num_classes: int):
    """(images NHWC, targets, mask, valid) as views of one flat uint8 buffer (numpy or torch).

    A batch crosses from a DataLoader worker to the main process as this one buffer: torch
    hands every tensor over through its own shared-memory file and socket handshake, a fixed
    cost per tensor that is large beside the decoding of a batch of small images.
    """
    ends = np.cumsum([batch * size * size * channels, batch * num_classes, batch * num_classes])
    images = packed[: ends[0]].reshape(batch, size, size, channels)
    targets = packed[ends[0] : ends[1]].reshape(batch, num_classes)
    mask = packed[ends[1] : ends[2]].reshape(batch, num_classes)
    valid = packed[ends[2] : ends[2] + batch]
    return images, targets, mask, valid


def packed_size(batch: int, size: int, channels: int, num_classes: int) -> int:
    return batch * (size * size * channels + 2 * num_classes + 1)


def new_buffer(size: int) -> tuple[np.ndarray, dict]:
    """A batch buffer and what the batch's message carries of it: the buffer itself."""
    packed = np.zeros(size, dtype=np.uint8)
    return packed, {"packed": torch.from_numpy(packed)}


def make_batches(
    decoded,
    config: LoaderConfig,
    count: int,
    num_classes: int,
    full: bool,
    problems: Problems,
    buffers: Callable[[int], tuple[np.ndarray, dict]] = new_buffer,
):
    """Exactly ``count`` batches; eval pads the last ones with invalid entries (valid=False).

    ``buffers(size)`` gives each batch's buffer (any content: every byte is written here) and
    the entries of the batch's message that stand for it (mlc.data.ring reuses buffers). A
    batch's message carries what the worker skipped and lost since the previous one, and how
    many of its samples are repeats.
    """
    shape = (config.batch_size, config.image_size, config.channels, num_classes)
    decoded = iter(decoded)
    for number in range(count):
        packed, message = buffers(packed_size(*shape))
        images, targets, mask, valid = batch_views(packed, *shape)
        packed[images.size :] = 0  # targets, mask, valid
        rows = BatchImages(images)
        keys = [""] * config.batch_size
        positive_rows, positive_cols, known_rows, known_cols = [], [], [], []  # set once per batch
        filled = repeated = 0
        for i in range(config.batch_size):
            item = next(decoded, None)
            if item is None:
                if config.mode == "train":
                    raise AssertionError("a train slot ran dry")  # passes() repeats
                break
            keys[i], image, flip, (positives, negatives), repeat = item
            repeated += repeat
            rows.put(i, image, flip)
            positive_rows += [i] * len(positives)
            positive_cols += positives
            if not full:
                known_rows += [i] * (len(positives) + len(negatives))
                known_cols += positives + negatives
            filled = i + 1
        if config.mode == "eval" and number == count - 1:
            next(decoded, None)  # the end of the stream: its last shard's report rides along
        rows.finish()
        images[filled:] = 0  # eval padding
        valid[:filled] = 1
        targets[positive_rows, positive_cols] = 1
        if full:
            mask[:filled] = 1
        else:
            mask[known_rows, known_cols] = 1
        batch = {
            **message,
            "keys": keys,
            "repeated": repeated,
            "skipped": list(problems.keys),  # since the previous batch of this worker
            "problems": dict(problems.counts),
            "lost": dict(problems.lost),
        }
        problems.clear()
        yield batch


def _shares_memory() -> bool:
    """Whether a PIL image made by frombuffer over a numpy array, marked writable, pastes into
    that array (Pillow maps "L" buffers; checked once, so that a Pillow that copies instead
    falls back to the plain path rather than giving blank images)."""
    target = np.zeros((2, 2), dtype=np.uint8)
    view = Image.frombuffer("L", (2, 2), target, "raw", "L", 0, 1)
    view.readonly = 0  # paste in place: the buffer is a writable numpy array
    view.paste(Image.new("L", (1, 1), 7), (1, 1))
    return int(target[1, 1]) == 7


class BatchImages:
    """Writes resized images into a batch's NHWC uint8 rows.

    Grayscale images are pasted by PIL into a one-channel buffer (a PIL view of it), not copied out
    through numpy (np.asarray would copy the image once more); for an RGB batch that channel is
    copied into the three at the end, for the whole batch (three strided numpy copies, which beat a
    torch copy of the broadcast view). Gray rows are flipped at the end too (color crops come
    mirrored from mlc.data.decode already; an unresized color image is mirrored by as_array as it
    comes in).
    Fashion-MNIST-like data is all grayscale.
    """

    paste = None  # _shares_memory(), on first use

    def __init__(self, images: np.ndarray):
        self.images, self.gray, self.view = images, None, None
        self.gray_rows: list[int] = []
        self.flips: list[int] = []

    def put(self, i: int, image: Image.Image | np.ndarray, flip: bool) -> None:
        """Row i: a resized PIL image, or pixels as an HxW (gray) or HxWxC array."""
        if BatchImages.paste is None:
            BatchImages.paste = _shares_memory()
        if isinstance(image, np.ndarray) and image.ndim == 2:
            self._gray()[i, :, :, 0] = image
        elif isinstance(image, Image.Image) and image.mode == "L" and BatchImages.paste:
            self._gray_view().paste(image, (0, i * self.images.shape[1]))
        else:
            self.images[i] = as_array(image, self.images.shape[3], flip)
            return
        if self.images.shape[3] == 3:
            self.gray_rows.append(i)
        if flip:
            self.flips.append(i)

    def _gray(self) -> np.ndarray:
        """The one-channel rows: the batch itself for a gray model, else a buffer."""
        if self.gray is None:
            batch, height, width, channels = self.images.shape
            shape = (batch, height, width, 1)
            self.gray = self.images if channels == 1 else np.zeros(shape, dtype=np.uint8)
        return self.gray

    def _gray_view(self) -> Image.Image:
        """A writable PIL image over the one-channel rows, stacked vertically."""
        if self.view is None:
            batch, height, width, _ = self._gray().shape
            self.view = Image.frombuffer("L", (width, batch * height), self.gray, "raw", "L", 0, 1)
            self.view.readonly = 0  # paste in place: the buffer is a writable numpy array
        return self.view

    def finish(self) -> None:
        if self.gray is None:
            return
        if self.flips:  # numpy's reversed-view copy: cheaper here than torch's flip()
            self.gray[self.flips] = self.gray[self.flips, :, ::-1]
        if not self.gray_rows:
            return
        rows = slice(None) if len(self.gray_rows) == len(self.images) else self.gray_rows
        for channel in range(3):  # three strided copies: cheaper than one broadcast copy
            self.images[rows, :, :, channel] = self.gray[rows, :, :, 0]


# ---------------------------------------------------------------- one rank's epoch


class EpochStream(IterableDataset):
    """The batches of one rank for one epoch; each DataLoader worker runs the stages for its
    own slot."""

    def __init__(
        self,
        shards: list[Shard],
        num_classes: int,
        full_annotation: bool,
        config: LoaderConfig,
        rank: int,
        world_size: int,
        epoch: int,
        start_batch: int = 0,
        ring: BatchRing | None = None,
    ):
        self.shards, self.num_classes, self.full = shards, num_classes, full_annotation
        self.config, self.rank, self.world_size = config, rank, world_size
        self.epoch, self.start_batch = epoch, start_batch
        self.ring = ring  # DataLoader workers: hand batches over in reused buffers

    def workers(self) -> int:
        return max(1, self.config.num_workers)

    def plan(self) -> list[list[Piece]]:
        shuffled = shuffle_shards(
            self.shards, self.config.seed, self.epoch, self.config.mode == "train"
        )
        return split_shards(shuffled, self.world_size * self.workers())

    def batches_per_worker(self) -> int:
        return batches_per_slot(self.plan(), self.config.batch_size)

    def rank_samples(self) -> int:
        """The samples of the split this rank's slots read in the epoch (the first pass)."""
        workers = self.workers()
        slots = self.plan()[self.rank * workers : (self.rank + 1) * workers]
        return sum(p.size for pieces in slots for p in pieces)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers():
            raise AssertionError(f"EpochStream expects {self.workers()} workers, got {workers}")
        # The DataLoader takes batches from workers 0, 1, 2, ... in turn. Batch b of the epoch
        # belongs to logical worker b % workers; after a resume at batch start_batch, worker 0
        # must play the owner of that batch, worker 1 the next one's, and so on.
        logical = (worker + self.start_batch) % workers
        slot = self.rank * workers + logical
        plan = self.plan()
        count = batches_per_slot(plan, self.config.batch_size)
        done = max(0, math.ceil((self.start_batch - logical) / workers))  # batches consumed
        c, train = self.config, self.config.mode == "train"
        problems = Problems()

        def one_pass(number: int):  # tar expansion -> shuffle buffer, for pass ``number``
            rng = np.random.default_rng([c.seed, self.epoch, slot, number])
            if number == 0:
                raw = expand_tars(plan[slot], c, problems)
                return shuffle_samples(raw, c.shuffle_buffer if train else 0, rng)
            # A repeat pass (train) fills the slot's last batch, or what damage took, from its
            # own pieces and then, should those be unreadable, the next slots'. A buffer of a
            # batch, so that it reads little; the first pass has reported the damage.
            pieces = [p for own in plan[slot:] + plan[:slot] for p in own]
            raw = expand_tars(pieces, c, Problems(quiet=True), repeat=True)
            return shuffle_samples(raw, min(c.shuffle_buffer, c.batch_size), rng)

        def buffers(size: int) -> tuple[np.ndarray, dict]:
            leased = self.ring.acquire(worker, size) if self.ring is not None else None
            if leased is None:
                return new_buffer(size)
            number, buffer, first_use = leased
            sent = buffer if first_use else None  # the buffer itself travels once
            return buffer.numpy(), {"slot": (worker, number), "buffer": sent}

        stages: list[Callable] = [
            lambda _: passes(one_pass, repeat=train),
            lambda s: skip(s, done * c.batch_size),
            lambda s: decode_samples(s, c, self.epoch, self.num_classes, problems),
            lambda s: make_batches(
                s, c, count - done, self.num_classes, self.full, problems, buffers
            ),
        ]
        yield from functools.reduce(lambda stream, stage: stage(stream), stages, None)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the Xception convention), on the whole batch."""
    return images.float().div_(127.5).sub_(1.0)
