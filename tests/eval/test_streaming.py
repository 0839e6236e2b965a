"""The streaming accumulator equals the dense computation exactly, however it is fed or merged."""

import numpy as np
import pytest
import torch

from eval.metrics import KnownItems, MetricInputError, class_ap_at_k
from eval.streaming import MAPAccumulator


def tied_case(seed, n=600, c=40, levels=6):
    rng = np.random.default_rng(seed)
    # Few score levels: long tie blocks that straddle rank K and batch boundaries.
    scores = rng.integers(0, levels, size=(n, c)).astype(np.float32)
    labels = rng.choice([-1, 0, 1], p=[0.2, 0.6, 0.2], size=(n, c)).astype(np.int8)
    labels[:, 0] = -1  # a class with nothing known
    labels[:, 1] = np.where(labels[:, 1] == 1, 0, labels[:, 1])  # known but no positive
    return scores, labels


def assert_same(result, dense):
    np.testing.assert_array_equal(result.ap, dense.ap)  # exactly, NaNs included
    np.testing.assert_array_equal(result.positives, dense.positives)
    np.testing.assert_array_equal(result.known, dense.known)
    assert result.weighted_map == dense.weighted_map


@pytest.mark.parametrize("batch", [1, 7, 50, 99, 100, 101, 250, 600])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_equals_dense(batch, seed):
    scores, labels = tied_case(seed)
    acc = MAPAccumulator(num_classes=scores.shape[1], k=100)
    for i in range(0, len(scores), batch):
        acc.update(scores[i : i + batch], labels[i : i + batch])
    assert acc.images == len(scores)
    assert_same(acc.compute(), class_ap_at_k(scores, labels, k=100))


def test_continuous_scores_streaming_equals_dense():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(1000, 30))
    labels = rng.integers(-1, 2, size=(1000, 30))
    acc = MAPAccumulator(30, k=20)
    for i in range(0, 1000, 64):
        acc.update(scores[i : i + 64], labels[i : i + 64])
    assert_same(acc.compute("uniform"), class_ap_at_k(scores, labels, k=20, weights="uniform"))


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_merge_of_split_accumulators_equals_whole(parts):
    scores, labels = tied_case(7)
    rng = np.random.default_rng(parts)
    owner = rng.integers(0, parts, size=len(scores))  # uneven, interleaved split
    accs = []
    for p in range(parts):
        acc = MAPAccumulator(scores.shape[1], k=60)
        rows = np.flatnonzero(owner == p)
        for i in range(0, len(rows), 33):
            acc.update(scores[rows[i : i + 33]], labels[rows[i : i + 33]])
        accs.append(acc)
    # Merge through state dicts, as processes would exchange them.
    total = MAPAccumulator.from_state_dict(accs[0].state_dict())
    for acc in accs[1:]:
        total.merge(MAPAccumulator.from_state_dict(acc.state_dict()))
    assert total.images == len(scores)
    assert_same(total.compute(), class_ap_at_k(scores, labels, k=60))


def test_memory_does_not_grow_with_images():
    acc = MAPAccumulator(10, k=5)
    for _ in range(20):
        acc.update(torch.randn(50, 10), torch.randint(-1, 2, (50, 10)))
    state = acc.state_dict()
    assert state["values"].shape == (10, 5) and state["labels"].shape == (10, 5)


def test_empty_accumulator_has_no_evaluated_class():
    result = MAPAccumulator(3, k=5).compute()
    assert result.excluded_no_positives.tolist() == [0, 1, 2] and np.isnan(result.weighted_map)


def test_errors():
    acc = MAPAccumulator(3, k=5)
    with pytest.raises(
        MetricInputError, match="batch has 2 classes, the accumulator was built for 3"
    ):
        acc.update(np.zeros((2, 2)), np.zeros((2, 2)))
    acc.update(np.zeros((2, 3), dtype=np.float32), np.zeros((2, 3)))
    with pytest.raises(MetricInputError, match="convert them to one dtype"):
        acc.update(np.zeros((2, 3), dtype=np.float64), np.zeros((2, 3)))
    with pytest.raises(MetricInputError, match="cannot merge"):
        acc.merge(MAPAccumulator(3, k=6))
    with pytest.raises(MetricInputError, match="k must be"):
        MAPAccumulator(3, k=0)


@pytest.mark.parametrize("known_rate", [1.0, 0.05])  # dense labels; sparse OpenImages-like ones
def test_candidate_prefilter_is_used_and_exact(monkeypatch, known_rate):
    rng = np.random.default_rng(11)
    n, c = 4000, 50
    scores = rng.integers(0, 40, size=(n, c)).astype(np.float32)  # ties at the K-th score
    labels = rng.integers(0, 2, size=(n, c)).astype(np.int8)
    labels[rng.random((n, c)) > known_rate] = -1
    labels[:, :5] = np.where(rng.random((n, 5)) < 0.01, labels[:, :5], -1)  # never reach K
    calls = {"prefiltered": 0, "ranked": 0}
    add, merge_top = MAPAccumulator._add, MAPAccumulator._merge_top

    def spy_add(self, *args):
        calls["prefiltered"] += 1
        return add(self, *args)

    def spy_merge_top(self, *args):
        calls["ranked"] += 1
        return merge_top(self, *args)

    monkeypatch.setattr(MAPAccumulator, "_add", spy_add)
    monkeypatch.setattr(MAPAccumulator, "_merge_top", spy_merge_top)
    acc = MAPAccumulator(c, k=30)
    for i in range(0, n, 200):
        acc.update(scores[i : i + 200], labels[i : i + 200])
    assert calls["prefiltered"] >= 10  # the fast path ran, and gave the exact answer
    assert_same(acc.compute(), class_ap_at_k(scores, labels, k=30))


@pytest.mark.parametrize("rows", [1, 37, 4000])
def test_known_items_give_the_dense_answer(rows):
    """update_items (a batch as its known pairs) = class_ap_at_k on the dense matrix, ties at
    rank K, classes that never reach K items and classes without positives included."""
    rng = np.random.default_rng(12)
    n, c = 4000, 40
    scores = rng.integers(0, 30, size=(n, c)).astype(np.float32)
    labels = rng.integers(0, 2, size=(n, c)).astype(np.int8)
    labels[rng.random((n, c)) > 0.1] = -1
    labels[:, :3] = np.where(rng.random((n, 3)) < 0.003, labels[:, :3], -1)  # never reach K
    labels[:, 3] = np.minimum(labels[:, 3], 0)  # no positives
    acc = MAPAccumulator(c, k=30)
    for i in range(0, n, rows):
        acc.update_items(KnownItems.of(scores[i : i + rows], labels[i : i + rows]))
    assert acc.images == n
    assert_same(acc.compute(), class_ap_at_k(scores, labels, k=30))
    with pytest.raises(MetricInputError, match="convert them to one dtype"):
        acc.update_items(KnownItems.of(scores[:2].astype(np.float64), labels[:2]))


@pytest.mark.parametrize("first_inside", [True, False])
def test_state_made_in_inference_mode_updates_outside_it(first_inside):
    """The checkpoint pass scores some chunks inside torch.inference_mode and flushes the last
    one outside it: the accumulators update their state in place either way, with the same
    result as without inference mode."""
    from eval.bootstrap import PoissonBootstrap

    rng = np.random.default_rng(2)
    scores = torch.from_numpy(rng.integers(0, 9, size=(300, 5)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(-1, 2, size=(300, 5)).astype(np.int8))
    keys = [f"k{i}" for i in range(300)]
    acc, boot = MAPAccumulator(5, k=20), PoissonBootstrap(5, 20, 10)
    for i, part in enumerate((slice(0, 100), slice(100, 200), slice(200, 300))):
        inside = (i % 2 == 0) == first_inside
        with torch.inference_mode(inside):
            if i == 1:  # a batch as its known items
                acc.update_items(KnownItems.of(scores[part], labels[part]))
                boot.update_items(keys[part], KnownItems.of(scores[part], labels[part]))
            else:
                acc.update(scores[part], labels[part])
                boot.update(keys[part], scores[part], labels[part])
    with torch.inference_mode():
        acc.merge(MAPAccumulator.from_state_dict(MAPAccumulator(5, k=20).state_dict()))
    acc.update(scores[:0], labels[:0])
    assert_same(acc.compute(), class_ap_at_k(scores, labels, k=20))
    plain = PoissonBootstrap(5, 20, 10)
    plain.update(keys, scores, labels)
    assert np.array_equal(boot.replicate_values()["weighted"], plain.replicate_values()["weighted"])


def test_a_result_does_not_change_with_later_updates():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(200, 4)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(200, 4)).astype(np.int8)
    acc = MAPAccumulator(4, k=10)
    acc.update(scores[:100], labels[:100])
    early, state = acc.compute(), acc.state_dict()
    acc.update(scores[100:], labels[100:])
    assert_same(early, class_ap_at_k(scores[:100], labels[:100], k=10))
    assert torch.equal(state["known"], torch.from_numpy((labels[:100] != -1).sum(0)))
