"""``exact_search`` (the numpy ground truth of every recall check) and ``top_rows`` (the
exact back end's partial selection) equal a full sort.

``exact_search`` works 64 queries at a time with a partition (a 1M-point verification used to sort a
(500, 1M) matrix: 11.8 GB); ties at the k-th score must still break by lower id.
"""

from __future__ import annotations

import numpy as np

from indexing.exact import top_rows
from indexing.store import exact_search


def _full_sort(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ x.T  # (Q, N)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]
    s = np.take_along_axis(scores, order, axis=1)
    return np.where(np.isfinite(s), ids[order], -1), s


def test_partitioned_exact_search_equals_full_sort_with_ties_and_masks() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 300))
        v = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)  # few directions: many ties
        v[np.all(v == 0, axis=1)] = 1
        ids = rng.permutation(np.arange(1, n + 1) * 3)
        q = rng.normal(size=(int(rng.integers(1, 150)), 4)).astype(np.float32)
        k = int(rng.integers(1, 20))
        mask = None
        if trial % 3 == 1:
            mask = rng.random(n) < 0.3  # (N,)
        elif trial % 3 == 2:
            mask = rng.random((len(q), n)) < 0.1  # (Q, N): rows with fewer than k allowed
        got_i, got_s = exact_search(v, ids, q, k, mask=mask)
        want_i, want_s = _full_sort(v, ids, q, k, mask)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, atol=1e-6)


def test_top_rows_is_exact() -> None:
    rng = np.random.default_rng(1)
    for t in range(300):
        n, k = int(rng.integers(1, 30_000)), int(rng.integers(1, 200))
        s = rng.standard_normal(n).astype(np.float32)
        if t % 3 == 0:
            s = np.round(s, 1)  # many ties
        if t % 4 == 0:
            s[rng.random(n) < 0.95] = -np.inf  # a selective filter
        got = top_rows(s, k)
        want = np.sort(s)[::-1][: min(k, n)]
        assert len(got) == min(k, n)
        np.testing.assert_array_equal(np.sort(s[got])[::-1], want)
