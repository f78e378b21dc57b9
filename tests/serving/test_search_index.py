"""SearchProducts' vector leg from the index's text collection (indexing/text_index.py).

The planted shop of test_discovery.py, indexed WITH its text vectors: below
``exact_max_items`` the service answers from the text collection's exact copy (same
answers as the in-memory catalogue vectors); with ``exact_max_items=0`` it searches the
collection's HNSW graph (a real graph: ``full_scan_threshold_kb=1``) with the request's
filters, over a real gRPC server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import Served, make_engine
from tests.serving.test_discovery import Planted, make_planted

pytestmark = pytest.mark.slow  # MiniLM text vectors + two engines (~10 s)

QUERIES = ["dinosaur lunchbox", "garden hose", "Lipstick", "Rexco", "hose reel", "nail polish"]


@pytest.fixture(scope="module")
def planted(parts: Any, serve_shop: Any) -> Planted:
    return make_planted(parts, serve_shop)


@pytest.fixture(scope="module")
def text_index_dir(planted: Planted, parts: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from indexing.base import IndexConfig
    from indexing.build import build_version, item_payloads, open_store
    from indexing.text_index import catalogue_text_points

    d = tmp_path_factory.mktemp("text-index")
    cfg = IndexConfig(location=str(d), hnsw_m=16, hnsw_ef_construct=64, full_scan_threshold_kb=1)
    store = open_store(cfg)
    items = planted.ds.items
    ids, payloads = item_payloads(items, parts.model.model_version)
    vecs = parts.model.item_vectors()
    text = catalogue_text_points(items, ids, payloads)
    build_version(
        store, ids, vecs[ids], payloads, model_version=parts.model.model_version, text=text
    )
    store.close()
    return cfg


def _engine(planted: Planted, run_dir: Path, cfg: Any, **kw: Any) -> tuple[Any, Any]:
    from indexing.build import open_index
    from serving.assemble import load_parts
    from serving.discovery import warm

    reader = open_index(cfg)
    engine = make_engine(load_parts(run_dir, planted.ds), reader, **kw)
    warm(engine)
    return engine, reader


@pytest.fixture(scope="module")
def engines(planted: Planted, run_dir: Path, text_index_dir: Any) -> Iterator[dict[str, Any]]:
    exact, r1 = _engine(planted, run_dir, text_index_dir)
    ann, r2 = _engine(planted, run_dir, text_index_dir, exact_max_items=0)
    served = Served(ann, metrics_port=0)
    yield {"exact": exact, "ann": ann, "served": served}
    served.close()
    r1.close()
    r2.close()


def _ids(engine: Any, query: str, k: int = 5, **kw: Any) -> list[str]:
    from serving.complete import ProductsResult
    from serving.requests import RequestContext
    from serving.search import SearchQuery, search_products

    q = SearchQuery(
        request_id="t",
        text=query,
        user=None,
        k=k,
        filters=kw.get("filters") or _flt(),
        exclude=(),
    )
    r: ProductsResult = search_products(engine, q, RequestContext.with_timeout(10.0))
    return [i.item_id for i in r.items]


def _flt(**kw: Any) -> Any:
    from indexing.base import SearchFilter

    return SearchFilter(**kw)


def test_exact_copy_of_the_text_collection_answers_like_memory(engines: dict[str, Any]) -> None:
    from serving.discovery import resolve, text_leg
    from serving.search import semantic_rows

    engine = engines["exact"]
    ps = resolve(engine.product_search)
    leg = text_leg(engine)
    assert leg is not None and leg.state()[0] == "exact"
    vecs = np.asarray(ps.encode(QUERIES), np.float32)
    got = semantic_rows(engine, ps, vecs)
    assert {g.source for g in got} == {"index-exact"}
    # the index's copy holds the same vectors as the catalogue cache (unit-normalised)
    want = ps.semantic_many(vecs)  # (B, N+1)
    for g, w in zip(got, want, strict=True):
        assert g.cands is not None and g.base is not None
        np.testing.assert_allclose(g.base @ g.vector, w, atol=1e-5)
        np.testing.assert_allclose(g.cands.scores, w[g.cands.ids], atol=1e-5)
        assert g.cands.bound <= g.cands.scores.min() + 1e-6
        assert (np.delete(w, np.r_[0, g.cands.ids]) <= g.cands.bound + 1e-5).all()


def test_ann_leg_over_a_real_graph_matches_exact_and_filters(
    engines: dict[str, Any], planted: Planted
) -> None:
    from serving.discovery import text_leg

    ann, exact = engines["ann"], engines["exact"]
    leg = text_leg(ann)
    assert leg is not None and leg.state()[0] == "ann"
    reader = leg.index._reader()
    from tests.indexing.conftest import indexed_vectors

    graph, points = indexed_vectors(reader)
    assert graph == points > 0  # the HNSW graph answers, not a full scan
    assert _ids(ann, "dinosaur lunchbox")[0] == planted.d
    same = sum(len(set(_ids(ann, q, 10)) & set(_ids(exact, q, 10))) for q in QUERIES)
    assert same >= 0.9 * 10 * len(QUERIES)
    cat = "Toys > Lunchboxes"
    got = _ids(ann, "lunchbox", 5, filters=_flt(categories=(cat,)))
    assert got == [planted.d]  # the only product of that category
    prices = [i.price for i in _served_search(engines, "hose", price_max=20.0).items]
    assert prices and all(0 < p <= 20.0 for p in prices)


def _served_search(engines: dict[str, Any], query: str, **flt: Any) -> Any:
    s = engines["served"]
    return s.call(
        "SearchProducts", s.pb.SearchProductsRequest(query=query, k=10, filters=s.pb.Filters(**flt))
    )


def test_grpc_answer_from_the_ann_leg(engines: dict[str, Any], planted: Planted) -> None:
    r = _served_search(engines, "dinosaur lunchbox")
    assert r.items[0].item_id == planted.d
    assert "SEMANTIC_MATCH" in r.items[0].reasons and not r.degraded
