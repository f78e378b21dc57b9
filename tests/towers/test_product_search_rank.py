"""ProductSearch.rank (the hybrid over candidates) against ProductSearch.hybrid (every item).

A synthetic catalogue of 400 items with random text vectors and titles drawn from a small
vocabulary (so many items share query words): whenever ``rank`` says its top is exact,
it must equal the full hybrid's top within the mask, score for score."""

from __future__ import annotations

import numpy as np
import pytest

from towers.product_search import ProductSearch, SearchConfig, SemanticCandidates

WORDS = [
    "red",
    "blue",
    "soft",
    "hair",
    "brush",
    "nail",
    "polish",
    "cream",
    "face",
    "wash",
    "lip",
    "gloss",
    "oil",
    "dry",
    "skin",
]


@pytest.fixture(scope="module")
def ps() -> ProductSearch:
    rng = np.random.default_rng(0)
    n = 400
    texts = [""] + [" ".join(rng.choice(WORDS, size=3)) for _ in range(n)]
    v = rng.normal(size=(n + 1, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[0] = 0
    return ProductSearch(
        texts,
        v,
        [None] * (n + 1),
        [None] * (n + 1),
        lambda t: np.zeros((len(t), 384), np.float32),
        SearchConfig(candidates=20),
    )


def test_rank_equals_the_full_hybrid_when_exact(ps: ProductSearch) -> None:
    rng = np.random.default_rng(1)
    n_exact = 0
    for trial in range(60):
        q = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        qv = rng.normal(size=384).astype(np.float32)
        qv = 0.5 * qv / np.linalg.norm(qv) + 0.5 * ps.vectors[int(rng.integers(1, 401))]
        qv /= np.linalg.norm(qv)
        mask = np.ones(ps.n_items + 1, bool)
        mask[0] = False
        if trial % 3 == 1:
            mask[rng.choice(ps.n_items + 1, 200, replace=False)] = False
        full, _, _ = ps.hybrid(q, semantic=ps.semantic(qv))
        s = np.where(mask, full, -np.inf)
        n_top = 10 if trial % 2 else 20
        ref = np.lexsort((np.arange(len(s)), -s))[:n_top]
        row = ps.vectors @ qv
        row[0] = -np.inf
        cands = SemanticCandidates.from_row(row, 40)
        r = ps.rank(q, cands, lambda ids, qv=qv: ps.vectors[ids] @ qv, mask, n_top)
        if r.exact:
            n_exact += 1
            assert r.ids[:n_top].tolist() == ref.tolist()
            np.testing.assert_allclose(r.hybrid[:n_top], s[ref], atol=1e-9)
        everything = SemanticCandidates(np.arange(1, len(row)), row[1:], -np.inf)
        r2 = ps.rank(q, everything, lambda ids, qv=qv: ps.vectors[ids] @ qv, mask, n_top)
        assert r2.exact and r2.ids[:n_top].tolist() == ref.tolist()
    assert n_exact >= 30  # the candidates usually suffice (else the caller's full pass)


def test_rank_says_inexact_when_candidates_cannot_prove_the_top(ps: ProductSearch) -> None:
    q = "zzz unknownword"  # no lexical match: the answer is the semantic order alone
    qv = ps.vectors[5]
    row = ps.vectors @ qv
    row[0] = -np.inf
    mask = np.ones(ps.n_items + 1, bool)
    mask[0] = False
    few = SemanticCandidates.from_row(row, 3)
    r = ps.rank(q, few, lambda ids: ps.vectors[ids] @ qv, mask, 5)
    assert not r.exact  # 3 candidates cannot prove a top 5
    r = ps.rank(q, few, lambda ids: ps.vectors[ids] @ qv, mask, 2)
    assert r.exact and r.ids[0] == 5
