"""The streaming Poisson bootstrap: every replicate equals the metric library run on the resample
it stands for (rows repeated by their multiplicities), whatever the batching, row order or
merging; the multiplicities are Poisson(1); intervals behave."""

import math

import numpy as np
import pytest
import torch

from eval.bootstrap import (
    PoissonBootstrap,
    counts_of_uniform,
    key_hashes,
    percentile_interval,
    poisson_counts,
)
from eval.metrics import KnownItems, class_ap_at_k, image_ap_at_k


def data(n=400, c=6, seed=0):
    rng = np.random.default_rng(seed)
    # Rounded scores: many ties, also across the K-th rank.
    scores = np.round(rng.normal(size=(n, c)), 1).astype(np.float32)
    labels = rng.choice([-1, 0, 1], p=[0.2, 0.5, 0.3], size=(n, c)).astype(np.int8)
    labels[:, -1] = np.where(labels[:, -1] == 1, 0, labels[:, -1])  # a class without positives
    keys = [f"img-{i:05d}" for i in range(n)]
    return keys, scores, labels


def feed(boot, keys, scores, labels, k, rows):
    image_ap = image_ap_at_k(scores, labels, k).ap
    for i in range(0, len(keys), rows):
        part = slice(i, i + rows)
        boot.update(keys[part], scores[part], labels[part], image_ap[part])
    return boot


@pytest.mark.parametrize("k", [1, 15, 1000])
def test_each_replicate_is_the_library_on_its_resample(k):
    keys, scores, labels = data()
    replicates, weights = 25, np.array([5.0, 1.0, 0.0, 2.0, 3.0, 1.0])
    boot = feed(
        PoissonBootstrap(scores.shape[1], k, replicates, seed=7), keys, scores, labels, k, 64
    )
    values = boot.replicate_values(weights)
    counts = poisson_counts(key_hashes(keys, 7), replicates)
    image_ap = image_ap_at_k(scores, labels, k).ap
    for b in range(replicates):
        rows = np.repeat(np.arange(len(keys)), counts[:, b])  # the resample, explicitly
        expected = class_ap_at_k(scores[rows], labels[rows], k, weights)
        assert values["weighted"][b] == pytest.approx(expected.weighted_map, abs=1e-12)
        assert values["unweighted"][b] == pytest.approx(expected.unweighted_map, abs=1e-12)
        assert values["image"][b] == pytest.approx(np.nanmean(image_ap[rows]), abs=1e-12)


def test_poisson_counts_are_the_inverse_cdf_of_the_hash_bits():
    """Each multiplicity is the smallest j with u < P(X <= j), X ~ Poisson(1), for the uniform
    u made of the 53 high bits of SplitMix64(hash + replicate * golden ratio)."""
    hashes = key_hashes([f"img{i}" for i in range(3000)], 3)
    counts = poisson_counts(hashes, 40)
    cdf = np.cumsum([math.exp(-1) / math.factorial(j) for j in range(20)])
    golden, mask = 0x9E3779B97F4A7C15, 2**64 - 1
    for i in range(0, 3000, 97):
        for b in range(40):
            x = (int(hashes[i]) + (b + 1) * golden) & mask
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
            u = ((x ^ (x >> 31)) >> 11) / 2**53
            assert counts[i, b] == int(np.sum(cdf <= u)), (i, b)
    frequencies = np.bincount(counts.ravel(), minlength=4)[:4] / counts.size
    poisson = [math.exp(-1) / math.factorial(j) for j in range(4)]
    assert frequencies == pytest.approx(poisson, abs=0.01)


def test_counts_of_uniform_are_exact_at_and_around_every_threshold():
    """The table lookup gives the count of a brute-force comparison with every threshold, also
    for u just below, at and above each threshold (the blocks the table cannot settle alone)."""
    cdf = [math.exp(-1) / math.factorial(j) for j in range(20)]
    thresholds = [math.ceil(c * 2**53) for c in np.cumsum(cdf)]
    rng = np.random.default_rng(5)
    edges = [t + d for t in thresholds for d in (-(2**37), -1, 0, 1) if 0 <= t + d < 2**53]
    u = np.array(edges + [0, 2**53 - 1], dtype=np.uint64)
    u = np.concatenate([u, rng.integers(0, 2**53, size=200_000, dtype=np.uint64)])
    expected = [sum(int(x) >= t for t in thresholds) for x in u]
    assert counts_of_uniform(u).tolist() == expected


def test_positives_weights_follow_each_resample():
    keys, scores, labels = data(n=200)
    boot = feed(PoissonBootstrap(scores.shape[1], 10, 8), keys, scores, labels, 10, 50)
    values = boot.replicate_values("positives")
    counts = poisson_counts(key_hashes(keys, 0), 8)
    for b in range(8):
        rows = np.repeat(np.arange(len(keys)), counts[:, b])
        expected = class_ap_at_k(scores[rows], labels[rows], 10, "positives").weighted_map
        assert values["weighted"][b] == pytest.approx(expected, abs=1e-12)


def test_batching_order_and_merging_do_not_matter():
    keys, scores, labels = data()
    whole = feed(PoissonBootstrap(6, 20, 30, seed=1), keys, scores, labels, 20, 1000)
    order = np.random.default_rng(3).permutation(len(keys))
    shuffled = [keys[i] for i in order], scores[order], labels[order]
    a = feed(PoissonBootstrap(6, 20, 30, seed=1), *[x[:150] for x in shuffled], 20, 7)
    b = feed(PoissonBootstrap(6, 20, 30, seed=1), *[x[150:] for x in shuffled], 20, 33)
    a.merge(PoissonBootstrap.from_state_dict(b.state_dict()))  # as from another process
    for name, values in whole.replicate_values("uniform").items():
        assert np.allclose(a.replicate_values("uniform")[name], values, rtol=0, atol=1e-12), name
    # Class-wise replicates are exact (the same top-K summaries), not merely close.
    assert np.array_equal(
        a.replicate_values("uniform")["unweighted"], whole.replicate_values("uniform")["unweighted"]
    )


def test_multiplicities_are_poisson_1_and_depend_on_key_and_seed():
    keys = [f"k{i}" for i in range(20000)]
    counts = poisson_counts(key_hashes(keys, 0), 10)
    assert counts.mean() == pytest.approx(1.0, abs=0.01)
    assert counts.var() == pytest.approx(1.0, abs=0.02)
    assert np.mean(counts == 0) == pytest.approx(np.exp(-1), abs=0.005)
    assert np.array_equal(poisson_counts(key_hashes(keys[:5], 0), 10), counts[:5])
    assert not np.array_equal(poisson_counts(key_hashes(keys, 1), 10), counts)
    assert not np.array_equal(counts[:, 0], counts[:, 1])  # replicates differ


def test_intervals_contain_the_estimate_and_shrink_with_more_images():
    widths = []
    for n in (300, 3000):
        keys, scores, labels = data(n=n, seed=2)
        # Labels that follow the scores loosely: AP well above chance, far from 1.
        noise = np.random.default_rng(n).random(scores.shape)
        labels = np.where(labels == -1, -1, noise < 1 / (1 + np.exp(-2 * scores))).astype(np.int8)
        boot = feed(PoissonBootstrap(6, 50, 200), keys, scores, labels, 50, 512)
        point = class_ap_at_k(scores, labels, 50, "uniform").unweighted_map
        low, high = boot.intervals("uniform")["unweighted_map_at_k"]
        assert low < point < high
        widths.append(high - low)
    assert widths[1] < widths[0] * 0.6  # about 1/sqrt(10) of it


def test_percentile_interval_ignores_undefined_replicates():
    assert percentile_interval(np.array([np.nan, np.nan])) is None
    low, high = percentile_interval(np.array([np.nan, *np.linspace(0, 1, 1001)]))
    assert low == pytest.approx(0.025) and high == pytest.approx(0.975)


def test_the_pool_condition_flags_exactly_the_replicates_it_cannot_answer(monkeypatch):
    # A pool of only K items: often too small, so the check must catch it; wherever it says
    # "exact", the replicate's AP@K must equal the explicit resample's.
    import eval.bootstrap

    monkeypatch.setattr(eval.bootstrap, "pool_size", lambda k: k)
    keys, scores, labels = data(n=300, c=4)
    k, replicates = 20, 30
    boot = feed(PoissonBootstrap(4, k, replicates), keys, scores, labels, k, 64)
    ap, exact = boot._replicate_ap(0, replicates)
    counts = poisson_counts(key_hashes(keys, 0), replicates)
    wrong = 0
    for b in range(replicates):
        rows = np.repeat(np.arange(len(keys)), counts[:, b])
        expected = class_ap_at_k(scores[rows], labels[rows], k).ap
        for c in range(4):
            same = np.isclose(ap[b, c], expected[c], atol=1e-12, equal_nan=True)
            assert same or not exact[b, c], (b, c)
            wrong += not same
    assert (~exact).sum() > 0 and wrong <= (~exact).sum()


def test_image_wise_intervals_do_not_depend_on_batching():
    """The same images in one batch, in batches of 7, or split across two merged accumulators
    give bit-identical replicate values (the file mode and the checkpoint pass must agree)."""
    from eval.bootstrap import PoissonBootstrap
    from eval.metrics import image_ap_at_k

    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(101, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(-1, 2, (101, 6), generator=gen)
    keys = [f"img{i}" for i in range(101)]
    ap = image_ap_at_k(scores, labels, 3).ap

    def run(cuts: list[int]) -> np.ndarray:
        boot = PoissonBootstrap(6, 3, 50, seed=1)
        for a, b in zip([0, *cuts], [*cuts, 101], strict=True):
            boot.update(keys[a:b], scores[a:b], labels[a:b], ap[a:b])
        return boot.replicate_values()["image"]

    whole = run([])
    assert np.array_equal(whole, run(list(range(7, 101, 7))), equal_nan=True)
    first, second = PoissonBootstrap(6, 3, 50, seed=1), PoissonBootstrap(6, 3, 50, seed=1)
    first.update(keys[:40], scores[:40], labels[:40], ap[:40])
    second.update(keys[40:], scores[40:], labels[40:], ap[40:])
    first.merge(PoissonBootstrap.from_state_dict(second.state_dict()))
    assert np.array_equal(whole, first.replicate_values()["image"], equal_nan=True)
    # and the values are the plain weighted means to float precision
    boot = PoissonBootstrap(6, 3, 50, seed=1)
    boot.update(keys, scores, labels, ap)
    from eval.bootstrap import key_hashes, poisson_counts

    m = poisson_counts(key_hashes(keys, 1), 50)
    has = ~np.isnan(ap)
    expected = (m[has] * ap[has, None]).sum(0) / m[has].sum(0)
    assert np.allclose(whole, expected, rtol=1e-9)


def test_known_items_give_the_dense_replicates():
    """update_items (batches as their known pairs; OpenImages-like sparse labels) keeps the
    same counts and gives the same replicate values as update on the dense batches."""
    keys, scores, labels = data(n=500, c=7, seed=4)
    labels[np.random.default_rng(4).random(labels.shape) > 0.3] = -1
    k, replicates = 15, 20
    dense = feed(PoissonBootstrap(7, k, replicates, seed=2), keys, scores, labels, k, 64)
    sparse = PoissonBootstrap(7, k, replicates, seed=2)
    image_ap = image_ap_at_k(scores, labels, k).ap
    for i in range(0, len(keys), 64):
        part = slice(i, i + 64)
        sparse.update_items(keys[part], KnownItems.of(scores[part], labels[part]), image_ap[part])
    assert np.array_equal(sparse.positives, dense.positives)
    assert np.array_equal(sparse.known, dense.known)
    for name, values in dense.replicate_values().items():
        assert np.array_equal(sparse.replicate_values()[name], values, equal_nan=True), name
