"""The metric against docs/metric.md's hand-derived vectors, a brute-force reference and sklearn."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import average_precision_score

from eval.metrics import (
    KnownItems,
    MetricInputError,
    ap_from_top_k,
    class_ap_at_k,
    full_ap,
    image_ap_at_k,
    image_ap_of_items,
    mostly_unknown,
    top_k_columns,
    top_k_of_items,
)

from .reference import brute_force_ap, brute_force_class_ap


def test_vector_1_classwise_k3():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.4, 0.35, 0.2, 0.3]]).T
    labels = np.array([[1, 0, 1, 1, 0], [1, 0, 1, 1, 1]]).T
    result = class_ap_at_k(scores, labels, k=3, weights=[30, 10])
    assert result.ap == pytest.approx([5 / 9, 7 / 18], abs=1e-15)
    assert result.weighted_map == pytest.approx(37 / 72, abs=1e-15)
    assert result.unweighted_map == pytest.approx((5 / 9 + 7 / 18) / 2, abs=1e-15)


def test_vector_2_ties_and_unknowns_k4():
    scores = np.array(
        [
            [0.9, 0.5, 0.5, 0.5, 0.2, 0.1],
            [0.3, 0.2, 0.1, 0.4, 0.5, 0.6],
            [0.7, 0.7, 0.7, 0.2, 0.2, 0.9],
        ]
    ).T
    labels = np.array([[0, 1, 0, 1, -1, 1], [0, 0, 0, 0, -1, 0], [1, 1, 1, 0, 0, 0]]).T
    result = class_ap_at_k(scores, labels, k=4, weights=[2, 5, 1])
    assert result.ap[0] == pytest.approx(1 / 3, abs=1e-15)
    assert np.isnan(result.ap[1])
    assert result.ap[2] == pytest.approx(23 / 36, abs=1e-15)
    assert result.weighted_map == pytest.approx(47 / 108, abs=1e-15)
    assert result.excluded_no_positives.tolist() == [1]
    assert result.positives.tolist() == [3, 0, 3]
    assert result.known.tolist() == [5, 5, 6]


def test_vector_3_imagewise_k3():
    scores = np.array([[0.2, 0.9, 0.4, 0.8, 0.1], [0.6, 0.3, 0.5, 0.7, 0.05]])
    labels = np.array([[1, 1, 0, 0, 1], [0, 0, 1, 1, -1]])
    result = image_ap_at_k(scores, labels, k=3)
    assert result.ap == pytest.approx([1 / 3, 5 / 6], abs=1e-15)
    assert result.mean == pytest.approx(7 / 12, abs=1e-15)


def test_normaliser_is_min_positives_k_not_positives_found():
    # 4 positives, K=2, one found in the top 2: AP@2 = (1/2) / min(4, 2) = 1/4.
    scores = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])
    labels = np.array([[0], [1], [1], [1], [1]])
    assert class_ap_at_k(scores, labels, k=2).ap[0] == pytest.approx(0.25)


def test_tie_block_straddling_rank_k_counts_the_whole_block():
    # Ranks 1..4 tie with 1 positive; K=2. Each top-2 rank holds it with p=1/4:
    # E = 1/4 * 1/1 + 1/4 * 1/2 = 3/8, normalised by min(1, 2) = 1.
    scores = np.array([[1.0], [1.0], [1.0], [1.0]])
    labels = np.array([[1], [0], [0], [0]])
    assert class_ap_at_k(scores, labels, k=2).ap[0] == pytest.approx(3 / 8, abs=1e-15)


def test_weights_exclude_zero_weight_and_report_it():
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    labels = np.array([[1, 0], [0, 1]])
    result = class_ap_at_k(scores, labels, k=2, weights=[0.0, 2.0])
    assert result.excluded_zero_weight.tolist() == [0]
    assert result.weighted_map == 1.0
    assert class_ap_at_k(scores, labels, k=2, weights="uniform").weights.tolist() == [1, 1]
    assert class_ap_at_k(scores, labels, k=2).weights.tolist() == [1, 1]  # positive counts


def test_no_class_with_positives_gives_nan_mean():
    result = class_ap_at_k(np.zeros((3, 2)), np.zeros((3, 2), dtype=int))
    assert np.isnan(result.weighted_map) and result.excluded_no_positives.tolist() == [0, 1]


# Small integer score ranges force many ties; labels include unknowns.
small_cases = st.integers(1, 7).flatmap(
    lambda n: st.integers(1, 3).flatmap(
        lambda c: st.tuples(
            arrays(np.float64, (n, c), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            arrays(np.int8, (n, c), elements=st.sampled_from([-1, 0, 1])),
            st.integers(1, 9),
        )
    )
)


@settings(max_examples=300, deadline=None)
@given(small_cases)
def test_classwise_equals_brute_force_over_tie_orderings(case):
    scores, labels, k = case
    got = class_ap_at_k(scores, labels, k=k).ap
    np.testing.assert_allclose(got, brute_force_class_ap(scores, labels, k), atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(small_cases)
def test_imagewise_equals_brute_force(case):
    scores, labels, k = case
    got = image_ap_at_k(scores, labels, k=k).ap
    np.testing.assert_allclose(got, brute_force_class_ap(scores.T, labels.T, k), atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(small_cases)
def test_full_ap_equals_brute_force(case):
    scores, labels, _ = case
    n = scores.shape[0]
    expected = [
        brute_force_ap(scores[:, c], labels[:, c], k=n, cap=n) for c in range(scores.shape[1])
    ]
    np.testing.assert_allclose(full_ap(scores, labels), expected, atol=1e-12)


def test_random_continuous_scores_without_ties_match_brute_force():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(8, 5)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(8, 5))
    for k in (1, 3, 8, 20):
        np.testing.assert_allclose(
            class_ap_at_k(scores, labels, k=k).ap,
            brute_force_class_ap(scores, labels, k),
            atol=1e-12,
        )


def test_full_ap_equals_sklearn_without_ties_or_unknowns():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(500, 40))
    labels = (rng.random((500, 40)) < np.linspace(0.01, 0.5, 40)).astype(int)
    labels[0] = 1  # every class has a positive
    expected = [average_precision_score(labels[:, c], scores[:, c]) for c in range(40)]
    np.testing.assert_allclose(full_ap(scores, labels), expected, atol=1e-12)


def test_ap_at_k_equals_full_ap_when_k_covers_the_list():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=(300, 30)).astype(np.float32)  # many ties
    labels = rng.integers(-1, 2, size=(300, 30))
    np.testing.assert_allclose(
        class_ap_at_k(scores, labels, k=300).ap, full_ap(scores, labels), atol=1e-12
    )


def test_input_row_order_does_not_change_the_result():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=(400, 20)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(400, 20))
    perm = rng.permutation(400)
    a = class_ap_at_k(scores, labels, k=50).ap
    b = class_ap_at_k(scores[perm], labels[perm], k=50).ap
    np.testing.assert_array_equal(a, b)


def test_accepts_torch_tensors_and_bool_labels():
    scores = torch.tensor([[0.9, 0.2], [0.3, 0.8]])
    labels = torch.tensor([[True, False], [False, True]])
    assert class_ap_at_k(scores, labels, k=1).ap.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "scores, labels, kwargs, message",
    [
        ([[0.1, float("nan")]], [[1, 0]], {}, r"NaN or infinite.*row 0, class column 1"),
        (
            [[0.1], [float("inf")]],
            [[1], [0]],
            {},
            r"1 NaN or infinite value\(s\); first at image row 1",
        ),
        (
            [[0.1, 0.2]],
            [[1, 0, 1]],
            {},
            r"labels shape \(1, 3\) does not match scores shape \(1, 2\)",
        ),
        ([0.1, 0.2], [1, 0], {}, r"must be 2-D"),
        (
            [[0.1, 0.2]],
            [[1, 2]],
            {},
            r"found 1 other value\(s\), first at image row 0, class column 1 \(2\)",
        ),
        ([[0.1, 0.2]], [[1.0, 0.5]], {}, r"class column 1 \(0.5\)"),
        ([[0.1, 0.2]], [[1, 0]], {"k": 0}, r"k must be an integer >= 1"),
        ([[0.1, 0.2]], [[1, 0]], {"weights": [1.0]}, r"one value per class \(2\)"),
        ([[0.1, 0.2]], [[1, 0]], {"weights": [1.0, -1.0]}, r"class 1 has -1.0"),
        ([[0.1, 0.2]], [[1, 0]], {"weights": [1.0, float("nan")]}, r"must be finite"),
        ([[0.1, 0.2]], [[1, 0]], {"weights": "counts"}, r"weights must be"),
    ],
)
def test_bad_input_raises_clear_error(scores, labels, kwargs, message):
    with pytest.raises(MetricInputError, match=message):
        class_ap_at_k(np.array(scores), np.array(labels), **kwargs)


@pytest.mark.parametrize("known_rate", [0.05, 0.4, 1.0])
def test_known_items_summarise_as_the_dense_matrix(known_rate):
    """A batch given as its known (image, class) items ranks as the dense matrix with the
    other pairs unknown: the same TopK per class (ties at rank K counted beyond it, lists
    shorter than K) and the same image-wise AP@K, for K below and above the class count."""
    rng = np.random.default_rng(int(known_rate * 100))
    for _ in range(30):
        n, c, k = int(rng.integers(1, 60)), int(rng.integers(1, 25)), int(rng.integers(1, 30))
        scores = np.round(rng.normal(size=(n, c)), 1).astype(np.float32)  # many ties
        labels = rng.choice([0, 1], p=[0.6, 0.4], size=(n, c)).astype(np.int8)
        labels[rng.random((n, c)) > known_rate] = -1
        items = KnownItems.of(scores, labels)
        assert len(items.values) == int((labels != -1).sum())
        assert torch.equal(items.dense_labels(), torch.from_numpy(labels))
        dense = top_k_columns(torch.from_numpy(scores), torch.from_numpy(labels), k)
        sparse = top_k_of_items(items.cols, items.values, items.labels, c, k)
        for field in ("values", "tie_count", "tie_positives", "positives", "known"):
            assert torch.equal(getattr(sparse, field), getattr(dense, field)), field
        assert np.array_equal(ap_from_top_k(sparse, k), ap_from_top_k(dense, k), equal_nan=True)
        want, got = image_ap_at_k(scores, labels, k), image_ap_of_items(items, k)
        assert np.array_equal(got.ap, want.ap, equal_nan=True)
        assert np.array_equal(got.positives, want.positives)
        assert np.array_equal(got.known, want.known)
    assert mostly_unknown(torch.tensor([[-1] * 7 + [0]])) and not mostly_unknown(
        torch.tensor([[-1] * 6 + [0, 1]])
    )
