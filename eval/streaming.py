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
    MetricInputError,
    TopK,
    check_k,
    check_scores_labels,
    class_result,
    count_columns,
    count_true,
    merge_top_k,
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

    def update(self, scores, labels) -> None:
        s, lab = check_scores_labels(scores, labels)
        if s.shape[1] != self.num_classes:
            raise MetricInputError(
                f"batch has {s.shape[1]} classes, the accumulator was built for {self.num_classes}"
            )
        batch = self._candidates(s, lab) if self._top is not None else None
        self._merge_top(batch or top_k_columns(s, lab, self.k), s.shape[0])

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
            state.update({f: getattr(self._top, f) for f in STATE_FIELDS})
        return state

    def empty_state(self, dtype: torch.dtype = torch.float32) -> dict:
        """The tensors of state_dict() before any image, for scores of ``dtype`` (fixed-shape
        states, such as the defaults of eval.torchmetric.MAPAtK)."""
        top = self._empty(dtype)
        return {f: getattr(top, f) for f in STATE_FIELDS}

    @classmethod
    def from_state_dict(cls, state: dict) -> MAPAccumulator:
        acc = cls(int(state["num_classes"]), int(state["k"]))
        acc.images = int(state["images"])
        if "values" in state:
            acc._top = TopK(*(torch.as_tensor(state[f]) for f in STATE_FIELDS))
            if acc._top.values.shape != (acc.num_classes, acc.k):
                raise MetricInputError(
                    f"state values have shape {tuple(acc._top.values.shape)}, expected "
                    f"({acc.num_classes}, {acc.k})"
                )
        return acc

    def _candidates(self, s: torch.Tensor, lab: torch.Tensor) -> TopK | None:
        """The batch's items that can still matter, or None when too many can (then rank all).

        An item scored below a class's current K-th score can neither enter its top K nor tie
        at the new K-th score (which never decreases), so only the known items at or above it
        count. After the first batches they are a few per class, and collecting them is much
        cheaper than a top-K over the whole batch. A class with fewer than K known items so far
        has a K-th score of -inf: all its known items are candidates.
        """
        kth = self._top.values[:, -1]
        if s.dtype != kth.dtype:
            return None  # _merge_top reports the mismatch
        keep = (s >= kth) & (lab != -1)
        per_class = count_true(keep, 0)
        width = int(per_class.max()) if len(per_class) else 0
        if width * 4 > s.shape[0]:
            return None
        rows, cols = keep.nonzero(as_tuple=True)
        order = torch.argsort(cols, stable=True)
        rows, cols = rows[order], cols[order]
        slot = torch.arange(len(cols)) - (per_class.cumsum(0) - per_class)[cols]
        c = self.num_classes
        # One -inf column more than needed: the candidates' own "K-th" value is then -inf, so a
        # merge counts their ties at the new K-th score from the candidates themselves.
        values = torch.full((c, width + 1), NEG_INF, dtype=s.dtype)
        labels = torch.full((c, width + 1), -1, dtype=torch.int8)
        values[cols, slot] = s[rows, cols]
        labels[cols, slot] = lab[rows, cols]
        counts = count_columns(lab)
        zeros = torch.zeros(c, dtype=torch.int64)
        return TopK(values, labels, zeros, zeros, *counts)

    def _merge_top(self, top: TopK, images: int) -> None:
        if self._top is None:
            self._top = self._empty(top.values.dtype)
        if top.values.dtype != self._top.values.dtype:
            raise MetricInputError(
                f"scores are {top.values.dtype}, earlier batches were {self._top.values.dtype}: "
                "convert them to one dtype (mixing precisions changes which scores tie)"
            )
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
