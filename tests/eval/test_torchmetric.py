"""eval.MAPAtK, the torchmetrics Metric: equal to the dense computation bit for bit, fed in
batches, merged, through forward(), and synced across 2 gloo processes."""

import datetime
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval import MAPAtK
from eval.metrics import MetricInputError, class_ap_at_k
from mlc.dist import free_port
from tests.eval.test_streaming import assert_same, tied_case


def fed(metric, scores, labels, batch):
    for i in range(0, len(scores), batch):
        metric.update(scores[i : i + batch], labels[i : i + batch])
    return metric


@pytest.mark.parametrize("batch", [1, 33, 100, 600])
def test_batches_equal_dense(batch):
    scores, labels = tied_case(0)
    weights = np.arange(scores.shape[1], dtype=np.float64)
    metric = fed(MAPAtK(scores.shape[1], k=100, weights=weights), scores, labels, batch)
    dense = class_ap_at_k(scores, labels, k=100, weights=weights)
    assert metric.compute().item() == dense.weighted_map
    assert_same(metric.class_ap(), dense)
    assert metric.accumulator().images == len(scores)


def test_state_is_classes_by_k_whatever_the_images():
    scores, labels = tied_case(1)
    metric = fed(MAPAtK(scores.shape[1], k=20), scores, labels, 50)
    assert metric.values.shape == metric.labels.shape == (scores.shape[1], 20)
    assert metric.values.dtype == torch.float32 and metric.labels.dtype == torch.int8
    assert metric.positives.shape == (scores.shape[1],) and int(metric.images) == len(scores)


def test_merge_state_and_forward_equal_dense():
    scores, labels = tied_case(2)
    dense = class_ap_at_k(scores, labels, k=60)
    a = fed(MAPAtK(scores.shape[1], k=60), scores[:250], labels[:250], 40)
    b = fed(MAPAtK(scores.shape[1], k=60), scores[250:], labels[250:], 40)
    a.compute()  # a cached value must not survive the merge
    a.merge_state(b)
    assert a.compute().item() == dense.weighted_map
    c = MAPAtK(scores.shape[1], k=60)
    c.merge_state(b.metric_state)
    c.merge_state(fed(MAPAtK(scores.shape[1], k=60), scores[:250], labels[:250], 7).metric_state)
    assert_same(c.class_ap(), dense)

    d = MAPAtK(scores.shape[1], k=60)
    for i in range(0, len(scores), 100):
        batch_value = d(scores[i : i + 100], labels[i : i + 100])
    last = class_ap_at_k(scores[500:], labels[500:], k=60)
    assert batch_value.item() == last.weighted_map  # forward(): the batch's own value
    assert d.compute().item() == dense.weighted_map  # ... and the whole pass accumulated
    d.reset()
    assert int(d.images) == 0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert np.isnan(d.compute().item())


def test_wrong_inputs_are_refused_with_the_reason():
    scores, labels = tied_case(3)
    metric = MAPAtK(scores.shape[1], k=10)
    with pytest.raises(MetricInputError, match="score_dtype=torch.float64"):
        metric.update(scores.astype(np.float64), labels)
    assert int(metric.images) == 0  # a refused batch leaves the state alone
    assert MAPAtK(4, score_dtype=torch.float64).values.dtype == torch.float64
    with pytest.raises(MetricInputError, match="one value per class"):
        MAPAtK(scores.shape[1], weights=[1.0, 2.0])
    with pytest.raises(MetricInputError, match="k must be"):
        MAPAtK(3, k=0)
    with pytest.raises(MetricInputError, match="classes"):
        metric.update(scores[:, :5], labels[:, :5])


def ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: scores its share of tied_case(4) (an uneven, interleaved split; then
    a second metric whose rank 1 sees no image), writes what compute() and class_ap() give."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        scores, labels = tied_case(4)
        owner = np.random.default_rng(9).integers(0, 3, size=len(scores)) % world  # 2:1 split
        rows = np.flatnonzero(owner == rank)
        split = fed(MAPAtK(scores.shape[1], k=100), scores[rows], labels[rows], 29)
        lopsided = MAPAtK(scores.shape[1], k=100, weights="uniform")
        if rank == 0:
            fed(lopsided, scores, labels, 64)
        result = {
            "fwmap": split.compute().item(),
            "class_ap": split.class_ap(),
            "images": split.accumulator().images,
            "local_images": int(split.images),  # the rank's own state is back after a sync
            "lopsided": lopsided.compute().item(),
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_compute_the_single_process_result_exactly(tmp_path):
    world = 2
    mp.spawn(ddp_rank, args=(world, free_port(), str(tmp_path)), nprocs=world)
    scores, labels = tied_case(4)
    dense = class_ap_at_k(scores, labels, k=100)
    single = fed(MAPAtK(scores.shape[1], k=100), scores, labels, 29)
    uniform = class_ap_at_k(scores, labels, k=100, weights="uniform").weighted_map
    local = []
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["fwmap"] == dense.weighted_map == single.compute().item()
        assert_same(result["class_ap"], dense)
        assert result["images"] == len(scores)
        assert result["lopsided"] == uniform
        local.append(result["local_images"])
    assert sum(local) == len(scores) and min(local) > 0
