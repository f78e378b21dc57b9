"""SearchProducts' per-request savings answer exactly as before (issue 28, p99 at
concurrency 8): the user-vector cache (``search_user_cache``, keyed by the stored
history's content) and :meth:`ProductSearch.explain_many` (query tokenised once, item
words kept) against the code they replaced, over a few hundred planted-shop queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import make_engine, open_reader
from tests.serving.test_discovery import Planted, make_planted

pytestmark = pytest.mark.slow  # two engines with their text vectors and query encoder


@pytest.fixture(scope="module")
def planted(parts: Any, serve_shop: Any) -> Planted:
    return make_planted(parts, serve_shop)


@pytest.fixture(scope="module")
def engines(planted: Planted, run_dir: Path, index_dir: Path) -> Iterator[dict[str, Any]]:
    from serving.assemble import load_parts
    from serving.discovery import warm

    reader = open_reader(index_dir)
    cached = make_engine(load_parts(run_dir, planted.ds), reader)
    fresh = make_engine(load_parts(run_dir, planted.ds), reader, search_user_cache=0)
    warm(cached)
    warm(fresh)
    yield {"cached": cached, "fresh": fresh}
    reader.close()


def _queries(planted: Planted, n: int) -> list[tuple[str, int | None]]:
    """Serve_load's mix: 1-3 words of a title (brand first for every third), every
    second query with a customer."""
    items = planted.ds.items
    titles = items["title"].to_list()
    brands = items["brand"].to_list()
    rng = np.random.default_rng(5)
    n_users = len(planted.ds.users)
    out: list[tuple[str, int | None]] = []
    rows = [i for i, t in enumerate(titles) if t and len(t.split()) >= 2]
    for j in range(n):
        r = rows[int(rng.integers(len(rows)))]
        words = titles[r].split()
        size = min(len(words), int(rng.integers(1, 4)))
        q = " ".join(words[i] for i in sorted(rng.choice(len(words), size, replace=False)))
        if j % 3 == 0 and brands[r]:
            q = f"{brands[r]} {q}"
        out.append((q, int(rng.integers(1, n_users + 1)) if j % 2 else None))
    return out


def _answer(engine: Any, text: str, user: int | None) -> Any:
    from indexing.base import SearchFilter
    from serving.requests import RequestContext
    from serving.search import SearchQuery, search_products

    q = SearchQuery("t", text, user, 10, SearchFilter(), ())
    r = search_products(engine, q, RequestContext.with_timeout(30.0))
    return [(i.item_id, i.score, i.relevance, i.reasons) for i in r.items], r.degraded


def _explain_before(ps: Any, query: str, item: int) -> Any:
    """ProductSearch.explain as it was (everything tokenised per call)."""
    from towers.product_search import Match, tokenize

    q = ps.query_tokens(query)
    have = ps._token_sets[item]
    words = tuple(dict.fromkeys(t for t in q if t in have))
    qs = set(q)
    brand = ps.brands[item]
    bt = set(tokenize(brand, ps._stop)) if brand else set()
    cat = ""
    c = ps.categories[item]
    if c:
        for level in str(c).split(" | ")[0].split(">"):
            lt = set(tokenize(level, ps._stop))
            if lt and lt <= qs:
                cat = level.strip()
    return Match(words, bool(bt) and bt <= qs, cat)


def test_explain_many_equals_the_per_item_explain(
    engines: dict[str, Any], planted: Planted
) -> None:
    from serving.discovery import resolve

    ps = resolve(engines["cached"].product_search)
    rng = np.random.default_rng(1)
    queries = [q for q, _ in _queries(planted, 60)] + ["Rexco Toys Lunchboxes", "garden hose"]
    named = 0
    for q in queries:
        items = [planted.ia, planted.ib, *rng.integers(1, ps.n_items + 1, 8).tolist()]
        got = ps.explain_many(q, items)
        assert got == [_explain_before(ps, q, j) for j in items]
        assert got == [ps.explain(q, j) for j in items]  # warm item words: same again
        named += sum(bool(m.words or m.brand or m.category) for m in got)
    assert named > 20  # the queries name words / brands / categories of these items
    lunchbox = planted.ds.item_ids.to_internal(planted.d)
    m = ps.explain("Rexco Toys Lunchboxes", lunchbox)
    assert m.brand and m.category == "Lunchboxes"


def test_cached_user_vectors_answer_like_a_fresh_forward(
    engines: dict[str, Any], planted: Planted
) -> None:
    from serving.search import _user_caches

    queries = _queries(planted, 300)
    want = [_answer(engines["fresh"], q, u) for q, u in queries]
    first = [_answer(engines["cached"], q, u) for q, u in queries]
    again = [_answer(engines["cached"], q, u) for q, u in queries]  # cache hits
    assert first == want
    assert again == want
    cache = _user_caches[engines["cached"]]
    personal = sum(u is not None and len(engines["cached"].history.get(u)) > 0 for _, u in queries)
    assert personal > 100 and cache.hits >= personal  # the second pass: every customer hit
    assert engines["fresh"] not in _user_caches  # search_user_cache = 0: no cache at all
    assert not any(d for _, d in want)


def test_a_new_event_is_a_new_key_and_a_new_vector(engines: dict[str, Any]) -> None:
    from serving.history import merge, to_batch
    from serving.requests import RequestContext
    from serving.search import UserVectorCache, _user_vector
    from serving.validation import RecentEvent

    engine = engines["cached"]
    user = 7
    hist = engine.history.get(user)
    more = merge(hist, [RecentEvent(item_id=3, event_type=0, ts=int(hist.ts[-1]) + 60)])
    assert len(more) == len(hist) + 1
    assert UserVectorCache.key(hist) != UserVectorCache.key(more)
    ctx = RequestContext.with_timeout(30.0)
    degraded: list[str] = []
    v1 = _user_vector(engine, hist, ctx, degraded)
    v2 = _user_vector(engine, more, ctx, degraded)
    np.testing.assert_array_equal(v1, _user_vector(engine, hist, ctx, degraded))  # cached
    want = engine.encoder.encode(to_batch([more], engine.max_len))
    np.testing.assert_array_equal(v2, np.asarray(want, np.float32))
    assert not np.array_equal(v1, v2) and not degraded
    with pytest.raises(ValueError):
        v1[0, 0] = 1.0  # shared between requests: read-only
