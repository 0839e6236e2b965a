"""95% confidence intervals over images for MAP@K: a streaming Poisson bootstrap.

The classic bootstrap redraws N images with replacement B times and re-ranks every class of
every resample: B full evaluations and all scores in memory. The Poisson bootstrap (Hanley &
MacGibbon 2006; the usual choice for streams and distributed data) gives each image an
independent Poisson(1) multiplicity m in each replicate instead, which has the same large-N
behaviour and needs no global view of the data:

- An image's multiplicities are a pure function of (seed, image key, replicate), so any
  batching and any number of processes produce the same replicates.
- A class-wise replicate is an ordinary ranking in which an image scored s appears m times (m
  tied items). Its AP@K needs the replicate's positive count P_c and its top K copies. P_c (and
  the known count) of every replicate are sums of m over the images: kept exactly, B x classes
  numbers. The top K copies come from a pool: the POOL = 2K + 30 best known items of each
  class over all images, with their key hashes (a streaming top-POOL, O(classes x POOL) memory,
  merged exactly across processes). A replicate's top K copies and its tie block at rank K lie
  inside the pool whenever the pool items scored above the pool's lowest score hold at least K
  copies in that replicate: 2K + 29 items of Poisson(1) multiplicity fall short of K with
  probability at most 3e-12 (P(Poisson(2K + 29) < K), largest at K = 11; 3e-22 at K = 100). The
  condition is checked for every replicate and class; `inexact` counts where it fails (there
  the pool's answer is used as an approximation).
- Image-wise AP@K is a per-image quantity: each replicate keeps sum(m * AP_i) and sum(m), the
  former in exact fixed point (each term rounded to 2**-40), so the intervals do not depend on
  batching or process count: a file of predictions scores as the checkpoint pass that wrote it.

Per batch this costs a hash per key, B multiplicities per image, the sums (a matrix product,
or for a batch given as its known items (eval.metrics.KnownItems) a sum over those items) and a
merge into the pools of the items scored above their pool's lowest score. The replicates are
scored once, at the end, from the pool's tie blocks in closed form (_replicate_ap), at a few
operations per pool item and replicate. An interval is the 2.5th and 97.5th percentile of the B
replicate values (percentile method). Imports only torch and numpy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from eval.metrics import (
    NEG_INF,
    KnownItems,
    MetricInputError,
    check_k,
    check_scores_labels,
    pad_groups,
    resolve_weights,
    state_mode,
)

# P(X <= j) for X ~ Poisson(1), j = 0..19: inverse-CDF sampling of the multiplicities
# (P(X >= 20) < 1e-18, below the resolution of a 53-bit uniform).
_CDF = np.cumsum([math.exp(-1) / math.factorial(j) for j in range(20)])
# The same thresholds on the 53-bit integers u * 2**53 (exact: u >= c <=> u * 2**53 >= ceil(c *
# 2**53) for multiples u of 2**-53), so the draws need no conversion to float.
_THRESHOLDS = np.ceil(_CDF * 2.0**53).astype(np.uint64)
_BLOCK = np.uint64(53 - 16)  # u >> _BLOCK: u's 16 high bits
_SPLIT = 255

# m * AP@K_i is summed as a whole number of 2**-40 (rounded per image, identically however the
# images are batched or split across processes): batches of up to 2**19 images fit in int64.
IMAGE_SUM_UNIT = 2.0**40


def _block_counts() -> np.ndarray:
    """The count of every block of 2**37 values of u sharing their 16 high bits, or _SPLIT for
    the (at most 20) blocks a threshold falls inside: a table lookup settles all other draws."""
    first = np.arange(2**16, dtype=np.uint64) << _BLOCK
    last = first + ((np.uint64(1) << _BLOCK) - np.uint64(1))
    low = np.searchsorted(_THRESHOLDS, first, side="right")
    high = np.searchsorted(_THRESHOLDS, last, side="right")
    return np.where(low == high, low, _SPLIT).astype(np.uint8)


_COUNT_OF_BLOCK = _block_counts()
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Pool items x replicates scored at a time at the end: bounds memory.
_CHUNK = 4_000_000
_POOL_FIELDS = ("pool_values", "pool_labels", "pool_hashes")


def pool_size(k: int) -> int:
    return 2 * k + 30


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (SplitMix64's finaliser): uniform bits from structured input."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def key_hashes(keys: list[str], seed: int = 0) -> np.ndarray:
    """One 64-bit hash per image key: its UTF-8 bytes, 8 at a time, chained through SplitMix64
    from a seed-dependent start (vectorised over the batch; the hash of a key does not depend
    on the other keys of its batch)."""
    raw = [k.encode() for k in keys]
    lengths = np.array([len(b) for b in raw], dtype=np.int64)
    width = max(8, -(-int(lengths.max(initial=0)) // 8) * 8)
    padded = np.zeros((len(raw), width), dtype=np.uint8)
    if raw:
        flat = np.frombuffer(b"".join(b.ljust(width, b"\0") for b in raw), dtype=np.uint8)
        padded[:] = flat.reshape(len(raw), width)
    words = padded.view("<u8")
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(len(raw), seed % 2**64, dtype=np.uint64) + _GOLDEN)
        for j in range(words.shape[1]):
            inside = j * 8 < lengths  # words past a key's end leave its hash alone
            h = np.where(inside, _splitmix64(h ^ words[:, j]), h)
        return _splitmix64(h ^ lengths.astype(np.uint64))


def poisson_counts(hashes: np.ndarray, replicates: int, first: int = 0) -> np.ndarray:
    """[n, replicates] Poisson(1) multiplicities of replicates first .. first + replicates - 1;
    image i's row is a function of hashes[i] alone."""
    b = np.arange(first + 1, first + replicates + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(hashes[:, None] + b[None, :] * _GOLDEN)
    return counts_of_uniform(bits >> np.uint64(11))


def counts_of_uniform(u: np.ndarray) -> np.ndarray:
    """Poisson(1) multiplicities (int64) of 53-bit uniform integers u: the number of
    thresholds u reaches (a table lookup; a search only where u's block holds a threshold)."""
    counts = _COUNT_OF_BLOCK[(u >> _BLOCK).astype(np.intp)]
    split = np.flatnonzero(counts == _SPLIT)
    counts = counts.astype(np.int64)
    counts.flat[split] = np.searchsorted(_THRESHOLDS, u.flat[split], side="right")
    return counts


def _exclusive_cumsum(x: np.ndarray, first: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per group of columns (group g starts at column first[g]; owner[j] is column j's group),
    each row's sum of the columns before each column within its group."""
    before = np.cumsum(x, axis=1) - x
    return before - before[:, first][:, owner]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """[low, high] percentile interval of the defined (non-NaN) replicate values."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1 - level) / 2
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))]


class PoissonBootstrap:
    """``update(keys, scores, labels, image_ap)`` per batch; ``intervals(weights)`` at the end."""

    def __init__(self, num_classes: int, k: int = 100, replicates: int = 200, seed: int = 0):
        if num_classes < 1 or replicates < 1:
            raise MetricInputError(
                f"need num_classes >= 1 and replicates >= 1, got {num_classes} and {replicates}"
            )
        self.num_classes, self.k = num_classes, check_k(k)
        self.replicates, self.seed = replicates, seed
        shape = (replicates, num_classes)
        self.positives = np.zeros(shape, dtype=np.int64)  # sum of m over positive images
        self.known = np.zeros(shape, dtype=np.int64)  # sum of m over images with a known label
        # sum over images of m * AP@K_i in units of 2**-40, as exact integers (Python ints:
        # no overflow), so that the sum does not depend on how the images came in batches
        self.image_sums = np.zeros(replicates, dtype=object)
        self.image_counts = np.zeros(replicates, dtype=np.int64)  # sum of m (images with AP)
        self.inexact = 0  # replicate-classes whose top K was not provably inside the pool
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ accumulate

    @state_mode
    def update(self, keys: list[str], scores, labels, image_ap: np.ndarray | None = None):
        s, lab = check_scores_labels(scores, labels)
        self._check_batch(len(keys), s.shape)
        hashes = key_hashes(keys, self.seed)
        counts = poisson_counts(hashes, self.replicates)
        # One float64 product in torch (exact: integer sums far below 2**53), not numpy's: its
        # integer matmul has no fast kernel, and its float one goes to numpy's BLAS, whose own
        # thread pool fights torch's for the cores between batches.
        indicators = torch.cat([lab == 1, lab != -1], 1).double()
        sums = (torch.from_numpy(counts.T).double() @ indicators).round().long().numpy()
        self.positives += sums[:, : self.num_classes]
        self.known += sums[:, self.num_classes :]
        self._add_image_sums(counts, image_ap)
        # Pool candidates: the known items above their class's lowest pool score.
        keep = (s > self._pool_floor(s.dtype)) & (lab != -1)
        rows, cols = keep.nonzero(as_tuple=True)
        self._add_to_pool(cols, s[rows, cols], lab[rows, cols], hashes[rows.numpy()])

    @state_mode
    def update_items(self, keys: list[str], items: KnownItems, image_ap: np.ndarray | None = None):
        """``update`` with a batch given as its known items (the other pairs unknown)."""
        self._check_batch(len(keys), (items.images, items.classes))
        hashes = key_hashes(keys, self.seed)
        counts = poisson_counts(hashes, self.replicates)
        item_counts = torch.from_numpy(counts)[items.rows]  # [items, replicates]
        positive = items.labels == 1
        # [classes, replicates] views of the [replicates, classes] sums: added to in place
        torch.from_numpy(self.known.T).index_add_(0, items.cols, item_counts)
        torch.from_numpy(self.positives.T).index_add_(
            0, items.cols[positive], item_counts[positive]
        )
        self._add_image_sums(counts, image_ap)
        keep = items.values > self._pool_floor(items.values.dtype)[items.cols]
        rows = items.rows[keep].numpy()
        self._add_to_pool(items.cols[keep], items.values[keep], items.labels[keep], hashes[rows])

    def _check_batch(self, keys: int, shape: tuple[int, int]) -> None:
        if keys != shape[0] or shape[1] != self.num_classes:
            raise MetricInputError(
                f"bootstrap batch: {keys} keys, scores {tuple(shape)}; expected one key "
                f"per row and {self.num_classes} classes"
            )

    def _add_image_sums(self, counts: np.ndarray, image_ap: np.ndarray | None) -> None:
        if image_ap is None:
            return
        has = ~np.isnan(image_ap)
        counted = counts if has.all() else counts[has]  # (no copy when every image has AP)
        terms = np.rint(counted * image_ap[has, None] * IMAGE_SUM_UNIT).astype(np.int64)
        self.image_sums += terms.sum(0).astype(object)
        self.image_counts += counted.sum(0)

    def _pool_floor(self, dtype: torch.dtype) -> torch.Tensor:
        """Each class's lowest pool score, -inf while its pool is not full: only known items
        scored above it can enter the pool."""
        if self._pool is None:
            size = pool_size(self.k)
            self._pool = (
                torch.full((self.num_classes, size), NEG_INF, dtype=dtype),
                torch.full((self.num_classes, size), -1, dtype=torch.int8),
                torch.zeros((self.num_classes, size), dtype=torch.int64),
            )
        if dtype != self._pool[0].dtype:
            raise MetricInputError(
                f"scores are {dtype}, earlier batches were {self._pool[0].dtype}: use one dtype"
            )
        return self._pool[0][:, -1]

    def _add_to_pool(self, cols, values, labels, hashes: np.ndarray) -> None:
        """Merge candidate items (class, score, label, key hash) into their classes' pools,
        which keep each class's POOL best known items in descending order."""
        hashes = torch.from_numpy(hashes.view(np.int64))
        fields = [(values, NEG_INF), (labels, -1), (hashes, 0)]
        present, candidates = pad_groups(cols, fields)
        both = [torch.cat([p[present], c], 1) for p, c in zip(self._pool, candidates, strict=True)]
        top, index = torch.topk(both[0], self._pool[0].shape[1], dim=1)
        merged = (top, both[1].gather(1, index), both[2].gather(1, index))
        for pool, part in zip(self._pool, merged, strict=True):
            pool[present] = part  # in place: the pool's tensors are this object's own

    @state_mode
    def merge(self, other: PoissonBootstrap) -> None:
        """Add another accumulator's images (e.g. another process's) to this one: exact."""
        same = (other.num_classes, other.k, other.replicates, other.seed)
        if same != (self.num_classes, self.k, self.replicates, self.seed):
            raise MetricInputError(
                f"cannot merge bootstrap {same} into "
                f"{(self.num_classes, self.k, self.replicates, self.seed)}"
            )
        self.positives += other.positives
        self.known += other.known
        self.image_sums += other.image_sums
        self.image_counts += other.image_counts
        if other._pool is not None:
            values, labels, hashes = other._pool
            keep = values > self._pool_floor(values.dtype)[:, None]
            cls, _ = keep.nonzero(as_tuple=True)
            self._add_to_pool(cls, values[keep], labels[keep], hashes[keep].numpy())

    def state_dict(self) -> dict:
        """Copies of the state (later updates change this object's arrays in place)."""
        state = {
            "num_classes": self.num_classes,
            "k": self.k,
            "replicates": self.replicates,
            "seed": self.seed,
            "positives": self.positives.copy(),
            "known": self.known.copy(),
            "image_sums": self.image_sums.copy(),
            "image_counts": self.image_counts.copy(),
        }
        if self._pool is not None:
            state.update(zip(_POOL_FIELDS, (t.clone() for t in self._pool), strict=True))
        return state

    @classmethod
    @state_mode
    def from_state_dict(cls, state: dict) -> PoissonBootstrap:
        boot = cls(state["num_classes"], state["k"], state["replicates"], state["seed"])
        for name in ("positives", "known", "image_counts"):
            setattr(boot, name, np.array(state[name], dtype=np.int64))
        boot.image_sums = np.array([int(x) for x in state["image_sums"]], dtype=object)
        if "pool_values" in state:
            boot._pool = tuple(torch.as_tensor(state[f]).clone() for f in _POOL_FIELDS)
        return boot

    # ------------------------------------------------------------------ the replicates

    def _replicate_ap(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Class-wise AP@K of replicates first .. first + count - 1 ([count, classes]), and
        which of them are exact (their top K and K-th tie block inside the pool).

        In a replicate the pool's items form tie blocks: runs of equal scores within a class,
        each item repeated by its multiplicity. A block of M copies holding T positive copies,
        with a copies and p positive copies above it, adds to AP@K (the tie-averaged terms of
        eval.metrics.ap_from_top_k at its ranks i = a+1 .. e = min(a + M, K))
        T/M * sum_i (p + 1 + (i-a-1)(T-1)/(M-1)) / i, which in harmonic numbers H is
        T/M * ((p + 1 - (a+1)B) (H_e - H_a) + B (e - a)) with B = (T-1)/(M-1) (0 if M = 1).
        So a replicate costs a few operations per pool item, not a ranking of its copies.
        """
        c, k = self.num_classes, self.k
        values, labels, hashes = (t.numpy() for t in self._pool)
        valid = values != NEG_INF
        cls, slot = np.nonzero(valid)  # by class, then descending score
        value, positive = values[cls, slot], labels[cls, slot] == 1
        # [count, items]: a replicate per row, so that every sum below runs along a row
        m = poisson_counts(hashes[cls, slot].view(np.uint64), count, first).T.copy()
        starts = np.ones(len(cls), dtype=bool)
        starts[1:] = (cls[1:] != cls[:-1]) | (value[1:] != value[:-1])
        starts = np.flatnonzero(starts)
        if len(starts) < len(cls):  # tied scores: sum the copies of each block
            copies = np.add.reduceat(m, starts, axis=1)  # M
            hits = np.add.reduceat(m * positive, starts, axis=1)  # T
        else:  # every item its own block
            copies, hits = m, m * positive
        block_cls = cls[starts]
        new_class = np.ones(len(starts), dtype=bool)
        new_class[1:] = block_cls[1:] != block_cls[:-1]
        first_block, owner = np.flatnonzero(new_class), np.cumsum(new_class) - 1
        above = _exclusive_cumsum(copies, first_block, owner)  # a
        hits_above = _exclusive_cumsum(hits, first_block, owner)  # p
        a = np.minimum(above, k)
        e = np.minimum(above + copies, k)
        harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, k + 1))])
        with np.errstate(invalid="ignore", divide="ignore"):
            pair = np.where(copies > 1, (hits - 1) / np.maximum(copies - 1, 1), 0.0)
            term = (hits_above + 1 - (a + 1) * pair) * (harmonic[e] - harmonic[a]) + pair * (e - a)
            term = np.where(copies > 0, hits / np.maximum(copies, 1) * term, 0.0)
        total = np.zeros((count, c))
        high = np.zeros((count, c), dtype=np.int64)  # copies above the pool's lowest score
        if len(first_block):
            present = block_cls[first_block]
            total[:, present] = np.add.reduceat(term, first_block, axis=1)
            above_lowest = m * (value > values[cls, -1])
            high[:, present] = np.add.reduceat(above_lowest, starts[first_block], axis=1)
        positives = self.positives[first : first + count]
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(positives > 0, total / np.clip(positives, 1, k), np.nan)
        # Exact when the pool holds every known item of the class (it is not full), or when
        # the copies scored above the pool's lowest score number at least K.
        return ap, ~valid[:, -1] | (high >= k)

    def replicate_values(self, weights="positives") -> dict[str, np.ndarray]:
        """Each replicate's weighted and unweighted MAP@K and image-wise AP@K ([B] arrays).

        ``weights`` is what the point estimate used: a fixed vector (reference counts) stays
        the same in every replicate; "positives" means each replicate's own positive counts.
        """
        b, c = self.replicates, self.num_classes
        with np.errstate(invalid="ignore", divide="ignore"):
            sums = self.image_sums.astype(np.float64) / IMAGE_SUM_UNIT
            images = np.where(self.image_counts > 0, sums / self.image_counts, np.nan)
        if self._pool is None:
            return {
                "weighted": np.full(b, np.nan),
                "unweighted": np.full(b, np.nan),
                "image": images,
            }
        ap = np.empty((b, c))
        items = max(1, int((self._pool[0] != NEG_INF).sum()))
        step = max(1, _CHUNK // items)
        self.inexact = 0
        for first in range(0, b, step):
            count = min(step, b - first)
            ap[first : first + count], exact = self._replicate_ap(first, count)
            self.inexact += int((~exact).sum())
        if isinstance(weights, str) and weights == "positives":
            w = self.positives.astype(np.float64)
        else:
            w = np.broadcast_to(resolve_weights(weights, self.positives[0]), (b, c))

        def mean(w):  # eval.metrics.weighted_mean of each replicate
            ok = ~np.isnan(ap) & (w > 0)
            total = np.where(ok, w, 0.0).sum(1)
            weighted = np.where(ok, w * np.where(ok, ap, 0.0), 0.0).sum(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(total > 0, weighted / total, np.nan)

        return {"weighted": mean(w), "unweighted": mean(np.ones_like(ap)), "image": images}

    def intervals(self, weights="positives", level: float = 0.95) -> dict:
        values = self.replicate_values(weights)
        return {
            "weighted_map_at_k": percentile_interval(values["weighted"], level),
            "unweighted_map_at_k": percentile_interval(values["unweighted"], level),
            "image_map_at_k": percentile_interval(values["image"], level),
        }
