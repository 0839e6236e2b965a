"""``MAPAtK``: class-wise AP@K (fwMAP@K) as a torchmetrics ``Metric``, exact across DDP ranks.

    metric = MAPAtK(num_classes, k=100, weights=train_positive_counts)
    for scores, labels in batches:  # labels: 1 positive, 0 negative, -1 unknown
        metric.update(scores, labels)
    metric.compute()  # fwMAP@K, a float64 tensor; under DDP over every rank's images
    metric.class_ap()  # eval.metrics.ClassAP: AP@K per class, counts, weights

The metric's states are the tensors of :class:`eval.streaming.MAPAccumulator`: per class the top
K known scores and their labels, the size and positives of the tie block at rank K, the
positive and known counts, and the number of images; O(classes x K) memory, whatever the number
of images. Top-K summaries do not add up, so every state is registered with
``dist_reduce_fx=None``: torchmetrics' sync gathers each rank's tensors, stacked along a new
first dimension, and ``compute()`` merges the ranks' summaries in rank order with the
accumulator's exact merge. The result equals the single-process computation on all the images,
bit for bit (tests/eval/test_torchmetric.py runs 2 gloo ranks), and so does
``merge_state(other)``.

The score dtype is fixed when the metric is built (``score_dtype``, float32 by default; float16
and bfloat16 scores are ranked as float32): every rank's states must have the same dtype to be
gathered, and mixing precisions would change which scores tie. The metric code runs on the CPU;
the states may live on any device (``metric.to(device)``; NCCL gathers device tensors) and are
then copied to the CPU and back at each update.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from eval.metrics import ClassAP, MetricInputError, resolve_weights
from eval.streaming import STATE_FIELDS, MAPAccumulator


class MAPAtK(Metric):
    """Class-wise AP@K of ``update(scores[b, c], labels[b, c])`` batches; ``compute()`` gives
    the weighted mean (fwMAP@K with reference counts as ``weights``; see docs/metric.md).

    ``weights``: "positives" (the evaluated positive counts), "uniform" (plain MAP@K), or a
    vector of ``num_classes`` non-negative values such as the training split's positive counts.
    """

    is_differentiable = False
    higher_is_better = True
    # forward() updates the accumulated state and scores the batch on its own: a top-K summary
    # has no additive per-batch form, so torchmetrics' cheaper forward cannot be used.
    full_state_update = True

    def __init__(
        self,
        num_classes: int,
        k: int = 100,
        weights="positives",
        score_dtype: torch.dtype = torch.float32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        empty = MAPAccumulator(num_classes, k)  # checks num_classes and k
        if score_dtype not in (torch.float32, torch.float64):
            raise MetricInputError(f"score_dtype must be float32 or float64, got {score_dtype}")
        self.num_classes, self.k = empty.num_classes, empty.k
        if not isinstance(weights, str):  # a vector: checked now, not at the end of a pass
            weights = resolve_weights(weights, np.zeros(num_classes, dtype=np.int64))
        self.weights = weights
        for name, default in empty.empty_state(score_dtype).items():
            self.add_state(name, default=default, dist_reduce_fx=None)
        self.add_state("images", default=torch.tensor(0), dist_reduce_fx=None)

    def update(self, scores, labels) -> None:
        accumulator = self._local()
        accumulator.update(scores, labels)
        self._store(accumulator)

    def compute(self) -> torch.Tensor:
        return torch.tensor(self._merged().compute(self.weights).weighted_map, dtype=torch.float64)

    def accumulator(self) -> MAPAccumulator:
        """Every rank's images in one MAPAccumulator, synced across the process group like
        ``compute()``: its ``compute(weights)`` gives the ClassAP, ``images`` their number."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._merged()

    def class_ap(self, weights=None) -> ClassAP:
        """AP@K per class with counts and weights (``weights``: the metric's own by default)."""
        return self.accumulator().compute(self.weights if weights is None else weights)

    def merge_state(self, incoming_state) -> None:
        """Add another MAPAtK's images (or its ``metric_state`` dict) to this one, exactly."""
        if isinstance(incoming_state, MAPAtK):
            other = incoming_state._local()
        elif isinstance(incoming_state, dict):
            other = self._accumulator_of(incoming_state)
        else:
            raise ValueError(
                f"merge_state takes a MAPAtK or its metric_state dict, got {type(incoming_state)}"
            )
        if other.images == 0:
            return
        accumulator = self._local()
        accumulator.merge(other)
        self._store(accumulator)
        self._computed = None  # torchmetrics' cached compute() value is stale now

    def _accumulator_of(self, state: dict) -> MAPAccumulator:
        """The accumulator of one rank's states (an empty one for a rank without images)."""
        images = int(state["images"])
        if images == 0:
            return MAPAccumulator(self.num_classes, self.k)
        tensors = {f: torch.as_tensor(state[f]).cpu() for f in STATE_FIELDS}
        return MAPAccumulator.from_state_dict(
            {"num_classes": self.num_classes, "k": self.k, "images": images, **tensors}
        )

    def _local(self) -> MAPAccumulator:
        return self._accumulator_of({name: getattr(self, name) for name in self._defaults})

    def _merged(self) -> MAPAccumulator:
        """After a sync each state holds every rank's tensor along a first dimension: merge
        them in rank order. Without a sync (one process), this process's own states."""
        if self.values.ndim == 2:
            return self._local()
        total = MAPAccumulator(self.num_classes, self.k)
        for rank in range(self.values.shape[0]):
            state = {name: getattr(self, name)[rank] for name in self._defaults}
            part = self._accumulator_of(state)
            if part.images == 0:
                continue  # an empty summary: nothing to merge
            if total.images == 0:
                total = part
            else:
                total.merge(part)
        return total

    def _store(self, accumulator: MAPAccumulator) -> None:
        state = accumulator.state_dict()
        if "values" not in state:
            return  # nothing seen: the states keep their defaults
        if state["values"].dtype != self.values.dtype:
            raise MetricInputError(
                f"scores are {state['values'].dtype}, this MAPAtK ranks {self.values.dtype} "
                f"scores: convert them, or build it with score_dtype={state['values'].dtype} "
                "(mixing precisions changes which scores tie)"
            )
        device = self.values.device
        for name in STATE_FIELDS:
            setattr(self, name, state[name].to(device))
        self.images = torch.tensor(state["images"], device=device)
