"""CompleteBasket and SearchProducts through a real gRPC server on localhost.

The planted shop: the serving fixtures' synthetic shop with renamed items and planted
invoices, so the right answers are known:

* ``A`` ("Garden Hose") is bought with ``B`` ("Brass Hose Reel") in 40 invoices, and
  ``A`` and ``B`` are the pair of items FARTHEST apart in the trained tower's space (so
  SimilarItems cannot find ``B``); ``C`` ("Red Garden Hose", a colour variant of ``A``) is
  bought with ``A`` even more often and must never be suggested for ``A``.
* ``D`` ("Dinosaur Lunchbox", brand Rexco, category "Toys > Lunchboxes") is the one
  product matching the query "dinosaur lunchbox".
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import polars as pl
import pytest

from tests.serving.conftest import API_KEY, Served, make_engine, open_reader


@dataclasses.dataclass
class Planted:
    ds: Any
    a: str
    b: str
    c: str
    d: str
    ia: int
    ib: int


@pytest.fixture(scope="module")
def planted(parts: Any, serve_shop: Any) -> Planted:
    return make_planted(parts, serve_shop)


def make_planted(parts: Any, serve_shop: Any) -> Planted:
    """The planted shop (module docstring) over the serving fixtures' shop and model."""
    vecs = parts.model.item_vectors()[1:]  # (N, D) tower vectors
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, np.inf)
    ia, ib = (int(x) + 1 for x in np.unravel_index(np.argmin(sims), sims.shape))
    n = len(serve_shop.item_ids)
    ic = next(i for i in range(1, n + 1) if i not in (ia, ib))
    id_ = next(i for i in range(1, n + 1) if i not in (ia, ib, ic))
    titles = {
        ia: "Garden Hose",
        ib: "Brass Hose Reel",
        ic: "Red Garden Hose",
        id_: "Dinosaur Lunchbox",
    }
    items = serve_shop.items.with_columns(
        pl.struct("item_id", "title")
        .map_elements(lambda r: titles.get(r["item_id"], r["title"]), return_dtype=pl.Utf8)
        .alias("title"),
        pl.when(pl.col("item_id") == id_)
        .then(pl.lit("Rexco"))
        .otherwise(pl.col("brand"))
        .alias("brand"),
        pl.when(pl.col("item_id") == id_)
        .then(pl.lit("Toys > Lunchboxes"))
        .otherwise(pl.col("category"))
        .alias("category"),
    )
    ev = serve_shop.events
    t0 = int(ev["ts"].max()) + 1000
    rows = []
    for k in range(100):  # 40 invoices {A, B}, 60 invoices {A, C}
        u = 1 + k % 250
        for it in (ia, ib if k < 40 else ic):
            rows.append((u, it, t0 + k * 100))
    extra = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [r[2] for r in rows],
        },
        schema={"user_id": pl.Int32, "item_id": pl.Int32, "ts": pl.Int64},
    ).with_columns(
        pl.lit("purchase").alias("event_type"),
        pl.lit(1, pl.Int32).alias("quantity"),
        pl.lit(None, pl.Float64).alias("price"),
        (pl.int_range(pl.len()) + ev.height).cast(pl.Int64).alias("order"),
    )
    events = pl.concat([ev, extra.select(ev.columns)], how="vertical_relaxed")
    ds = dataclasses.replace(serve_shop, events=events, items=items)
    ext = serve_shop.item_ids.to_external
    return Planted(ds, ext(ia), ext(ib), ext(ic), ext(id_), ia, ib)


@pytest.fixture(scope="module")
def served_shop(planted: Planted, run_dir: Path, index_dir: Path) -> Iterator[Served]:
    from serving.assemble import load_parts
    from serving.discovery import warm

    reader = open_reader(index_dir)
    engine = make_engine(load_parts(run_dir, planted.ds), reader)
    warm(engine)  # as `ecomrec serve` does before SERVING (text vectors, query encoder)
    s = Served(engine, metrics_port=0)
    yield s
    s.close()
    reader.close()


def _basket(s: Served, items: list[str], **kw: Any) -> Any:
    return s.call("CompleteBasket", s.pb.CompleteBasketRequest(item_ids=items, **kw))


def _search(s: Served, query: str, **kw: Any) -> Any:
    return s.call("SearchProducts", s.pb.SearchProductsRequest(query=query, **kw))


def test_complement_far_apart_in_tower_space_is_found(
    served_shop: Served, planted: Planted
) -> None:
    s = served_shop
    similar = s.call("SimilarItems", s.pb.SimilarItemsRequest(item_id=planted.a, k=20))
    assert planted.b not in [i.item_id for i in similar.items]  # substitutes miss it
    r = _basket(s, [planted.a], k=5)
    ids = [i.item_id for i in r.items]
    assert ids[0] == planted.b
    assert "BOUGHT_TOGETHER" in r.items[0].reasons
    assert f"with:{planted.a}" in r.items[0].reasons
    # never the basket's own item, never its colour variant (bought with A even more often)
    assert planted.a not in ids and planted.c not in ids
    assert len(ids) == 5


def test_basket_errors_and_unknown_items(served_shop: Served, planted: Planted) -> None:
    s = served_shop
    with pytest.raises(grpc.RpcError) as e:
        _basket(s, [])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item_ids" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _basket(s, ["NO-SUCH-ITEM"])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        _basket(s, [planted.a], k=10_000)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k" in e.value.details()
    plain = _basket(s, [planted.a], k=5)
    mixed = _basket(s, [planted.a, "NO-SUCH-ITEM"], k=5)
    assert list(mixed.unknown_item_ids) == ["NO-SUCH-ITEM"]
    assert [i.item_id for i in mixed.items] == [i.item_id for i in plain.items]


def test_basket_filters_and_exclusions(served_shop: Served, planted: Planted) -> None:
    s = served_shop
    r = _basket(s, [planted.a], k=5, exclude_item_ids=[planted.b])
    assert planted.b not in [i.item_id for i in r.items]
    f = s.pb.Filters(price_max=20.0)
    r = _basket(s, [planted.a], k=10, filters=f)
    assert r.items and all(0 < i.price <= 20.0 for i in r.items)


def test_basket_answer_equals_the_model_and_personalises(
    served_shop: Served, planted: Planted
) -> None:
    """Parity: the gRPC answer is the top-k of ComplementModel.score; a customer changes it
    by their own purchases (reasons BOUGHT_BEFORE / FOR_YOU)."""
    from serving.discovery import resolve

    s = served_shop
    engine = s.servicer.engine
    model = resolve(engine.complements)
    basket = [planted.ia]
    want = np.argsort(-model.score(basket), kind="stable")[:8]
    got = _basket(s, [planted.a], k=8)
    assert [i.item_id for i in got.items] == [engine.catalog.external_ids[j] for j in want]
    user = 7
    hist = engine.history.get(user).purchased()
    want_p = np.argsort(-model.score(basket, hist), kind="stable")[:8]
    ext_user = planted.ds.users.to_external(user)
    got_p = _basket(s, [planted.a], k=8, user_id=ext_user)
    assert [i.item_id for i in got_p.items] == [engine.catalog.external_ids[j] for j in want_p]
    reasons = {r for i in got_p.items for r in i.reasons}
    assert reasons & {"BOUGHT_BEFORE", "FOR_YOU"}


def test_search_finds_the_planted_product_with_reasons(
    served_shop: Served, planted: Planted
) -> None:
    s = served_shop
    r = _search(s, "dinosaur lunchbox", k=5)
    top = r.items[0]
    assert top.item_id == planted.d
    assert {"TEXT_MATCH", "word:dinosaur", "word:lunchbox"} <= set(top.reasons)
    r = _search(s, "Rexco Lunchboxes", k=3)
    assert r.items[0].item_id == planted.d
    assert {"brand:Rexco", "category:Lunchboxes"} <= set(r.items[0].reasons)


def test_search_personalised_blend(served_shop: Served, planted: Planted) -> None:
    """With a customer: the hybrid's candidates re-ranked by + w * cos(user, item), w =
    ServeConfig.search_personal_weight (0.5, chosen on validation)."""
    from serving.discovery import resolve
    from serving.history import to_batch

    s = served_shop
    engine = s.servicer.engine
    ps = resolve(engine.product_search)
    user = 7
    q = "Lipstick"
    base, _, _ = ps.hybrid(q)
    cands = np.argsort(-base, kind="stable")[: ps.cfg.candidates]
    cands = cands[np.isfinite(base[cands])]
    u = engine.encoder.encode(to_batch([engine.history.get(user)], engine.max_len))[0]
    iv = np.asarray(engine.index.get_vectors(cands.tolist()), np.float32)
    assert ps.cfg.personal_weight == engine.cfg.search_personal_weight == 0.5
    final = base[cands] + ps.cfg.personal_weight * (iv @ u)
    want = [engine.catalog.external_ids[j] for j in cands[np.argsort(-final, kind="stable")][:10]]
    got = _search(s, q, k=10, user_id=planted.ds.users.to_external(user))
    assert [i.item_id for i in got.items] == want
    plain = _search(s, q, k=10)
    assert [i.item_id for i in plain.items] == [engine.catalog.external_ids[j] for j in cands[:10]]


def test_search_errors_auth_and_metrics(served_shop: Served) -> None:
    s = served_shop
    with pytest.raises(grpc.RpcError) as e:
        _search(s, "x" * (s.cfg.max_text_length + 1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _search(s, "   ")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:  # same auth as every call
        s.stub.SearchProducts(s.pb.SearchProductsRequest(query="hose"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{s.handle.metrics_port}/metrics").read()
    assert b'method="SearchProducts"' in text and b'method="CompleteBasket"' in text


def test_cli_basket_and_search(served_shop: Served, planted: Planted) -> None:
    from ecomrec.cli import main

    common = ["--target", served_shop.handle.target, "--api-key", API_KEY]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["basket", planted.a, "-k", "3", *common]) == 0
    ids, first = out.getvalue().splitlines()[1:3]
    assert ids.startswith("recommendation_id ") and ids.endswith(" variant default")
    assert planted.b in first and "BOUGHT_TOGETHER" in first
    out = io.StringIO()
    with redirect_stdout(out):
        user = planted.ds.users.to_external(7)
        assert main(["search", "dinosaur lunchbox", "-k", "2", "--user", user, *common]) == 0
    assert planted.d in out.getvalue().splitlines()[2]


def test_concurrent_searches_equal_single_ones(served_shop: Served, planted: Planted) -> None:
    """Concurrent calls share the query batcher; each answer equals the call made alone."""
    from concurrent.futures import ThreadPoolExecutor

    s = served_shop
    queries = ["dinosaur lunchbox", "garden hose", "Lipstick", "Rexco", "hose reel"] * 3
    alone = [[i.item_id for i in _search(s, q, k=5).items] for q in queries]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: [i.item_id for i in _search(s, q, k=5).items], queries))
    assert together == alone


def _plain(r: Any) -> list[tuple[str, tuple[str, ...]]]:
    return [(i.item_id, tuple(i.reasons)) for i in r.items]


def test_batch_calls_stream_the_single_answers(served_shop: Served, planted: Planted) -> None:
    """CompleteBasketBatch / SearchProductsBatch: one item per request, in order, each equal
    to the single call; a bad request's error is in its own item; the limits of
    RecommendBatch (request count, API key)."""
    s = served_shop
    pb = s.pb
    user = planted.ds.users.to_external(7)
    baskets = [
        pb.CompleteBasketRequest(item_ids=[planted.a], k=5),
        pb.CompleteBasketRequest(item_ids=["NO-SUCH-ITEM"], k=5),  # NOT_FOUND, its own item
        pb.CompleteBasketRequest(item_ids=[planted.a, planted.b], k=4, user_id=user),
        pb.CompleteBasketRequest(item_ids=[], k=5),  # INVALID_ARGUMENT
        pb.CompleteBasketRequest(item_ids=[planted.b], k=3, filters=pb.Filters(price_max=20.0)),
    ]
    got = list(
        s.stub.CompleteBasketBatch(
            pb.CompleteBasketBatchRequest(requests=baskets), metadata=s.md, timeout=20
        )
    )
    assert [g.index for g in got] == list(range(len(baskets)))
    assert got[1].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert got[3].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "item_ids" in got[3].error_message
    for i in (0, 2, 4):
        assert got[i].error_code == 0
        assert _plain(got[i].response) == _plain(s.call("CompleteBasket", baskets[i]))
    queries = [
        pb.SearchProductsRequest(query="dinosaur lunchbox", k=5),
        pb.SearchProductsRequest(query="   ", k=5),  # INVALID_ARGUMENT
        pb.SearchProductsRequest(query="Lipstick", k=10, user_id=user),
        pb.SearchProductsRequest(query="garden hose", k=5, filters=pb.Filters(price_max=20.0)),
        pb.SearchProductsRequest(query="dinosaur lunchbox", k=3, exclude_item_ids=[planted.d]),
    ]
    got = list(
        s.stub.SearchProductsBatch(
            pb.SearchProductsBatchRequest(requests=queries), metadata=s.md, timeout=20
        )
    )
    assert [g.index for g in got] == list(range(len(queries)))
    assert got[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert got[0].response.items[0].item_id == planted.d
    assert planted.d not in [i.item_id for i in got[4].response.items]
    for i in (0, 2, 3, 4):
        single = s.call("SearchProducts", queries[i])
        assert _plain(got[i].response) == _plain(single)
        assert got[i].response.variant == single.variant == "default"
    # every answer of a batch is attributable on its own (docs/outcomes.md)
    rec_ids = [got[i].response.recommendation_id for i in (0, 2, 3, 4)]
    assert all(rec_ids) and len(set(rec_ids)) == len(rec_ids)
    with pytest.raises(grpc.RpcError) as e:  # the request limit of RecommendBatch
        list(
            s.stub.SearchProductsBatch(
                pb.SearchProductsBatchRequest(
                    requests=[queries[0]] * (s.cfg.max_batch_requests + 1)
                ),
                metadata=s.md,
                timeout=20,
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # and its API key
        list(s.stub.CompleteBasketBatch(pb.CompleteBasketBatchRequest(requests=baskets[:1])))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
