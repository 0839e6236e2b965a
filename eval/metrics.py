"""MAP@K exactly as docs/metric.md defines it: class-wise AP@K (fwMAP@K), image-wise AP@K, full AP.

Imports only torch and numpy, so anyone can score predictions without the rest of mlc.

Conventions: ``scores[n, c]`` are floats, higher = more confident (rank on logits: float32 sigmoid
saturates at 1.0 and makes false ties); ``labels[n, c]`` is 1 (positive), 0 (negative) or -1
(unknown: excluded from that class's ranking). Tied scores get the expected AP over all orderings
of the tie, so results do not depend on the order of the input rows.

Every ranking is reduced to a :class:`TopK` summary (the top K known items plus the size and
positives of the tie block at rank K). Dense and streaming evaluation build the same summary and
share :func:`ap_from_top_k`, which is why they agree exactly; so does a batch given as its known
(image, class) pairs alone (:class:`KnownItems`, for labels that are mostly unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NEG_INF = float("-inf")
# Columns ranked per chunk: keeps the masked copy small and cache-friendly.
CHUNK = 128


class MetricInputError(ValueError):
    """Input a metric cannot score; the message says what is wrong and where."""


# The accumulators update their state in place, which torch refuses for tensors made under
# torch.inference_mode (the checkpoint pass runs the model in it) once outside it: their
# methods that make or change state run with inference mode off, so their state is made of
# normal tensors wherever they are called from (inputs made in inference mode are only read).
state_mode = torch.inference_mode(False)


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MetricInputError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def check_scores(scores) -> torch.Tensor:
    """Validate ``scores[n, c]`` (2-D, real, finite); return them on CPU as float32 (16-bit
    floats too) or float64 (integers too)."""
    s = torch.as_tensor(scores).cpu()
    if s.ndim != 2:
        raise MetricInputError(f"scores must be 2-D [images, classes], got shape {tuple(s.shape)}")
    if s.dtype == torch.bool or s.is_complex():
        raise MetricInputError(f"scores must be real numbers, got dtype {s.dtype}")
    if not s.is_floating_point():
        s = s.double()
    elif s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if s.numel():
        lo, hi = torch.aminmax(s)  # NaN propagates: one cheap pass instead of isfinite
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            bad = (~torch.isfinite(s)).nonzero()
            r, c = bad[0].tolist()
            raise MetricInputError(
                f"scores contain {len(bad)} NaN or infinite value(s); first at image row {r}, "
                f"class column {c} ({s[r, c].item()})"
            )
    return s


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type scores are ranked in: 16-bit floats as float32 (what check_scores returns)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_scores_labels(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``scores[n, c]`` and ``labels[n, c]``; return (float scores, int8 labels) on CPU."""
    lab = torch.as_tensor(labels).cpu()
    shape = torch.as_tensor(scores).shape
    if len(shape) == 2 and lab.shape != shape:
        raise MetricInputError(
            f"labels shape {tuple(lab.shape)} does not match scores shape {tuple(shape)}"
        )
    s = check_scores(scores)
    if lab.dtype == torch.bool:
        return s, lab.to(torch.int8)
    if lab.numel():
        if lab.is_floating_point():
            bad_mask = ~((lab == 1) | (lab == 0) | (lab == -1))
        else:
            lo, hi = torch.aminmax(lab)
            bad_mask = ((lab < -1) | (lab > 1)) if (lo < -1 or hi > 1) else None
        if bad_mask is not None and bool(bad_mask.any()):
            bad = bad_mask.nonzero()
            r, c = bad[0].tolist()
            raise MetricInputError(
                f"labels must be 1 (positive), 0 (negative) or -1 (unknown); found "
                f"{len(bad)} other value(s), first at image row {r}, class column {c} "
                f"({lab[r, c].item()})"
            )
    return s, lab.to(torch.int8)


def resolve_weights(weights, positives: np.ndarray) -> np.ndarray:
    """Per-class weights: "positives" (the scored set's own counts), "uniform", or a vector."""
    c = len(positives)
    if isinstance(weights, str):
        if weights == "positives":
            return positives.astype(np.float64)
        if weights == "uniform":
            return np.ones(c, dtype=np.float64)
        raise MetricInputError(
            f'weights must be "positives", "uniform" or a vector, got {weights!r}'
        )
    w = np.asarray(torch.as_tensor(weights).cpu(), dtype=np.float64)
    if w.shape != (c,):
        raise MetricInputError(f"weights must have one value per class ({c}), got shape {w.shape}")
    if not np.isfinite(w).all():
        i = int(np.flatnonzero(~np.isfinite(w))[0])
        raise MetricInputError(f"weights must be finite; class {i} has {w[i]}")
    if (w < 0).any():
        i = int(np.flatnonzero(w < 0)[0])
        raise MetricInputError(f"weights must be >= 0; class {i} has {w[i]}")
    return w


@dataclass
class TopK:
    """What AP@K needs to know of each query's ranked list (query = a class, or an image).

    ``values``/``labels`` hold the top K known items in descending order (-inf / -1 pad a list of
    fewer than K). ``tie_count``/``tie_positives`` count every known item scored exactly
    ``values[:, -1]`` in the whole list, also those beyond rank K: the expected AP of a tie block
    that straddles rank K depends on the whole block.
    """

    values: torch.Tensor  # [q, k] descending
    labels: torch.Tensor  # [q, k] int8
    tie_count: torch.Tensor  # [q] int64
    tie_positives: torch.Tensor  # [q] int64
    positives: torch.Tensor  # [q] int64, over the whole list
    known: torch.Tensor  # [q] int64, over the whole list

    @property
    def k(self) -> int:
        return self.values.shape[1]


def count_true(mask: torch.Tensor | np.ndarray, dim: int) -> torch.Tensor:
    # numpy's uint8 reduction: much faster here than torch's bool -> int64 sum.
    mask = mask.numpy() if isinstance(mask, torch.Tensor) else mask
    return torch.from_numpy(mask.view(np.uint8).sum(axis=dim, dtype=np.int64))


def _count_along(labels: torch.Tensor, value: int, dim: int) -> torch.Tensor:
    return count_true(labels.numpy() == value, dim)


def count_columns(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, known) per column."""
    return _count_along(labels, 1, 0), labels.shape[0] - _count_along(labels, -1, 0)


def top_k_columns(scores: torch.Tensor, labels: torch.Tensor, k: int) -> TopK:
    """Summarise each column of ``scores[n, q]`` ranked over its n rows (validated inputs)."""
    n, q = scores.shape
    positives, known = count_columns(labels)
    has_unknown = bool((known < n).any())
    values = torch.full((q, k), NEG_INF, dtype=scores.dtype)
    top_labels = torch.full((q, k), -1, dtype=torch.int8)
    tie_count = torch.zeros(q, dtype=torch.int64)
    tie_positives = torch.zeros(q, dtype=torch.int64)
    width = min(k + 1, n)  # one beyond rank K shows whether the tie at rank K goes on
    kept = min(k, n)
    for c0 in range(0, q if n else 0, CHUNK):
        c1 = min(c0 + CHUNK, q)
        s, lab = scores[:, c0:c1], labels[:, c0:c1]
        if has_unknown:  # unknown items sink below every finite score
            s = s.masked_fill(lab == -1, NEG_INF)
        v, idx = torch.topk(s, width, dim=0)
        g = torch.gather(lab, 0, idx)
        values[c0:c1, :kept] = v[:kept].T
        top_labels[c0:c1, :kept] = g[:kept].T
        if kept < k:
            continue  # fewer than K items: no tie at rank K
        kth = v[k - 1]
        same = (v[:k] == kth) & (g[:k] != -1)
        count, pos = same.sum(0), (same & (g[:k] == 1)).sum(0)
        if width > k:
            straddles = torch.nonzero((v[k] == kth) & torch.isfinite(kth)).flatten()
            if len(straddles):
                eq = s[:, straddles] == kth[straddles]
                count[straddles] = eq.sum(0)
                pos[straddles] = (eq & (lab[:, straddles] == 1)).sum(0)
        tie_count[c0:c1], tie_positives[c0:c1] = count, pos
    return TopK(values, top_labels, tie_count, tie_positives, positives, known)


@dataclass(frozen=True)
class KnownItems:
    """The known (image, class) pairs of a batch of ``images`` x ``classes`` scores, with their
    score and label (0 or 1); every other pair is unknown (-1). The sparse form of a batch
    whose labels are mostly unknown, as OpenImages' are: its metrics cost O(known pairs), not
    O(images x classes)."""

    rows: torch.Tensor  # [m] int64: image row in the batch
    cols: torch.Tensor  # [m] int64: class column
    values: torch.Tensor  # [m] scores (float32 or float64)
    labels: torch.Tensor  # [m] int8: 1 positive, 0 negative
    images: int
    classes: int

    @classmethod
    def of(cls, scores, labels) -> KnownItems:
        """The known pairs of dense ``scores[n, c]`` and ``labels[n, c]`` (validated)."""
        s, lab = check_scores_labels(scores, labels)
        rows, cols = (lab != -1).nonzero(as_tuple=True)
        return cls(rows, cols, s[rows, cols], lab[rows, cols], *s.shape)

    @classmethod
    def gather(cls, scores: torch.Tensor, rows, cols, labels) -> KnownItems:
        """The items of validated ``scores[n, c]`` at pairs (rows, cols), one per pair, with
        their labels (0 or 1)."""
        rows, cols = (
            torch.as_tensor(rows, dtype=torch.int64),
            torch.as_tensor(cols, dtype=torch.int64),
        )
        values = scores[rows, cols]
        return cls(
            rows,
            cols,
            values.to(score_dtype(values.dtype)),
            torch.as_tensor(labels, dtype=torch.int8),
            *scores.shape,
        )

    def dense_labels(self) -> torch.Tensor:
        """The labels as a dense int8 [images, classes] matrix (-1 where unknown)."""
        labels = torch.full((self.images, self.classes), -1, dtype=torch.int8)
        labels[self.rows, self.cols] = self.labels
        return labels


def mostly_unknown(labels: torch.Tensor) -> bool:
    """Whether at most an eighth of ``labels`` are known: KnownItems then score them faster."""
    return int(count_true(labels != -1, 0).sum()) * 8 <= labels.numel()


def group_slots(query: torch.Tensor, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For items in query order: each query's item count and each item's place in its query."""
    counts = torch.bincount(query, minlength=queries)
    return counts, torch.arange(len(query)) - (counts.cumsum(0) - counts)[query]


def pad_groups(query: torch.Tensor, fields: list[tuple[torch.Tensor, float]], extra: int = 0):
    """Items grouped into one row per query present: (those queries, ascending; per (field,
    fill) a matrix [queries present, most items of a query + extra], ``fill`` after a query's
    items)."""
    order = torch.argsort(query, stable=True)
    present, per = torch.unique_consecutive(query[order], return_counts=True)
    row = torch.repeat_interleave(torch.arange(len(present)), per)
    slot = torch.arange(len(order)) - (per.cumsum(0) - per)[row]
    width = (int(per.max()) if len(per) else 0) + extra
    matrices = []
    for field, fill in fields:
        matrix = torch.full((len(present), width), fill, dtype=field.dtype)
        matrix[row, slot] = field[order]
        matrices.append(matrix)
    return present, matrices


def top_k_of_items(query, values, labels, queries: int, k: int) -> TopK:
    """The TopK summary of each of ``queries`` rankings from its known items, listed as
    (query index, score, label 0 or 1) triples in any order; the same summary top_k_columns
    makes of the dense scores with every other item unknown."""
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(query[order], stable=True)]  # by query, then score descending
    query, values, labels = query[order], values[order], labels[order]
    known, slot = group_slots(query, queries)
    top_values = torch.full((queries, k), NEG_INF, dtype=values.dtype)
    top_labels = torch.full((queries, k), -1, dtype=torch.int8)
    keep = slot < k
    top_values[query[keep], slot[keep]] = values[keep]
    top_labels[query[keep], slot[keep]] = labels[keep]
    positive = labels == 1
    # The tie block at rank K, beyond rank K too (-inf, never tied, for lists shorter than K).
    tied = values == top_values[query, -1]
    return TopK(
        top_values,
        top_labels,
        torch.bincount(query[tied], minlength=queries),
        torch.bincount(query[tied & positive], minlength=queries),
        torch.bincount(query[positive], minlength=queries),
        known,
    )


def _ties_at(part: TopK, kth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, positives) of part's known items scored exactly kth (kth >= part's K-th value)."""
    same_kth = part.values[:, -1] == kth
    in_top = (part.values == kth[:, None]) & (part.labels != -1)
    # Above part's K-th value every such item is in part's top K; at it, part's tie counts hold.
    count = torch.where(same_kth, part.tie_count, in_top.sum(1))
    pos = torch.where(same_kth, part.tie_positives, (in_top & (part.labels == 1)).sum(1))
    return count, pos


def merge_top_k(a: TopK, b: TopK) -> TopK:
    """The summary of the union of two disjoint sets of items, exactly."""
    v, idx = torch.topk(torch.cat([a.values, b.values], 1), a.k, dim=1)
    labels = torch.gather(torch.cat([a.labels, b.labels], 1), 1, idx)
    kth = v[:, -1]
    count_a, pos_a = _ties_at(a, kth)
    count_b, pos_b = _ties_at(b, kth)
    return TopK(
        v,
        labels,
        count_a + count_b,
        pos_a + pos_b,
        a.positives + b.positives,
        a.known + b.known,
    )


def ap_from_top_k(top: TopK, cap: int) -> np.ndarray:
    """AP of each query over its top K, normalised by min(positives, cap); NaN without positives.

    A tie block at ranks a+1..a+m holding t positives, with p positives ranked above it, adds at
    rank i the expected rel_i * hits_i / i = t/m * (p + 1 + (i-a-1)(t-1)/(m-1)) / i.
    """
    q, k = top.values.shape
    rank0 = torch.arange(k)
    valid = rank0 < top.known.clamp(max=k)[:, None]
    rel = ((top.labels == 1) & valid).double()
    new_block = torch.ones(q, k, dtype=torch.bool)
    new_block[:, 1:] = top.values[:, 1:] != top.values[:, :-1]
    ends_block = torch.ones(q, k, dtype=torch.bool)
    ends_block[:, :-1] = new_block[:, 1:]
    start = torch.where(new_block, rank0, 0).cummax(1).values
    end = torch.where(ends_block, rank0, k).flip(1).cummin(1).values.flip(1)
    hits = rel.cumsum(1)
    above = (hits - rel).gather(1, start)
    size = (end - start + 1).double()
    tied_pos = hits.gather(1, end) - above
    # The block at rank K may go on beyond the top K: use its whole size and positives.
    at_k = (top.values == top.values[:, -1:]) & (top.known >= k)[:, None]
    size = torch.where(at_k, top.tie_count[:, None].double(), size)
    tied_pos = torch.where(at_k, top.tie_positives[:, None].double(), tied_pos)
    pair = torch.where(size > 1, (tied_pos - 1) / (size - 1).clamp(min=1), 0.0)
    term = tied_pos / size * (above + 1 + (rank0 - start) * pair) / (rank0 + 1)
    total = torch.where(valid, term, 0.0).sum(1)
    positives = top.positives.double()
    ap = total / positives.clamp(min=1, max=cap)
    return torch.where(positives > 0, ap, float("nan")).numpy()


def weighted_mean(ap: np.ndarray, weights: np.ndarray) -> float:
    """sum w*AP / sum w over entries with a defined AP and w > 0; NaN when there are none."""
    ok = ~np.isnan(ap) & (weights > 0)
    if not ok.any():
        return float("nan")
    return float(np.dot(weights[ok], ap[ok]) / weights[ok].sum())


@dataclass(frozen=True)
class ClassAP:
    """Class-wise AP@K. ``ap`` is NaN for classes without positives (excluded, not counted as 0)."""

    k: int
    ap: np.ndarray  # [c] float64
    positives: np.ndarray  # [c] P_c: known positives
    known: np.ndarray  # [c] |E_c|: images whose label for the class is known
    weights: np.ndarray  # [c] float64

    @property
    def excluded_no_positives(self) -> np.ndarray:
        return np.flatnonzero(self.positives == 0)

    @property
    def excluded_zero_weight(self) -> np.ndarray:
        return np.flatnonzero((self.positives > 0) & (self.weights == 0))

    @property
    def weighted_map(self) -> float:
        return weighted_mean(self.ap, self.weights)

    @property
    def unweighted_map(self) -> float:
        return weighted_mean(self.ap, np.ones_like(self.ap))


@dataclass(frozen=True)
class ImageAP:
    """Image-wise AP@K. ``ap`` is NaN for images without known positives (excluded from mean)."""

    k: int
    ap: np.ndarray  # [n] float64
    positives: np.ndarray  # [n]
    known: np.ndarray  # [n]

    @property
    def excluded_no_positives(self) -> np.ndarray:
        return np.flatnonzero(self.positives == 0)

    @property
    def mean(self) -> float:
        """The mean over images with a defined AP, of their correctly rounded sum (math.fsum):
        the figure `mlc eval --checkpoint` gets from its exact running sum, bit for bit."""
        defined = self.ap[~np.isnan(self.ap)]
        return math.fsum(defined.tolist()) / len(defined) if len(defined) else float("nan")


def class_result(top: TopK, weights="positives") -> ClassAP:
    positives = top.positives.numpy().copy()  # copies: accumulators update theirs in place
    return ClassAP(
        k=top.k,
        ap=ap_from_top_k(top, top.k),
        positives=positives,
        known=top.known.numpy().copy(),
        weights=resolve_weights(weights, positives),
    )


def class_ap_at_k(scores, labels, k: int = 100, weights="positives") -> ClassAP:
    """Class-wise AP@K of ``scores[n, c]`` against ``labels[n, c]``; fwMAP@K is ``.weighted_map``.

    ``weights``: "positives" (each class's positive count in these labels), "uniform", or a
    vector of c non-negative values such as reference (training-set) counts.
    """
    k = check_k(k)
    s, lab = check_scores_labels(scores, labels)
    return class_result(top_k_columns(s, lab, k), weights)


def image_ap_at_k(scores, labels, k: int = 100) -> ImageAP:
    """Image-wise AP@K: each image's known classes ranked by score, normalised by min(P_i, K)."""
    k = check_k(k)
    s, lab = check_scores_labels(scores, labels)
    # An image's list holds only its c classes: with c < K it ends before rank K, so rank c
    # (a table padded to K columns would rank mostly padding when c is small); the
    # normalisation min(P_i, K) still uses K.
    top = top_k_columns(s.T, lab.T, min(k, max(1, s.shape[1])))
    return ImageAP(k, ap_from_top_k(top, k), top.positives.numpy(), top.known.numpy())


def image_ap_of_items(items: KnownItems, k: int = 100) -> ImageAP:
    """image_ap_at_k of a batch given as its known items."""
    k = check_k(k)
    top = top_k_of_items(
        items.rows, items.values, items.labels, items.images, min(k, max(1, items.classes))
    )
    return ImageAP(k, ap_from_top_k(top, k), top.positives.numpy(), top.known.numpy())


def full_ap(scores, labels) -> np.ndarray:
    """Untruncated, tie-averaged AP per class (NaN without positives); sklearn's
    ``average_precision_score`` when there are no ties and no unknown labels."""
    s, lab = check_scores_labels(scores, labels)
    n, c = s.shape
    if n == 0:
        return np.full(c, np.nan)
    parts = [
        ap_from_top_k(top_k_columns(s[:, c0 : c0 + CHUNK], lab[:, c0 : c0 + CHUNK], n), n)
        for c0 in range(0, c, CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)
