"""The text collection (indexing/text_index.py): written with the item version, followed
through the item alias, searched by ANN over a real HNSW graph with the item filters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecomrec.errors import IndexUnavailableError
from indexing.base import SearchFilter
from indexing.build import (
    build_version,
    delete_points,
    has_text,
    open_index,
    open_store,
    rollback,
    upsert_points,
)
from indexing.exact import ExactSearch, PayloadMasks
from indexing.text_index import TEXT_DIM, TextPoints, open_text_index, text_version_of
from tests.indexing.conftest import indexed_vectors, make_config, make_points

pytestmark = pytest.mark.slow  # HNSW graphs of 384-d vectors, several versions (~30 s)

N = 600


def _text(ids: np.ndarray, payloads: list[dict[str, Any]], seed: int) -> TextPoints:
    v = np.random.default_rng(seed).normal(size=(len(ids), TEXT_DIM)).astype(np.float32)
    return TextPoints(ids, v / np.linalg.norm(v, axis=1, keepdims=True), payloads)


@pytest.fixture
def built(tmp_path: Path) -> Any:
    # full_scan_threshold_kb=1: even this small collection gets an HNSW graph
    cfg = make_config("edge", tmp_path, full_scan_threshold_kb=1, keep_versions=2)
    store = open_store(cfg)
    ids, vecs, pays = make_points(N, 16, seed=1)
    text = _text(ids, pays, seed=2)
    m = build_version(store, ids, vecs, pays, model_version="t", text=text)
    items = open_index(cfg)
    tindex = open_text_index(cfg, items)
    yield cfg, store, m, items, tindex, text
    tindex.close()
    items.close()
    store.close()


def test_build_writes_the_text_collection_of_the_version(built: Any) -> None:
    cfg, store, m, _items, tindex, text = built
    assert has_text(store, cfg.alias, m.version)
    assert tindex.version == text_version_of(m.version, cfg.alias)
    assert tindex.dim == TEXT_DIM and tindex.count() == N
    got = tindex.get_vectors([5, 77])
    np.testing.assert_allclose(got, text.vectors[[4, 76]], atol=1e-5)
    reader = tindex._reader()
    graph, points = indexed_vectors(reader)
    assert points == N and graph == N  # a real HNSW graph, not a full scan


def test_ann_matches_exact_and_applies_filters(built: Any) -> None:
    _cfg, _store, _m, _items, tindex, text = built
    exact = ExactSearch(PayloadMasks(text.ids.tolist(), text.payloads), max_items=10**6)
    ex = exact.index(tindex, tindex.version, block=True)
    assert ex is not None and ex.version == tindex.version
    rng = np.random.default_rng(3)
    qs = text.vectors[rng.choice(N, 30, replace=False)] + 0.3 * rng.normal(
        size=(30, TEXT_DIM)
    ).astype(np.float32)
    flt = SearchFilter(categories=("Beauty > Skin Care",), price_max=60.0)
    hit = total = 0
    for qv in qs:
        ann = tindex.search(qv, 10, flt, hnsw_ef=128, with_payload=True)
        ref = ex.search(qv, 10, flt)
        assert ann and all(flt.matches(h.payload, h.item_id) for h in ann)
        total += len(ref)
        hit += len({h.item_id for h in ann} & {h.item_id for h in ref})
        plain_ann = {h.item_id for h in tindex.search(qv, 10, hnsw_ef=128, with_payload=False)}
        plain_ref = {h.item_id for h in ex.search(qv, 10)}
        assert len(plain_ann & plain_ref) >= 9
    assert hit / total >= 0.95


def test_updates_and_rollback_swap_both_collections_together(built: Any) -> None:
    cfg, store, m, items, tindex, _unused = built
    v1 = m.version
    new_ids, new_vecs, new_pays = make_points(3, 16, seed=9, start=N + 1)
    new_text = _text(new_ids, new_pays, seed=10)
    m2 = upsert_points(store, new_ids, new_vecs, new_pays, text=new_text)
    assert items.version == m2.version != v1
    assert tindex.version == text_version_of(m2.version, cfg.alias)
    assert tindex.count() == N + 3
    hits = tindex.search(new_text.vectors[1], 1, with_payload=False)
    assert hits[0].item_id == N + 2
    m3 = delete_points(store, [N + 2])
    assert tindex.version == text_version_of(m3.version, cfg.alias)
    assert N + 2 not in tindex.existing_ids([N + 1, N + 2])
    assert tindex.search(new_text.vectors[1], 1, with_payload=False)[0].item_id != N + 2
    rollback(store, to=m2.version)  # both follow the alias back
    assert items.version == m2.version
    assert tindex.existing_ids([N + 2]) == {N + 2}
    # keep_versions=2: pruning dropped v1, and its text collection with it
    assert not has_text(store, cfg.alias, v1)
    names = {p.name for p in (Path(cfg.location) / "versions").iterdir()}
    assert text_version_of(v1, cfg.alias) not in names


def test_a_version_without_text_is_unavailable_not_mixed(tmp_path: Path) -> None:
    cfg = make_config("edge", tmp_path)
    store = open_store(cfg)
    ids, vecs, pays = make_points(50, 8)
    m1 = build_version(store, ids, vecs, pays, model_version="t", text=_text(ids, pays, 1))
    items = open_index(cfg)
    tindex = open_text_index(cfg, items)
    assert tindex.count() == 50
    m2 = build_version(store, ids, vecs, pays, model_version="t2")  # no text this time
    assert items.version == m2.version and not has_text(store, cfg.alias, m2.version)
    with pytest.raises(IndexUnavailableError):
        tindex.search(np.ones(TEXT_DIM, np.float32), 5)  # never m1's text vectors
    assert has_text(store, cfg.alias, m1.version)
    tindex.close()
    items.close()
    store.close()


def test_both_backends_carry_and_swap_the_text_collection(store: Any) -> None:
    """The same build / upsert / delete / rollback on the embedded engine and the server
    back end (qdrant-client): the text collection follows the item alias on both."""
    from indexing.build import open_store as _open

    cfg = store.cfg
    ids, vecs, pays = make_points(40, 8, seed=4)
    text = _text(ids, pays, seed=5)
    m1 = build_version(store, ids, vecs, pays, model_version="t", text=text)
    items = _open(cfg).open(alias=cfg.alias)
    tindex = open_text_index(cfg, items)
    assert tindex.version == text_version_of(m1.version, cfg.alias)
    hits = tindex.search(text.vectors[7], 1, SearchFilter(categories=(pays[7]["category"],)))
    assert hits[0].item_id == ids[7]
    new_ids, new_vecs, new_pays = make_points(2, 8, seed=6, start=41)
    m2 = upsert_points(store, new_ids, new_vecs, new_pays, text=_text(new_ids, new_pays, 7))
    assert tindex.version == text_version_of(m2.version, cfg.alias) and tindex.count() == 42
    m3 = delete_points(store, [41])
    assert tindex.version == text_version_of(m3.version, cfg.alias) and tindex.count() == 41
    rollback(store, to=m1.version)
    assert tindex.count() == 40 and not tindex.existing_ids([41, 42])
    tindex.close()
    items.close()
