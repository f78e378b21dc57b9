"""Items the index holds but the serving catalogue does not (issue 15: the 1M-item
catalogue of the load test; in production, items added to the index after training).

A few thousand index-only items (benchmarks/serve_load.py's synthetic catalogue) plus
planted ones next to a customer's own vector, served over a real gRPC server: the planted
item comes back first with its shop id, category and price from the index payload; the
filters (price, stock, category) apply to index-only items; re-ranking and SimilarItems
handle them; exact search steps aside (the catalogue masks cannot filter such items).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import Served, make_engine, open_reader

ROOT = Path(__file__).resolve().parents[2]


def _serve_load() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load  # type: ignore[import-not-found]

    return serve_load


def _user_vector(engine: Any, user: int) -> np.ndarray:
    from serving.history import to_batch

    vec = engine.encoder.encode(to_batch([engine.history.get(user)], engine.max_len))[0]
    return np.asarray(vec, np.float32) / np.linalg.norm(vec)  # (D,)


@pytest.fixture(scope="module")
def shop_index(parts: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from indexing.base import IndexConfig
    from indexing.build import build_version, item_payloads, open_store

    probe = make_engine(parts, None)  # the encoder the served engine uses
    user = int(parts.history.users()[0])
    u = _user_vector(probe, user)
    real_ids, real_payloads = item_payloads(
        parts.dataset.items, parts.model.model_version, parts.history.inter.item_counts()
    )
    real = parts.model.item_vectors()[real_ids]  # (R, D)
    ids, vecs, payloads = _serve_load().synthetic_catalogue(real_ids, real, real_payloads, 3000)
    n_cat = int(real_ids.max())
    assert ids[len(real_ids)] == n_cat + 1 and len(ids) == 3000  # ids after the catalogue
    # planted: the customer's own direction, a twin out of stock and expensive, a copy of
    # catalogue item 1 (SimilarItems)
    nxt = int(ids.max()) + 1
    planted = {
        "NEW-A": (u, {"category": "Planted > Soap", "price": 5.0, "in_stock": 1}),
        "NEW-B": (u + 0.01, {"category": "Planted > Soap", "price": 500.0, "in_stock": 0}),
        "NEW-C": (real[0], {"category": "Planted > Copy", "price": 7.0, "in_stock": 1}),
    }
    from indexing.build import category_path

    for j, (ext, (v, fields)) in enumerate(planted.items()):
        ids = np.append(ids, nxt + j)
        vecs = np.vstack([vecs, np.asarray(v, np.float32)[None]])
        payloads.append(
            {
                **payloads[0],
                **fields,
                "external_id": ext,
                "brand": "Planted",
                "category_path": category_path(str(fields["category"])),
                "popularity": 0,
            }
        )
    loc = tmp_path_factory.mktemp("index_only")
    store = open_store(IndexConfig(location=str(loc), hnsw_m=16, hnsw_ef_construct=64))
    try:
        build_version(store, ids, vecs, payloads, model_version=parts.model.model_version)
    finally:
        store.close()
    reader = open_reader(loc)
    yield {"reader": reader, "user": user, "n_catalogue": n_cat, "planted_ids": ids[-3:]}
    reader.close()


@pytest.fixture(scope="module")
def served_big(parts: Any, shop_index: dict[str, Any], segments: Any) -> Iterator[Served]:
    s = Served(make_engine(parts, shop_index["reader"], segments))
    yield s
    s.close()


def _ids(resp: Any) -> list[str]:
    return [it.item_id for it in resp.items]


def test_planted_index_only_item_comes_back_with_payload_fields(
    served_big: Served, shop_index: dict[str, Any], parts: Any
) -> None:
    pb = served_big.pb
    ext_user = parts.dataset.users.to_external(shop_index["user"])
    resp = served_big.call(
        "Recommend", pb.RecommendRequest(user_id=ext_user, k=10, skip_rerank=True)
    )
    assert not resp.degraded, resp.degraded_reasons
    assert _ids(resp)[:2] == ["NEW-A", "NEW-B"]  # cosine 1 and its twin
    first = resp.items[0]
    assert first.category == "Planted > Soap" and first.price == pytest.approx(5.0)
    assert first.relevance == pytest.approx(1.0, abs=1e-4)
    # re-ranked (no popularity for index-only items): still retrieved and explained
    rr = served_big.call("Recommend", pb.RecommendRequest(user_id=ext_user, k=10))
    assert not rr.degraded and len(rr.items) == 10
    assert "NEW-A" in _ids(rr)
    assert all(it.reasons for it in rr.items)
    assert any(i.startswith("SYN") for i in _ids(rr))  # the synthetic neighbours too
    eng = served_big.engine
    assert eng.index_only.fetched > 0  # payloads were read for index-only ids
    assert eng.exact is not None and eng.exact.matrix(eng.index, eng.index.version) is None


def test_filters_apply_to_index_only_items(
    served_big: Served, shop_index: dict[str, Any], parts: Any
) -> None:
    pb = served_big.pb
    ext_user = parts.dataset.users.to_external(shop_index["user"])

    def ask(**f: Any) -> Any:
        return served_big.call(
            "Recommend",
            pb.RecommendRequest(user_id=ext_user, k=10, filters=pb.Filters(**f)),
        )

    cheap = ask(price_max=10.0)
    assert "NEW-A" in _ids(cheap) and "NEW-B" not in _ids(cheap)
    assert all(0 < it.price <= 10.0 for it in cheap.items)
    stocked = ask(in_stock_only=True)
    assert "NEW-A" in _ids(stocked) and "NEW-B" not in _ids(stocked)
    planted_cat = ask(categories=["Planted"])
    assert set(_ids(planted_cat)) == {"NEW-A", "NEW-B", "NEW-C"}, _ids(planted_cat)
    assert all(it.category.startswith("Planted") for it in planted_cat.items)


def test_similar_items_returns_index_only_neighbour(served_big: Served, parts: Any) -> None:
    pb = served_big.pb
    item1 = parts.dataset.item_ids.to_external(1)
    resp = served_big.call("SimilarItems", pb.SimilarItemsRequest(item_id=item1, k=5))
    assert not resp.degraded
    assert resp.items[0].item_id == "NEW-C"  # the copy of item 1's vector
    assert resp.items[0].category == "Planted > Copy"


def test_synthetic_catalogue_shape() -> None:
    sl = _serve_load()
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8)).astype(np.float32)
    pay = [{"external_id": f"R{i}", "price": 10.0, "category": "A > B", "in_stock": 1}
           for i in range(50)]  # fmt: skip
    ids, vecs, out = sl.synthetic_catalogue(np.arange(1, 51), real, pay, 500, seed=1)
    assert ids.tolist() == list(range(1, 501)) and vecs.shape == (500, 8) and len(out) == 500
    assert np.allclose(np.linalg.norm(vecs[50:], axis=1), 1.0, atol=1e-5)
    unit = real / np.linalg.norm(real, axis=1, keepdims=True)
    cos = (vecs[50:] * unit[np.arange(450) % 50]).sum(axis=1)  # to its source item
    assert 0.7 < float(np.median(cos)) < 0.95  # a variant, not a copy
    assert out[50]["external_id"] == "SYN51" and out[50]["category"] == "A > B"
    assert out[0] is pay[0]  # the real items unchanged


def test_index_only_lookup_drops_vanished_ids_and_stays_bounded(
    shop_index: dict[str, Any],
) -> None:
    from serving.catalog import IndexOnlyItems

    reader = shop_index["reader"]
    planted = [int(i) for i in shop_index["planted_ids"]]
    lookup = IndexOnlyItems(max_cached=2)
    got = lookup.info(reader, reader.version, [*planted, 10**9])  # 10**9: not in the index
    assert sorted(got) == planted  # the vanished id is left out, not an error
    assert [got[i].external_id for i in planted] == ["NEW-A", "NEW-B", "NEW-C"]
    assert got[planted[1]].in_stock is False and got[planted[1]].price == 500.0
    assert lookup.fetched == 3
    again = lookup.info(reader, reader.version, planted[1:])  # the LRU kept the last two
    assert sorted(again) == planted[1:] and lookup.fetched == 3 and lookup.hits == 2
