"""95% confidence intervals over images for MAP@K: a streaming Poisson bootstrap.

The classic bootstrap redraws N images with replacement B times and re-ranks every class of
every resample: B full evaluations and all scores in memory. The Poisson bootstrap (Hanley &
MacGibbon 2006; the usual choice for streams and distributed data) gives each image an
independent Poisson(1) multiplicity in each replicate instead, which has the same large-N
behaviour and needs no global view of the data:

- An image's multiplicities are a pure function of (seed, image key, replicate), so any
  batching and any number of processes produce the same replicates.
- A class-wise replicate is an ordinary ranking in which an image scored s appears m times: m
  tied items. Each replicate keeps the same O(classes x K) top-K summary as
  ``MAPAccumulator`` (``eval.metrics.TopK``), so memory is O(B x classes x K) whatever the
  number of images, and summaries of disjoint image sets merge exactly.
- Image-wise AP@K is a per-image quantity: each replicate keeps sum(m * AP_i) and sum(m).

An interval is the 2.5th and 97.5th percentile of the B replicate values (percentile method).
Imports only torch and numpy.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from eval.metrics import (
    NEG_INF,
    MetricInputError,
    TopK,
    ap_from_top_k,
    check_k,
    check_scores_labels,
    merge_top_k,
    resolve_weights,
)

# P(X <= j) for X ~ Poisson(1), j = 0..19: inverse-CDF sampling of the multiplicities
# (P(X >= 20) < 1e-18, below the resolution of a 53-bit uniform).
_CDF = np.cumsum([math.exp(-1) / math.factorial(j) for j in range(20)])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Candidate (image, class, replicate) entries expanded per merge: bounds the temporaries.
_ENTRIES_PER_MERGE = 4_000_000
_FIELDS = ("values", "labels", "tie_count", "tie_positives", "positives", "known")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (SplitMix64's finaliser): uniform bits from structured input."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def key_hashes(keys: list[str], seed: int = 0) -> np.ndarray:
    """One 64-bit hash per image key (keyed BLAKE2b), the seed of its multiplicities."""
    salt = int(seed).to_bytes(8, "little", signed=True)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=salt).digest(), "little")
            for k in keys
        ],
        dtype=np.uint64,
    )


def poisson_counts(hashes: np.ndarray, replicates: int) -> np.ndarray:
    """[n, replicates] Poisson(1) multiplicities, image i's row a function of hashes[i] only."""
    b = np.arange(1, replicates + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(hashes[:, None] + b[None, :] * _GOLDEN)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.searchsorted(_CDF, uniform, side="right").astype(np.int64)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    """[low, high] percentile interval of the defined (non-NaN) replicate values."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1 - level) / 2
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))]


class PoissonBootstrap:
    """``update(keys, scores, labels, image_ap)`` per batch; ``intervals(weights)`` at the end.

    ``replicates`` x ``num_classes`` rankings are summarised as one TopK of that many queries
    (query b * num_classes + c is class c in replicate b).
    """

    def __init__(self, num_classes: int, k: int = 100, replicates: int = 200, seed: int = 0):
        if num_classes < 1 or replicates < 1:
            raise MetricInputError(
                f"need num_classes >= 1 and replicates >= 1, got {num_classes} and {replicates}"
            )
        self.num_classes, self.k = num_classes, check_k(k)
        self.replicates, self.seed = replicates, seed
        self.image_sums = np.zeros(replicates)  # sum over images of m * AP@K_i
        self.image_counts = np.zeros(replicates, dtype=np.int64)  # sum of m (images with AP)
        self._top: TopK | None = None

    # ------------------------------------------------------------------ accumulate

    def update(self, keys: list[str], scores, labels, image_ap: np.ndarray | None = None):
        s, lab = check_scores_labels(scores, labels)
        if len(keys) != s.shape[0] or s.shape[1] != self.num_classes:
            raise MetricInputError(
                f"bootstrap batch: {len(keys)} keys, scores {tuple(s.shape)}; expected one key "
                f"per row and {self.num_classes} classes"
            )
        counts = poisson_counts(key_hashes(keys, self.seed), self.replicates)
        if self._top is None:
            self._top = self._empty(s.dtype)
        if s.dtype != self._top.values.dtype:
            raise MetricInputError(
                f"scores are {s.dtype}, earlier batches were "
                f"{self._top.values.dtype}: use one dtype"
            )
        self._update_classes(s, lab, counts)
        if image_ap is not None:
            has = ~np.isnan(image_ap)
            self.image_sums += counts[has].T.astype(np.float64) @ image_ap[has]
            self.image_counts += counts[has].sum(0)

    def _update_classes(self, s: torch.Tensor, lab: torch.Tensor, counts: np.ndarray) -> None:
        """Merge the batch's items that can still enter some replicate's top K.

        An item scored below the lowest K-th score of its class over all replicates can enter
        no replicate's top K, nor tie at a new K-th score: only the rest are expanded into
        (replicate, multiplicity) entries. Rows go in chunks that keep the expansion bounded
        (the first batches, before any K-th score exists, keep everything).
        """
        known = (lab != -1).numpy()
        positive = (lab == 1).numpy()
        start = 0
        while start < s.shape[0]:
            kth = self._top.values[:, -1].reshape(self.replicates, self.num_classes)
            thr = kth.min(0).values
            keep = ((s[start:] >= thr) & (lab[start:] != -1)).numpy()
            per_row = keep.sum(1) * self.replicates
            stop = start + max(1, int(np.searchsorted(np.cumsum(per_row), _ENTRIES_PER_MERGE)))
            stop = min(stop, s.shape[0])
            rows = slice(start, stop)
            part = self._candidates(
                s[rows], lab[rows], keep[: stop - start], counts[rows], known[rows], positive[rows]
            )
            self._top = merge_top_k(self._top, part)
            start = stop

    def _candidates(self, s, lab, keep, counts, known, positive) -> TopK:
        c, q = self.num_classes, self.replicates * self.num_classes
        rows, cols = np.nonzero(keep)
        pair, rep = np.nonzero(counts[rows])  # candidate pair x replicate where m > 0
        mult = counts[rows[pair], rep]
        entry = np.repeat(np.arange(len(pair)), mult)  # an item of multiplicity m: m copies
        pair, rep = pair[entry], rep[entry]
        query = rep * c + cols[pair]
        order = np.argsort(query, kind="stable")
        query = query[order]
        per_query = np.bincount(query, minlength=q)
        slot = np.arange(len(query)) - (np.cumsum(per_query) - per_query)[query]
        width = int(per_query.max()) if len(query) else 0
        # One -inf column more than needed, as in MAPAccumulator._candidates: the part's own
        # "K-th" value is -inf, so the merge counts ties at the new K-th score from its items.
        values = torch.full((q, width + 1), NEG_INF, dtype=s.dtype)
        labels = torch.full((q, width + 1), -1, dtype=torch.int8)
        r, k = torch.from_numpy(rows[pair][order]), torch.from_numpy(cols[pair][order])
        values[query, slot] = s[r, k]
        labels[query, slot] = lab[r, k]
        # Positives and known counts of each replicate: multiplicity-weighted sums.
        positives = torch.from_numpy((counts.T @ positive.astype(np.int64)).reshape(q))
        known_counts = torch.from_numpy((counts.T @ known.astype(np.int64)).reshape(q))
        zeros = torch.zeros(q, dtype=torch.int64)
        return TopK(values, labels, zeros, zeros.clone(), positives, known_counts)

    def _empty(self, dtype: torch.dtype) -> TopK:
        q = self.replicates * self.num_classes
        zeros = torch.zeros(q, dtype=torch.int64)
        return TopK(
            torch.full((q, self.k), NEG_INF, dtype=dtype),
            torch.full((q, self.k), -1, dtype=torch.int8),
            zeros,
            zeros.clone(),
            zeros.clone(),
            zeros.clone(),
        )

    # ------------------------------------------------------------------ merge and results

    def merge(self, other: PoissonBootstrap) -> None:
        same = (other.num_classes, other.k, other.replicates, other.seed)
        if same != (self.num_classes, self.k, self.replicates, self.seed):
            raise MetricInputError(
                f"cannot merge bootstrap {same} into "
                f"{(self.num_classes, self.k, self.replicates, self.seed)}"
            )
        if other._top is not None:
            if self._top is None:
                self._top = self._empty(other._top.values.dtype)
            self._top = merge_top_k(self._top, other._top)
        self.image_sums += other.image_sums
        self.image_counts += other.image_counts

    def state_dict(self) -> dict:
        state = {
            "num_classes": self.num_classes,
            "k": self.k,
            "replicates": self.replicates,
            "seed": self.seed,
            "image_sums": self.image_sums,
            "image_counts": self.image_counts,
        }
        if self._top is not None:
            state.update({f: getattr(self._top, f) for f in _FIELDS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> PoissonBootstrap:
        boot = cls(state["num_classes"], state["k"], state["replicates"], state["seed"])
        boot.image_sums = np.array(state["image_sums"], dtype=np.float64)
        boot.image_counts = np.array(state["image_counts"], dtype=np.int64)
        if "values" in state:
            boot._top = TopK(*(torch.as_tensor(state[f]) for f in _FIELDS))
        return boot

    def replicate_values(self, weights="positives") -> dict[str, np.ndarray]:
        """Each replicate's weighted and unweighted MAP@K and image-wise AP@K ([B] arrays).

        ``weights`` is what the point estimate used: a fixed vector (reference counts) stays
        the same in every replicate; "positives" means each replicate's own positive counts.
        """
        b, c = self.replicates, self.num_classes
        nan = np.full(b, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            images = np.where(self.image_counts > 0, self.image_sums / self.image_counts, np.nan)
        if self._top is None:
            return {"weighted": nan, "unweighted": nan.copy(), "image": images}
        ap = ap_from_top_k(self._top, self.k).reshape(b, c)
        positives = self._top.positives.numpy().reshape(b, c)
        if isinstance(weights, str) and weights == "positives":
            w = positives.astype(np.float64)
        else:
            w = np.broadcast_to(resolve_weights(weights, positives[0]), (b, c))

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
