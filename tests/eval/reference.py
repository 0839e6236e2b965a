"""Slow, obviously correct references: the expected AP over every ordering of tied scores."""

import itertools
from fractions import Fraction

import numpy as np


def ap_of_ordering(rels, k, cap):
    hits, total = 0, Fraction(0)
    for rank, rel in enumerate(rels[:k], start=1):
        if rel:
            hits += 1
            total += Fraction(hits, rank)
    return total / min(sum(rels), cap)


def brute_force_ap(scores, labels, k, cap=None):
    """Average AP@k of one ranked list over all orderings of its tied scores (exact fractions)."""
    cap = k if cap is None else cap
    items = [(s, lab) for s, lab in zip(scores, labels, strict=True) if lab != -1]
    if not any(lab == 1 for _, lab in items):
        return float("nan")
    blocks = []
    for _, group in itertools.groupby(sorted(items, key=lambda x: -x[0]), key=lambda x: x[0]):
        blocks.append([lab for _, lab in group])
    orderings = itertools.product(*(itertools.permutations(b) for b in blocks))
    values = [ap_of_ordering([x for block in o for x in block], k, cap) for o in orderings]
    return float(sum(values) / len(values))


def brute_force_class_ap(scores, labels, k):
    scores, labels = np.asarray(scores), np.asarray(labels)
    return np.array([brute_force_ap(scores[:, c], labels[:, c], k) for c in range(scores.shape[1])])
