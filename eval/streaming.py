"""Streaming class-wise AP@K: batches in, O(classes * K) memory, exact, mergeable across processes.

Each class keeps the :class:`~eval.metrics.TopK` summary of the images seen so far: its top K
known scores and labels, the size and positives of the tie block at rank K, and its positive and
known counts. Merging two summaries of disjoint image sets gives exactly the summary of their
union, so ``compute()`` equals :func:`eval.metrics.class_ap_at_k` on all the images at once, ties
at rank K included, whatever the batching or the number of processes.
"""

from __future__ import annotations

import torch

from eval.metrics import (
    NEG_INF,
    ClassAP,
    KnownItems,
    MetricInputError,
    TopK,
    check_k,
    check_scores_labels,
    class_result,
    count_columns,
    count_true,
    merge_top_k,
    pad_groups,
    state_mode,
    top_k_columns,
)

# The tensors of state_dict() (besides num_classes, k and images), in TopK field order.
STATE_FIELDS = ("values", "labels", "tie_count", "tie_positives", "positives", "known")


class MAPAccumulator:
    """Accumulates ``update(scores[b, c], labels[b, c])`` batches; ``compute()`` gives ClassAP.

    The score dtype is fixed by the first batch (mixing float32 and float64 would change which
    scores tie); later batches must match it.
    """

    def __init__(self, num_classes: int, k: int = 100):
        if num_classes < 1:
            raise MetricInputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.k = check_k(k)
        self.images = 0
        self._top: TopK | None = None

    @state_mode
    def update(self, scores, labels) -> None:
        s, lab = check_scores_labels(scores, labels)
        if s.shape[1] != self.num_classes:
            raise MetricInputError(
                f"batch has {s.shape[1]} classes, the accumulator was built for {self.num_classes}"
            )
        if self._top is not None:
            self._check_dtype(s.dtype)
            # An item scored below a class's current K-th score can neither enter its top K nor
            # tie at the new K-th score (which never decreases): only the known items at or
            # above it count. After the first batches they are a few per class, and collecting
            # them is much cheaper than a top-K over the whole batch. A class with fewer than K
            # known items so far has a K-th score of -inf: all its known items count.
            keep = (s >= self._top.values[:, -1]) & (lab != -1)
            if int(count_true(keep, 0).max()) * 4 <= s.shape[0]:
                rows, cols = keep.nonzero(as_tuple=True)
                positives, known = count_columns(lab)
                self._add(cols, s[rows, cols], lab[rows, cols], positives, known, s.shape[0])
                return
        self._merge_top(top_k_columns(s, lab, self.k), s.shape[0])

    @state_mode
    def update_items(self, items: KnownItems) -> None:
        """``update`` with a batch given as its known items (the other pairs unknown)."""
        if items.classes != self.num_classes:
            raise MetricInputError(
                f"batch has {items.classes} classes, the accumulator was built for "
                f"{self.num_classes}"
            )
        if self._top is None:
            self._top = self._empty(items.values.dtype)
        self._check_dtype(items.values.dtype)
        keep = items.values >= self._top.values[items.cols, -1]  # as in update
        c = self.num_classes
        positives = torch.bincount(items.cols[items.labels == 1], minlength=c)
        known = torch.bincount(items.cols, minlength=c)
        cols = items.cols[keep]
        self._add(cols, items.values[keep], items.labels[keep], positives, known, items.images)

    @state_mode
    def merge(self, other: MAPAccumulator) -> None:
        """Add another accumulator's images (e.g. from another process) to this one."""
        if (other.num_classes, other.k) != (self.num_classes, self.k):
            raise MetricInputError(
                f"cannot merge an accumulator of {other.num_classes} classes at K={other.k} into "
                f"one of {self.num_classes} classes at K={self.k}"
            )
        if other._top is not None:
            self._merge_top(other._top, other.images)

    def compute(self, weights="positives") -> ClassAP:
        return class_result(self._top or self._empty(torch.float32), weights)

    def state_dict(self) -> dict:
        """Plain tensors, for torch.save or torch.distributed's all_gather_object."""
        state = {"num_classes": self.num_classes, "k": self.k, "images": self.images}
        if self._top is not None:
            state.update({f: getattr(self._top, f).clone() for f in STATE_FIELDS})
        return state

    def empty_state(self, dtype: torch.dtype = torch.float32) -> dict:
        """The tensors of state_dict() before any image, for scores of ``dtype`` (fixed-shape
        states, such as the defaults of eval.torchmetric.MAPAtK)."""
        top = self._empty(dtype)
        return {f: getattr(top, f) for f in STATE_FIELDS}

    @classmethod
    @state_mode
    def from_state_dict(cls, state: dict) -> MAPAccumulator:
        acc = cls(int(state["num_classes"]), int(state["k"]))
        acc.images = int(state["images"])
        if "values" in state:
            acc._top = TopK(*(torch.as_tensor(state[f]).clone() for f in STATE_FIELDS))
            if acc._top.values.shape != (acc.num_classes, acc.k):
                raise MetricInputError(
                    f"state values have shape {tuple(acc._top.values.shape)}, expected "
                    f"({acc.num_classes}, {acc.k})"
                )
        return acc

    def _add(self, cols, values, labels, positives, known, images: int) -> None:
        """Merge candidate items (class, score, label) into the classes they belong to; then
        add the batch's positive and known counts (of all its items) to every class."""
        # One -inf column more than needed: the candidates' own "K-th" value is then -inf, so
        # the merge counts their ties at the new K-th score from the candidates themselves.
        present, (v, lab) = pad_groups(cols, [(values, NEG_INF), (labels, -1)], extra=1)
        zeros = torch.zeros(len(present), dtype=torch.int64)
        top = self._top
        merged = merge_top_k(
            TopK(*(getattr(top, f)[present] for f in STATE_FIELDS)),
            TopK(v, lab, zeros, zeros, zeros, zeros),
        )
        for f in ("values", "labels", "tie_count", "tie_positives"):
            getattr(top, f)[present] = getattr(merged, f)  # in place: tensors of this object's own
        top.positives += positives
        top.known += known
        self.images += images

    def _check_dtype(self, dtype: torch.dtype) -> None:
        if dtype != self._top.values.dtype:
            raise MetricInputError(
                f"scores are {dtype}, earlier batches were {self._top.values.dtype}: "
                "convert them to one dtype (mixing precisions changes which scores tie)"
            )

    def _merge_top(self, top: TopK, images: int) -> None:
        if self._top is None:
            self._top = self._empty(top.values.dtype)
        self._check_dtype(top.values.dtype)
        self._top = merge_top_k(self._top, top)
        self.images += images

    def _empty(self, dtype: torch.dtype) -> TopK:
        c, k = self.num_classes, self.k
        zeros = torch.zeros(c, dtype=torch.int64)
        return TopK(
            torch.full((c, k), NEG_INF, dtype=dtype),
            torch.full((c, k), -1, dtype=torch.int8),
            zeros,
            zeros.clone(),
            zeros.clone(),
            zeros.clone(),
        )
