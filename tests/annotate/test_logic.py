"""Transitivity check and point proposals, against independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from westar.annotate.consistency import conflicting_pairs
from westar.annotate.sampling import image_rng, propose_samples

RELS = ("farther", "closer", "equal")


def satisfiable(pairs, points) -> bool:
    """Brute force: is there a depth per point (ties allowed) meeting every answer?"""
    for depths in itertools.product(range(len(points)), repeat=len(points)):
        d = dict(zip(points, depths))
        ok = True
        for p in pairs:
            a, b = d[tuple(p["a"])], d[tuple(p["b"])]
            want = {"farther": a > b, "closer": a < b, "equal": a == b}[p["relation"]]
            if not want:
                ok = False
                break
        if ok:
            return True
    return False


def test_conflicts_match_brute_force_on_random_answers():
    rng = np.random.default_rng(0)
    points = [(0, 0), (5, 1), (2, 7), (9, 9)]
    seen = {True: 0, False: 0}
    for _ in range(400):
        n = int(rng.integers(0, 7))
        pairs = []
        for _ in range(n):
            i, j = rng.choice(len(points), 2, replace=False)
            pairs.append(
                {"a": list(points[i]), "b": list(points[j]), "relation": RELS[rng.integers(3)]}
            )
        bad = conflicting_pairs(pairs)
        ok = satisfiable(pairs, points)
        seen[ok] += 1
        assert (not bad) == ok, pairs
        if bad:  # dropping the marked answers leaves a consistent set
            rest = [p for i, p in enumerate(pairs) if i not in bad]
            assert not conflicting_pairs(rest) and satisfiable(rest, points)
    assert seen[True] > 50 and seen[False] > 50  # both cases exercised


def test_conflict_cases_by_hand():
    P, A, Q = [1, 1], [2, 2], [3, 3]
    pa_far = {"a": P, "b": A, "relation": "farther"}
    qa_close = {"a": Q, "b": A, "relation": "closer"}
    assert conflicting_pairs([]) == set()
    assert conflicting_pairs([pa_far, qa_close, {"a": P, "b": Q, "relation": "farther"}]) == set()
    assert conflicting_pairs([pa_far, qa_close, {"a": P, "b": Q, "relation": "closer"}]) == {
        0,
        1,
        2,
    }
    assert conflicting_pairs([pa_far, {"a": A, "b": P, "relation": "farther"}]) == {0, 1}
    eq = [{"a": P, "b": A, "relation": "equal"}, {"a": Q, "b": A, "relation": "equal"}]
    assert conflicting_pairs(eq + [{"a": P, "b": Q, "relation": "equal"}]) == set()
    assert conflicting_pairs(eq + [{"a": P, "b": Q, "relation": "closer"}]) == {0, 1, 2}
    # the same pair asked twice with opposite answers
    assert conflicting_pairs([pa_far, {"a": P, "b": A, "relation": "closer"}]) == {0, 1}


@pytest.mark.parametrize("size", [(640, 480), (33, 17), (1, 1), (2, 1), (1, 3), (5, 300)])
def test_proposals_are_in_the_image_and_deterministic(size):
    w, h = size
    a = propose_samples(w, h, 5, image_rng(0, "x"))
    b = propose_samples(w, h, 5, image_rng(0, "x"))
    c = propose_samples(w, h, 5, image_rng(1, "x"))
    assert a == b and len(a) == 5
    if w * h > 100:
        assert a != c
    for s in a:
        for name in ("anchor", "p", "q"):
            x, y = s[name]
            assert isinstance(x, int) and 0 <= x < w and 0 <= y < h
        if w * h >= 3:  # no pair compares a point with itself
            assert s["p"] != s["anchor"] and s["q"] != s["anchor"] and s["p"] != s["q"]
    assert propose_samples(w, h, 0, image_rng(0, "x")) == []


def test_default_proposals_spread_over_the_image():
    """All 15 points far apart (farther than random points would be) and every quarter
    of the image gets some."""
    w, h = 640, 480
    ref_min = []
    for seed in range(20):
        pts = np.array(
            [
                s[n]
                for s in propose_samples(w, h, 5, image_rng(seed, "img"))
                for n in ("anchor", "p", "q")
            ]
        )
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(15) * 1e9
        rnd = np.random.default_rng(seed).uniform([0, 0], [w, h], (15, 2))
        dr = np.linalg.norm(rnd[:, None] - rnd[None], axis=-1) + np.eye(15) * 1e9
        ref_min.append(dr.min())
        assert d.min() > 0.12 * np.hypot(w, h)
        quarters = {(x >= w / 2, y >= h / 2) for x, y in pts}
        assert len(quarters) == 4
    assert d.min() > 2 * np.median(ref_min)


def test_score_guides_the_points():
    """With a score map high only in the right third, most points go there."""
    w, h = 300, 200
    score = np.zeros((h, w))
    score[:, 200:] = 1.0
    score[0, 0] = np.nan  # ignored
    pts = [
        s[n]
        for s in propose_samples(w, h, 5, image_rng(0, "g"), score)
        for n in ("anchor", "p", "q")
    ]
    right = sum(x >= 200 for x, _ in pts)
    assert right >= 10, pts
    plain = [
        s[n] for s in propose_samples(w, h, 5, image_rng(0, "g")) for n in ("anchor", "p", "q")
    ]
    assert sum(x >= 200 for x, _ in plain) < right
    with pytest.raises(ValueError, match="score map"):
        propose_samples(w, h, 5, image_rng(0, "g"), score[:, :10])
