"""Search on embedding prefixes: full length is plain search, a funnel over everything is exact full search,
prefixes are compared by their cosine, and a bad length is one line naming the valid ones."""

from __future__ import annotations

import numpy as np
import pytest

from matvit.errors import UserError
from matvit.metrics import search
from retrieval import prefix


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def exact(gallery, queries, dims, k):
    return prefix.PrefixSearch(gallery).search(queries, k, prefix.Plan(dims))


def funnel(gallery, queries, dims, k, shortlist):
    return prefix.PrefixSearch(gallery).search(queries, k, prefix.Plan(dims, shortlist))


@pytest.mark.parametrize("how", [
    lambda g, q: exact(g, q, 32, 5),  # the full length
    lambda g, q: funnel(g, q, 8, 5, shortlist=200),  # a shortlist of the whole gallery
], ids=["full-length", "funnel-over-everything"])
def test_the_full_length_and_a_funnel_over_everything_are_plain_search(how):
    gallery, queries = unit(200, 32, 0), unit(20, 32, 1)
    scores, ids = how(gallery, queries)
    want_scores, want_ids = search(gallery, queries, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_a_prefix_is_compared_by_its_cosine():
    gallery, queries = unit(100, 16, 2), unit(10, 16, 3)
    scores, ids = exact(gallery, queries, 4, 3)
    g, q = gallery[:, :4], queries[:, :4]
    cosine = (q @ g.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(g, axis=1)[None]
    np.testing.assert_array_equal(ids, np.argsort(-cosine, axis=1)[:, :3])
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, ids, axis=1), atol=1e-5)
    assert np.all(np.isfinite(prefix.prefix(np.zeros((2, 8), np.float32), 4)))  # a zero prefix stays zero


def test_a_short_funnel_keeps_only_its_shortlist_in_full_order():
    gallery, queries = unit(300, 24, 6), unit(12, 24, 7)
    _, shortlist = exact(gallery, queries, 8, 20)
    scores, ids = funnel(gallery, queries, 8, 5, shortlist=20)
    assert all(set(row) <= set(s) for row, s in zip(ids, shortlist, strict=True))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first, by the full vectors
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, gallery[ids]), atol=1e-5)


@pytest.mark.parametrize("dims, allowed, message", [
    (0, None, "dims 0 is not available: use 1 to 32"),
    (64, None, "dims 64 is not available: use 1 to 32"),
    (24, [8, 16, 32], "dims 24 is not available: use 8, 16, 32"),
])
def test_a_length_the_vectors_lack_is_refused_in_one_line(dims, allowed, message):
    with pytest.raises(UserError, match=message):
        prefix.Plan.of(32, dims=dims, allowed=allowed)
    with pytest.raises(UserError, match=message):
        prefix.Plan.of(32, funnel=dims, allowed=allowed)


def test_a_plan_is_full_search_by_default_and_takes_one_knob():
    assert prefix.Plan.of(32) == prefix.Plan(32)
    assert prefix.Plan.of(32, funnel=8, k=5) == prefix.Plan(8, prefix.SHORTLIST)
    assert prefix.Plan.of(32, funnel=8, k=50).shortlist == 500
    with pytest.raises(UserError, match="shortlist \\(4\\) must hold at least k \\(5\\)"):
        prefix.Plan.of(32, funnel=8, k=5, shortlist=4)
    with pytest.raises(UserError, match="either dims .* or funnel"):
        prefix.Plan.of(32, dims=8, funnel=8)


def test_ids_name_the_rows():
    gallery, queries = unit(50, 16, 10), unit(4, 16, 11)
    ids = np.arange(1000, 1050)[::-1].copy()
    _, positions = exact(gallery, queries, 8, 3)
    _, named = prefix.PrefixSearch(gallery, ids).search(queries, 3, prefix.Plan(8))
    np.testing.assert_array_equal(named, ids[positions])
