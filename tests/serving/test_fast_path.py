"""The fast request path (exact numpy search, batched encode + search, re-ranking on
catalogue codes) answers exactly what the single-request path answered, and
RecommendBatch streams the same answers as Recommend from a real server."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.serving.conftest import API_KEY, Served, make_engine, open_reader


# -- the reference: the request path before the fast path, step by step --------------------
def _reference(engine: Any, q: Any, encoder: Any) -> list[tuple[str, float, float, tuple]]:
    """History -> one forward -> ``index.search`` -> string-keyed re-rank (no batching,
    no exact search, no precomputed codes): the single-request path being replaced."""
    from serving import rerank as rr
    from serving.history import History, merge, to_batch

    stored = engine.history.get(q.user) if q.user is not None else History.empty()
    hist = merge(stored, q.recent)
    segs = engine._user_segments(q.user)
    _, policy = engine._policy(segs)
    pop_segment = (segs.rfm or segs.behavioural) if segs else None
    exclude = set(q.exclude)
    if not q.include_purchased:
        exclude.update(int(i) for i in hist.purchased())
    vec = encoder.encode(to_batch([hist], engine.max_len))[0]
    n = max(q.k * engine.cfg.overfetch, engine.cfg.min_candidates) if not q.skip_rerank else q.k
    hits = engine.index.search(
        vec, n, q.filters, exclude_ids=sorted(exclude), hnsw_ef=128, with_payload=False
    )
    cat = engine.catalog
    ids = np.array([h.item_id for h in hits], np.int64)
    cands = rr.Candidates(
        item_ids=ids,
        relevance=np.array([h.score for h in hits], np.float32),
        categories=[cat.categories[i] for i in ids],
        price=cat.price[ids],
        popularity=engine.popularity.scores(pop_segment)[ids],
        external_ids=[cat.external_ids[i] for i in ids],
    )
    keys = frozenset(
        rr.category_key(cat.categories[int(i)], policy.category_depth) for i in hist.items
    )
    prices = cat.price[hist.items]
    if hist.price is not None:
        prices = np.where(np.isfinite(hist.price), hist.price, prices)
    prices = prices[np.isfinite(prices) & (prices > 0)]
    center = float(np.median(np.log1p(prices))) if len(prices) else None
    user = rr.UserContext(keys - {""}, center)
    ranked = rr.relevance_only(cands, q.k) if q.skip_rerank else rr.rerank(cands, user, policy, q.k)
    return [(cat.external_ids[r.item_id], r.score, r.relevance, r.reasons) for r in ranked]


def _requests(parts: Any, pb: Any) -> list[Any]:
    """Every user with a history, with a mix of filters, session events and options."""
    cat = parts.catalog
    users = parts.history.users()
    out = []
    for j, u in enumerate(users.tolist()):
        ext = parts.dataset.users.to_external(int(u))
        kw: dict[str, Any] = {"user_id": ext, "k": 5 + j % 11}
        if j % 4 == 1:
            kw["filters"] = pb.Filters(categories=[cat.categories[1 + j % 7]])
        if j % 4 == 2:
            kw["filters"] = pb.Filters(price_min=5.0, price_max=40.0, in_stock_only=True)
        if j % 5 == 3:
            kw["recent_events"] = [
                pb.Event(item_id=cat.external_ids[1 + j % 100], event_type="view")
            ]
        if j % 6 == 4:
            kw["exclude_item_ids"] = [cat.external_ids[i] for i in range(1, 40, 3)]
        if j % 9 == 5:
            kw["include_purchased"] = True
        if j % 13 == 7:
            kw["skip_rerank"] = True
        out.append(pb.RecommendRequest(**kw))
    return out


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return [x[0] for x in a] == [x[0] for x in b] and all(
        x[3] == y[3] and abs(x[1] - y[1]) < 1e-5 and abs(x[2] - y[2]) < 1e-5
        for x, y in zip(a, b, strict=True)
    )


def test_fast_path_matches_single_request_path(parts: Any, index_dir: Path, segments: Any) -> None:
    """300 users answered by 8 concurrent threads through the batched exact path equal the
    old single-request path (HNSW on this small index is exact)."""
    from serving import validation as val
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving.encoders import TowerEncoder
    from serving.requests import RequestContext

    reader = open_reader(index_dir)
    engine = make_engine(parts, reader, segments, batch_max=16, batch_wait_ms=2.0)
    try:
        assert engine.exact is not None and engine.exact.loads == 1  # loaded at start
        ref_enc = TowerEncoder(parts.model.model, parts.model.max_len)
        reqs = _requests(parts, pb)
        qs = [val.validate_recommend(r, engine.cfg, engine.users, engine.items) for r in reqs]
        got: dict[int, Any] = {}

        def client(n: int) -> None:
            for i in range(n, len(qs), 8):
                got[i] = engine.recommend(qs[i], RequestContext.with_timeout(30))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(got) == len(qs)
        assert engine._batcher is not None and engine._batcher.items > engine._batcher.batches
        before = engine._batcher.inline
        engine.recommend(qs[0], RequestContext.with_timeout(30))  # alone: runs in this thread
        assert engine._batcher.inline == before + 1
        bad = []
        for i, q in enumerate(qs):
            fast = [(x.item_id, x.score, x.relevance, x.reasons) for x in got[i].items]
            if not _same(fast, _reference(engine, q, ref_enc)):
                bad.append(i)
        assert not bad, f"{len(bad)} of {len(qs)} answers differ, e.g. request {bad[:5]}"
        assert {r.index_version for r in got.values()} == {reader.version}
    finally:
        reader.close()


@pytest.mark.slow
def test_event_loop_and_worker_paths_answer_alike_over_grpc(
    parts: Any, index_dir: Path, segments: Any
) -> None:
    """The grpc.aio server's two Recommend paths (``recommend_path``: on the event loop,
    or on worker threads with batching) give every one of 300 concurrent requests, over
    a real gRPC server, exactly the old single-request path's answer."""
    from concurrent.futures import ThreadPoolExecutor

    from serving import validation as val
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving.encoders import TowerEncoder

    reader = open_reader(index_dir)
    reqs = _requests(parts, pb)
    answers: dict[str, list[list[tuple]]] = {}
    servers = []
    try:
        for path in ("loop", "threads"):
            engine = make_engine(
                parts, reader, segments, recommend_path=path, batch_max=16, batch_wait_ms=2.0
            )
            s = Served(engine)
            servers.append(s)
            assert engine.cfg.recommend_on_loop == (path == "loop")
            with ThreadPoolExecutor(8) as pool:  # 8 calls in flight
                got = list(pool.map(lambda r, s=s: s.call("Recommend", r, 30), reqs))
            answers[path] = [
                [(x.item_id, x.score, x.relevance, tuple(x.reasons)) for x in r.items] for r in got
            ]
            b = engine._batcher
            assert b is not None
            if path == "loop":  # one request after another on the loop: never handed over
                assert b.inline == len(reqs) and b.batches == 0
            else:  # concurrent requests shared forwards on the worker threads
                assert b.items > b.batches > 0
        engine = servers[0].engine
        ref_enc = TowerEncoder(parts.model.model, parts.model.max_len)
        bad = []
        for i, r in enumerate(reqs):
            q = val.validate_recommend(r, engine.cfg, engine.users, engine.items)
            ref = _reference(engine, q, ref_enc)
            if not (_same(answers["loop"][i], ref) and _same(answers["threads"][i], ref)):
                bad.append(i)
        assert not bad, f"{len(bad)} of {len(reqs)} answers differ, e.g. request {bad[:5]}"
    finally:
        for s in servers:
            s.close()
        reader.close()


def test_exact_search_equals_index_search_with_filters(parts: Any, index_dir: Path) -> None:
    from indexing.base import SearchFilter
    from indexing.exact import ExactSearch

    reader = open_reader(index_dir)
    try:
        ex = ExactSearch(parts.catalog, max_items=10_000)
        m = ex.matrix(reader, reader.version, block=True)
        assert m is not None and len(m.ids) == parts.catalog.n_items
        rng = np.random.default_rng(0)
        q = rng.standard_normal((6, m.vectors.shape[1])).astype(np.float32)  # (6, D)
        cat = parts.catalog.categories[5]
        flts = [
            SearchFilter(),
            SearchFilter(categories=(cat,)),
            SearchFilter(price_min=10.0, price_max=30.0),
            SearchFilter(in_stock=True),
            SearchFilter(categories=(cat,), price_max=50.0),
            SearchFilter(),
        ]
        excl = [np.zeros(0, np.int64)] * 5 + [np.arange(1, 60, 2)]
        found = ex.search(m, q, [20] * 6, flts, excl)
        for i in range(6):
            hits = reader.search(
                q[i], 20, flts[i], exclude_ids=excl[i].tolist(), with_payload=False
            )
            ids, scores = found[i]
            assert ids.tolist() == [h.item_id for h in hits], i
            np.testing.assert_allclose(scores, [h.score for h in hits], atol=1e-5)
        assert not set(found[5][0].tolist()) & set(range(1, 60, 2))
    finally:
        reader.close()


def test_exact_search_refuses_damaged_vectors(parts: Any, index_dir: Path) -> None:
    """Non-finite stored vectors are never served from memory (the index path degrades)."""
    from indexing.exact import ExactSearch

    reader = open_reader(index_dir)
    real = reader.get_vectors

    def damaged(ids: Any) -> Any:
        v = np.array(real(ids))
        v[3, 0] = np.nan
        return v

    try:
        reader.get_vectors = damaged  # type: ignore[method-assign]
        ex = ExactSearch(parts.catalog, max_items=10_000)
        assert ex.matrix(reader, reader.version, block=True) is None
        assert ex.matrix(reader, reader.version) is None  # not retried per request
    finally:
        reader.close()


def _mmr_reference(c: Any, user: Any, policy: Any, k: int) -> list[tuple]:
    """The numpy MMR loop the fast re-rank replaced (one argmax over all candidates per pick)."""
    from serving import rerank as rr

    n = len(c.item_ids)
    rel = np.asarray(c.relevance, np.float64)
    pop = np.asarray(c.popularity, np.float64)
    fit = rr.price_fit(c.price, user.price_center)
    keys = [rr.category_key(cat, policy.category_depth) for cat in c.categories]
    novel = np.array([bool(x) and x not in user.seen_categories for x in keys], np.float64)
    boost = rr.boost_vector(c.categories, c.external_ids, policy.boosts)
    base = (
        policy.relevance * rel
        + policy.popularity * pop
        + policy.price_affinity * fit
        + policy.novelty * novel
        + boost
    )
    span = float(base.max() - base.min())
    norm = (base - base.min()) / span if span > 0 else np.ones(n)
    lam = policy.diversity
    code_of: dict[str, int] = {}
    codes = np.array([code_of.setdefault(x, len(code_of)) if x else -1 for x in keys], np.int64)
    picked = np.zeros(len(code_of) + 1, bool)
    left = np.ones(n, bool)
    out = []
    for _ in range(min(k, n)):
        mmr = np.where(left, (1 - lam) * norm - lam * picked[codes].astype(np.float64), -np.inf)
        j = int(np.argmax(mmr))
        best = int(np.argmax(np.where(left, base, -np.inf)))
        out.append(
            (int(c.item_ids[j]), float(base[j]), lam > 0 and j != best and base[j] < base[best])
        )
        if codes[j] >= 0:
            picked[codes[j]] = True
        left[j] = False
    return out


@pytest.mark.parametrize("seed", range(4))
def test_rerank_fast_paths_equal_reference(seed: int) -> None:
    """Greedy MMR by ordered scan + catalogue codes picks exactly what the argmax loop picked,
    ties included."""
    from serving import rerank as rr

    rng = np.random.default_rng(seed)
    cats = ["A > x > 1", "A > x > 2", "B > y", "B > y > 3 | C", None, "C > z", "D"]
    for t in range(300):
        n, k = int(rng.integers(1, 80)), int(rng.integers(1, 30))
        ids = rng.permutation(1000)[:n] + 1
        rel = rng.random(n).astype(np.float32)
        if t % 3 == 0:
            rel = np.round(rel, 1).astype(np.float32)
        cs = [cats[i] for i in rng.integers(0, len(cats), n)]
        price = rng.random(n) * 50
        price[rng.random(n) < 0.2] = np.nan
        pop = np.round(rng.random(n), 1).astype(np.float32)
        ext = [f"I{i}" for i in ids]
        policy = rr.RerankPolicy(
            popularity=float(rng.choice([0, 0.3])),
            price_affinity=float(rng.choice([0, 0.2])),
            novelty=float(rng.choice([0, 0.1])),
            diversity=float(rng.choice([0, 0.1, 0.3, 0.6])),
            category_depth=int(rng.integers(1, 4)),
            boosts=(rr.Boost(category="C", weight=0.05), rr.Boost(item_ids=(ext[0],), weight=0.1)),
        )
        seen = frozenset({"A > x", "B > y", "A"})
        user = rr.UserContext(seen, 2.0)
        want = _mmr_reference(rr.Candidates(ids, rel, cs, price, pop, ext), user, policy, k)
        plain = rr.rerank(rr.Candidates(ids, rel, cs, price, pop, ext), user, policy, k)
        code_of: dict[str, int] = {}
        keys = [rr.category_key(c, policy.category_depth) for c in cs]
        codes = np.array([code_of.setdefault(x, len(code_of)) if x else -1 for x in keys])
        fast_c = rr.Candidates(
            ids,
            rel,
            (),
            price,
            pop,
            category_codes=codes,
            boost=rr.boost_vector(cs, ext, policy.boosts),
        )
        fast_u = rr.UserContext(
            frozenset(), 2.0, frozenset(code_of[s] for s in seen if s in code_of)
        )
        fast = rr.rerank(fast_c, fast_u, policy, k)
        for got in (plain, fast):
            assert [(r.item_id, r.score, rr.DIVERSITY in r.reasons) for r in got] == want
        assert [r.reasons for r in plain] == [r.reasons for r in fast]


def test_batcher_routes_results_and_errors() -> None:
    from serving.batching import Batcher

    seen: list[int] = []

    def fn(xs: Any) -> list[Any]:
        seen.append(len(xs))
        return [ValueError(f"bad {x}") if x % 7 == 0 else x * 10 for x in xs]

    b: Batcher[int, int] = Batcher(fn, max_batch=8, max_wait_s=0.02, coming=lambda: 1)
    try:
        futs = [b.submit(i) for i in range(1, 40)]
        for i, f in zip(range(1, 40), futs):
            if i % 7 == 0:
                with pytest.raises(ValueError, match=f"bad {i}"):
                    f.result(5)
            else:
                assert f.result(5) == i * 10
        assert max(seen) > 1 and max(seen) <= 8 and sum(seen) == 39
    finally:
        b.close()


# -- RecommendBatch over a real server --------------------------------------------------------
@pytest.fixture(scope="module")
def batch_served(parts: Any, index_dir: Path, segments: Any) -> Any:
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader, segments, max_batch_requests=50))
    yield s
    s.close()
    reader.close()


def test_recommend_batch_streams_recommend_answers(batch_served: Served, parts: Any) -> None:
    s = batch_served
    reqs = _requests(parts, s.pb)[:40]
    reqs[3] = s.pb.RecommendRequest(user_id="C00001", k=0, filters=s.pb.Filters(price_min=-1))
    reqs[7] = s.pb.RecommendRequest(user_id="nobody-knows-me", k=4)  # cold start
    reqs[9] = s.pb.RecommendRequest(
        user_id="C00001", recent_events=[s.pb.Event(item_id="NO-SUCH-SKU")]
    )
    items = list(
        s.stub.RecommendBatch(s.pb.RecommendBatchRequest(requests=reqs), metadata=s.md, timeout=30)
    )
    assert [it.index for it in items] == list(range(len(reqs)))
    assert items[3].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert items[3].error_message.startswith("filters.price_min")
    assert items[9].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    for i, r in enumerate(reqs):
        if i in (3, 9):
            assert not items[i].HasField("response")
            continue
        one = s.call("Recommend", r)
        got = items[i].response
        assert items[i].error_code == 0
        assert [x.item_id for x in got.items] == [x.item_id for x in one.items], i
        assert [list(x.reasons) for x in got.items] == [list(x.reasons) for x in one.items], i
        np.testing.assert_allclose(
            [x.score for x in got.items], [x.score for x in one.items], atol=1e-5
        )
        assert (got.segment, got.index_version) == (one.segment, one.index_version)
    assert items[7].response.segment and len(items[7].response.items) == 4


def test_recommend_batch_limits_and_auth(batch_served: Served) -> None:
    s = batch_served
    one = s.pb.RecommendRequest(user_id="C00001", k=3)
    with pytest.raises(grpc.RpcError) as e:
        list(s.stub.RecommendBatch(s.pb.RecommendBatchRequest(requests=[one] * 51), metadata=s.md))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(s.stub.RecommendBatch(s.pb.RecommendBatchRequest(), metadata=s.md))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        list(
            s.stub.RecommendBatch(
                s.pb.RecommendBatchRequest(requests=[one]), metadata=(("x-api-key", "wrong"),)
            )
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert API_KEY  # the fixture's server requires it
