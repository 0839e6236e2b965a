"""The training job's validation: fwMAP@K on the validation split, scored by every rank, and
how many of the split's images it scored."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from eval.metrics import full_ap, weighted_mean
from eval.torchmetric import MAPAtK
from mlc.accel import Precision
from mlc.config import Config
from mlc.data import ShardLoader, counts, normalize
from mlc.dist import all_gather

FULL_AP_SCORES = 50_000_000  # full AP needs every score in memory: only below this many


@torch.no_grad()
def validate(
    model,
    config: Config,
    class_ids: list[str],
    reference: np.ndarray,
    rank: int,
    world: int,
    device: torch.device,
    precision: Precision | None = None,
) -> dict:
    """fwMAP@K weighted by the training split's positive counts, plain MAP@K, and full mAP when
    the scores fit in memory; every rank scores its share into an eval.MAPAtK, whose states
    torchmetrics gathers and merges exactly. The record says how many images were scored of the
    split's, and what the loader read against the split's stats (``data``: lost samples by
    shard, problems)."""
    d, t = config.data, config.train
    settings = dataclasses.replace(d, mode="eval")
    loader = ShardLoader.from_dataset(d.dataset, d.val_split, settings, rank=rank, world_size=world)
    model.eval()
    autocast = (precision or Precision("fp32")).autocast
    weights = reference if reference.sum() > 0 else "uniform"
    # On the CPU, where its code runs; synced over the default process group when world > 1
    # (the async mode's validation runs alone beside an RPC group).
    metric = MAPAtK(len(class_ids), k=t.eval_k, weights=weights, sync_on_compute=world > 1)
    kept_scores, kept_labels, seen = [], [], 0
    loss_sum, loss_count = 0.0, 0  # the loss over every known label of the split
    for batch in loader:
        batch = batch.valid_rows()  # eval padding: no forward for it
        if not batch.keys:
            continue
        with autocast(device):
            logits = model(normalize(batch.images.to(device, non_blocking=True))).float().cpu()
        labels = torch.where(batch.mask.bool(), batch.targets.long(), -1)
        metric.update(logits, labels)
        known = batch.mask.bool()
        losses = F.binary_cross_entropy_with_logits(logits, batch.targets.float(), reduction="none")
        loss_sum += float(losses[known].double().sum())
        loss_count += int(known.sum())
        if len(class_ids) * (seen + len(batch.keys)) <= FULL_AP_SCORES:
            kept_scores.append(logits)
            kept_labels.append(labels)
        seen += len(batch.keys)
        if t.eval_max_samples and seen >= t.eval_max_samples // world:
            break
    if world > 1 and device.type != "cpu":
        metric = metric.to(device)  # NCCL gathers device tensors
    total = metric.accumulator()  # every rank's images, merged exactly
    result = total.compute(metric.weights)
    full_map = None
    parts = all_gather((kept_scores, kept_labels, seen, loss_sum, loss_count), world)
    if all(sum(len(s) for s in p[0]) == p[2] for p in parts):
        scores = torch.cat([s for p in parts for s in p[0]])
        labels = torch.cat([s for p in parts for s in p[1]])
        full = full_ap(scores, labels)
        full_map = weighted_mean(full, np.ones_like(full))
    return {
        "fwmap": result.weighted_map,
        "map": result.unweighted_map,
        "full_map": full_map,
        "loss": sum(p[3] for p in parts) / max(sum(p[4] for p in parts), 1),
        "images": total.images,
        "split_images": sum(s.samples for s in loader.shards),
        "data": counts.merge(all_gather(loader.counts(), world)),
        "classes_evaluated": int((result.positives > 0).sum()),
    }
