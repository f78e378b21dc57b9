"""One contract suite, run against both backends (embedded engine and qdrant-client local).

Same query, same filter -> the same top-k ids as numpy brute force; bad input gives
clear errors and leaves the live version untouched; upsert/delete are idempotent;
rollback and version-at-query-time behave; every ``ItemIndex`` operation the serving
engine calls (``existing_ids``, ``with_payload=False``, version reads) behaves alike.  The
exact in-memory back end (``indexing.exact.ExactIndex``, the search part of the protocol)
runs the search contract over each backend's stored vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from ecomrec.errors import DataError, IndexUnavailableError, InvalidArgumentError, NotFoundError
from indexing.base import Hit, ItemIndex, SearchFilter, VectorSearch, VerificationError
from indexing.build import (
    build_version,
    delete_points,
    item_payloads,
    list_versions,
    open_store,
    rollback,
    upsert_points,
)
from indexing.exact import ExactIndex, ExactSearch, PayloadMasks, supports_exact
from indexing.store import exact_search
from tests.indexing.conftest import indexed_vectors, make_config, make_points

N, D = 600, 16

FILTERS = [
    SearchFilter(),
    SearchFilter(categories=("Beauty > Makeup",)),
    SearchFilter(categories=("Beauty > Tools", "Beauty > Skin Care"), in_stock=True),
    SearchFilter(price_min=10.0, price_max=40.0),
    SearchFilter(brands=("brand1", "brand3"), in_stock=False),
    SearchFilter(categories=("Beauty > Makeup > Eyes",), price_max=60.0, exclude_ids=(2, 6, 10)),
]


def _reference(
    ids: np.ndarray,
    vecs: np.ndarray,
    payloads: list[dict[str, Any]],
    q: np.ndarray,
    k: int,
    f: SearchFilter,
) -> list[int]:
    mask = np.array([f.matches(p, int(i)) for p, i in zip(payloads, ids)])
    top, _ = exact_search(vecs, ids, q[None, :], k, "cosine", mask=mask)
    return [int(i) for i in top[0] if i >= 0]


@pytest.fixture
def built(store: Any) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    ids, vecs, payloads = make_points(N, D)
    build_version(store, ids, vecs, payloads, model_version="m1")
    return store, ids, vecs, payloads


def test_reader_implements_protocol(built: Any) -> None:
    store, *_ = built
    assert isinstance(store.open(), ItemIndex)


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: "empty" if f.is_empty else "filtered")
def test_topk_matches_bruteforce(built: Any, f: SearchFilter) -> None:
    store, ids, vecs, payloads = built
    reader = store.open()
    rng = np.random.default_rng(1)
    for q in rng.normal(size=(8, D)).astype(np.float32):
        hits = reader.search(q, 10, f)
        assert [h.item_id for h in hits] == _reference(ids, vecs, payloads, q, 10, f)
        assert all(isinstance(h, Hit) and f.matches(h.payload, h.item_id) for h in hits)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
    mask = [f.matches(p, int(i)) for p, i in zip(payloads, ids)]
    assert reader.count(f) == sum(mask)


def test_exclude_ids_argument_and_overfetch(built: Any) -> None:
    store, _ids, vecs, _payloads = built
    reader = store.open()
    q = vecs[5]
    first = [h.item_id for h in reader.search(q, 5)]
    assert first[0] == 6  # the item itself (id = row + 1)
    excluded = reader.search(q, 5, exclude_ids=first[:2])
    assert [h.item_id for h in excluded][:3] == first[2:5]
    more = reader.search(q, 5, SearchFilter(), overfetch=3.0)
    assert len(more) == 15 and [h.item_id for h in more][:5] == first


def test_search_batch_equals_single(built: Any) -> None:
    store, _ids, vecs, _payloads = built
    reader = store.open()
    qs = vecs[:6] + 0.1
    excl = [[1], [], [3, 4], [], [], [6]]
    f = SearchFilter(categories=("Beauty",))
    batch = reader.search_batch(qs, 7, f, excl)
    for q, e, got in zip(qs, excl, batch):
        assert [h.item_id for h in got] == [h.item_id for h in reader.search(q, 7, f, e)]


def test_get_vectors_and_payloads_round_trip(built: Any) -> None:
    store, _ids, vecs, payloads = built
    reader = store.open()
    got = reader.get_vectors([3, 1, 200])  # (3, D)
    want = vecs[[2, 0, 199]] / np.linalg.norm(vecs[[2, 0, 199]], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert reader.get_payloads([7])[0]["external_id"] == "P00007"
    assert reader.get_payloads([7])[0]["category_path"] == payloads[6]["category_path"]
    with pytest.raises(NotFoundError, match="99999"):
        reader.get_vectors([1, 99999])
    assert reader.dim == D and reader.manifest().count == N


def test_bad_queries_raise_invalid_argument(built: Any) -> None:
    store, *_ = built
    reader = store.open()
    with pytest.raises(InvalidArgumentError, match="vector"):
        reader.search(np.ones(D + 1, np.float32), 5)
    bad = np.ones(D, np.float32)
    bad[3] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        reader.search(bad, 5)
    with pytest.raises(InvalidArgumentError, match="k"):
        reader.search(np.ones(D, np.float32), 0)
    with pytest.raises(InvalidArgumentError, match="price_min"):
        SearchFilter(price_min=5.0, price_max=1.0)


def test_existing_ids_and_version_reads(built: Any) -> None:
    store, ids, _vecs, _payloads = built
    reader = store.open()
    assert reader.existing_ids([3, 1, N, N + 1, 10**6]) == {1, 3, N}
    assert reader.existing_ids([]) == set()
    assert reader.existing_ids(ids.tolist()) == set(ids.tolist())
    v1 = reader.version
    assert v1 == reader.manifest().version == store.alias_target("items")
    pinned = store.open(version=v1)
    ids2, vecs2, pay2 = make_points(N - 100, D, seed=2, model_version="m2")
    m2 = build_version(store, ids2, vecs2, pay2, model_version="m2")
    assert reader.version == m2.version and pinned.version == v1  # follower vs pinned
    assert reader.existing_ids([N - 100, N - 99]) == {N - 100}  # the live version's points
    assert pinned.existing_ids([N - 100, N - 99]) == {N - 100, N - 99}


def test_search_without_payload_returns_the_same_hits(built: Any) -> None:
    store, _ids, vecs, _payloads = built
    reader = store.open()
    qs = vecs[:4] + 0.05
    for f in FILTERS:
        with_p = reader.search_batch(qs, 8, f, [[1], [], [2, 3], []])
        bare = reader.search_batch(qs, 8, f, [[1], [], [2, 3], []], with_payload=False)
        for a, b in zip(with_p, bare):
            assert [h.item_id for h in b] == [h.item_id for h in a]
            np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=1e-6)
            assert all(not h.payload for h in b) and all(h.payload for h in a)
        one = reader.search(qs[0], 8, f, exclude_ids=[1], with_payload=False)
        assert [h.item_id for h in one] == [h.item_id for h in bare[0]]


def _exact_backend(reader: Any, ids: np.ndarray) -> ExactIndex:
    masks = PayloadMasks.from_index(reader, ids.tolist())
    ex = ExactSearch(masks, max_items=N).index(reader, reader.version, block=True)
    assert ex is not None and ex.version == reader.version and ex.dim == D
    return ex


def test_exact_backend_matches_bruteforce_and_the_index(built: Any) -> None:
    """The exact back end over this backend's stored vectors: the same top-k as numpy
    brute force on the source vectors and as the index (scores too), for every filter
    it serves; batches equal single queries; bad input is refused like the index does."""
    store, ids, vecs, payloads = built
    reader = store.open()
    ex = _exact_backend(reader, ids)
    assert isinstance(ex, VectorSearch)
    rng = np.random.default_rng(4)
    qs = rng.normal(size=(6, D)).astype(np.float32)
    served = [f for f in FILTERS if supports_exact(f)]
    assert len(served) == len(FILTERS) - 1  # brands go to the index
    for f in served:
        for q in qs:
            hits = ex.search(q, 10, f)
            assert [h.item_id for h in hits] == _reference(ids, vecs, payloads, q, 10, f)
            ann = reader.search(q, 10, f)
            assert [h.item_id for h in hits] == [h.item_id for h in ann]
            np.testing.assert_allclose([h.score for h in hits], [h.score for h in ann], atol=1e-5)
        excl = [[1], [], [3, 4], [], [5, 6, 7], [2]]
        batch = ex.search_batch(qs, 7, f, excl)
        for q, e, got in zip(qs, excl, batch):
            assert [h.item_id for h in got] == [h.item_id for h in ex.search(q, 7, f, e)]
            assert not set(e) & {h.item_id for h in got}
    with pytest.raises(InvalidArgumentError, match="flt"):
        ex.search(qs[0], 5, FILTERS[4])  # brands: the index's job
    with pytest.raises(InvalidArgumentError, match="vector"):
        ex.search(np.ones(D + 1, np.float32), 5)
    with pytest.raises(InvalidArgumentError, match="k"):
        ex.search(qs[0], 0)


def _snapshot(store: Any) -> tuple[str | None, list[str]]:
    return store.alias_target("items"), [m.version for m in store.versions("items")]


def test_bad_input_writes_nothing(built: Any) -> None:
    store, ids, vecs, payloads = built
    before = _snapshot(store)
    nan = vecs[:3].copy()
    nan[1, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        upsert_points(store, ids[:3], nan, payloads[:3])
    with pytest.raises(DataError, match="dimension"):
        upsert_points(store, ids[:3], vecs[:3, :-1], payloads[:3])
    with pytest.raises(DataError, match="padding"):
        upsert_points(store, np.array([0]), vecs[:1], payloads[:1])
    with pytest.raises(DataError, match="duplicate"):
        build_version(store, np.array([1, 1]), vecs[:2], payloads[:2], model_version="m")
    with pytest.raises(DataError, match="NaN"):
        build_version(store, ids, np.full_like(vecs, np.nan), payloads, model_version="m")
    with pytest.raises(NotFoundError):
        delete_points(store, [1, 99999], missing_ok=False)
    assert _snapshot(store) == before
    assert store.incomplete_versions("items") == []
    assert store.open().count() == N


def test_catalogue_missing_columns_is_a_data_error() -> None:
    items = pl.DataFrame({"item_id": [1, 2], "external_id": ["a", "b"], "title": ["x", "y"]})
    with pytest.raises(DataError, match="brand"):
        item_payloads(items, "m", source="shop.csv")


def test_upsert_and_delete_are_idempotent(built: Any) -> None:
    store, ids, vecs, payloads = built
    reader = store.open()
    new_ids, new_vecs, new_pay = make_points(3, D, seed=9, start=N + 1)
    m1 = upsert_points(store, new_ids, new_vecs, new_pay)
    assert m1.count == N + 3 and reader.version == m1.version
    assert reader.search(new_vecs[1], 1)[0].item_id == N + 2
    m2 = upsert_points(store, new_ids, new_vecs, new_pay)
    assert m2.version == m1.version  # nothing changed: no new version
    # a changed vector for an existing item replaces it (count unchanged)
    changed = -vecs[:1]
    m3 = upsert_points(store, ids[:1], changed, payloads[:1])
    assert m3.count == N + 3
    np.testing.assert_allclose(
        reader.get_vectors([1])[0], changed[0] / np.linalg.norm(changed[0]), atol=1e-5
    )
    d1 = delete_points(store, [N + 1, N + 2])
    assert d1.count == N + 1 and reader.count() == N + 1
    d2 = delete_points(store, [N + 1, N + 2])
    assert d2.version == d1.version
    with pytest.raises(NotFoundError):
        reader.get_vectors([N + 1])


def test_rollback_and_version_at_query_time(built: Any) -> None:
    store, _ids, vecs, _payloads = built
    reader = store.open()
    v1 = reader.version
    ids2, vecs2, pay2 = make_points(N, D, seed=5, model_version="m2")
    m2 = build_version(store, ids2, vecs2, pay2, model_version="m2")
    # the same reader object follows the alias: the next query runs on the new version
    assert reader.version == m2.version != v1
    q = vecs2[10]
    assert reader.search(q, 1)[0].item_id == 11
    assert reader.search(q, 1)[0].payload["model_version"] == "m2"
    back = rollback(store)
    assert back.version == v1 and reader.version == v1
    assert reader.search(vecs[10], 1)[0].payload["model_version"] == "test"
    rows = list_versions(store)
    assert [live for _, live in rows] == [True, False]
    with pytest.raises(NotFoundError):
        rollback(store)  # nothing older than v1
    rollback(store, to=m2.version)
    assert reader.version == m2.version


def test_keeps_last_n_versions(store: Any) -> None:
    ids, vecs, payloads = make_points(50, 8)
    made = [
        build_version(store, ids, vecs, payloads, model_version=f"m{i}").version for i in range(5)
    ]
    kept = [m.version for m in store.versions("items")]
    assert kept == made[-3:]  # keep_versions = 3
    assert store.alias_target("items") == made[-1]


def test_index_unavailable_before_build(store: Any) -> None:
    with pytest.raises(IndexUnavailableError, match="build it first"):
        store.open().search(np.ones(4, np.float32), 1)


def test_failed_verification_leaves_alias(backend: str, tmp_path: Any) -> None:
    # count check: a store whose seal drops a point must fail verification
    store = open_store(make_config(backend, tmp_path))
    ids, vecs, payloads = make_points(100, 8)
    first = build_version(store, ids, vecs, payloads, model_version="m1")
    orig_seal = store.seal

    def lossy_seal(version: str) -> None:
        store.delete(version, [5])
        orig_seal(version)

    store.seal = lossy_seal  # type: ignore[method-assign]
    with pytest.raises(VerificationError, match="count 99 != expected 100"):
        build_version(store, ids, vecs, payloads, model_version="m2")
    assert store.alias_target("items") == first.version
    assert [m.version for m in store.versions("items")] == [first.version]
    assert store.incomplete_versions("items") == []


def test_exception_mid_build_leaves_alias(backend: str, tmp_path: Any) -> None:
    cfg = make_config(backend, tmp_path, upsert_batch=20)
    store = open_store(cfg)
    ids, vecs, payloads = make_points(100, 8)
    first = build_version(store, ids, vecs, payloads, model_version="m1")
    calls = {"n": 0}
    orig = store.upsert

    def failing(*a: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        orig(*a)

    store.upsert = failing  # type: ignore[method-assign,assignment]
    with pytest.raises(OSError, match="injected"):
        build_version(store, ids, vecs, payloads, model_version="m2")
    store.upsert = orig  # type: ignore[method-assign]
    assert store.alias_target("items") == first.version
    assert store.open().count() == 100
    again = build_version(store, ids, vecs, payloads, model_version="m3")
    assert store.alias_target("items") == again.version


@pytest.mark.parametrize(
    "planner",
    [
        {"exact_threshold": 1},  # unfiltered HNSW over-fetch + filter here
        {"exact_threshold": 1, "postfilter_min_selectivity": 1.0},  # filtered HNSW, scaled ef
        {"exact_threshold": 1, "postfilter_max_fetch": 10},  # over-fetch too large: filtered HNSW
    ],
    ids=["postfilter", "filtered-hnsw", "fetch-cap"],
)
def test_every_planner_path_matches_bruteforce(
    backend: str, tmp_path: Any, planner: dict[str, Any]
) -> None:
    # full_scan_threshold_kb=1 (16 vectors of 16 floats): the engine builds its HNSW graph
    # and walks it for filtered queries too; at the default 1000 KB these 600 points
    # would be a full scan and the parity below would compare brute force with itself.
    store = open_store(make_config(backend, tmp_path, full_scan_threshold_kb=1, **planner))
    ids, vecs, payloads = make_points(N, D)
    build_version(store, ids, vecs, payloads, model_version="m")
    reader = store.open()
    if backend == "edge":  # qdrant-client's local mode has no graph: always brute force
        assert indexed_vectors(reader) == (N, N)
    rng = np.random.default_rng(3)
    qs = rng.normal(size=(5, D)).astype(np.float32)
    for f in FILTERS[1:]:
        got = reader.search_batch(qs, 10, f, [[1, 2, 3]] * len(qs))
        for q, hits in zip(qs, got):
            want = _reference(ids, vecs, payloads, q, 10, f.with_excluded([1, 2, 3]))
            assert [h.item_id for h in hits] == want
    # a rare filter (one brand, in stock, narrow price band) with too few matches for
    # the over-fetch: the shortfall is filled by exact search
    rare = SearchFilter(brands=("brand2",), price_min=10.0, price_max=12.0)
    hits = reader.search(qs[0], 10, rare)
    assert [h.item_id for h in hits] == _reference(ids, vecs, payloads, qs[0], 10, rare)
    assert not reader.search(qs[0], 10, rare, with_payload=False)[0].payload


def test_int8_quantization_with_rescoring(backend: str, tmp_path: Any) -> None:
    cfg = make_config(backend, tmp_path, quantization="int8", full_scan_threshold_kb=10)
    store = open_store(cfg)
    ids, vecs, payloads = make_points(2500, D, seed=4)
    m = build_version(store, ids, vecs, payloads, model_version="q8")
    assert m.verify["recall"] >= 0.98 and m.index_config["quantization"] == "int8"
    reader = store.open()
    top = reader.search(vecs[41], 5)
    assert top[0].item_id == 42
    want = _reference(ids, vecs, payloads, vecs[41], 5, SearchFilter())
    assert [h.item_id for h in top] == want  # rescored with the full vectors
