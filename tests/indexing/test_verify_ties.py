"""The build check's recall counts ties at the k-th score (products sharing one vector)."""

from __future__ import annotations

import numpy as np

from indexing.base import IndexConfig
from indexing.build import build_version, open_store, tie_aware_hits, verify_version


def test_tie_aware_hits_counts_only_ties_at_the_kth_score() -> None:
    exact = [(1, 0.9), (2, 0.5)]
    assert tie_aware_hits([(1, 0.9), (2, 0.5)], exact) == 2
    assert tie_aware_hits([(1, 0.9), (7, 0.5)], exact) == 2  # 7 ties with the 2nd
    assert tie_aware_hits([(1, 0.9), (7, 0.49)], exact) == 1  # 7 is really worse
    assert tie_aware_hits([(7, 0.5), (8, 0.5), (9, 0.5)], exact) == 2  # never more than k
    assert tie_aware_hits([], exact) == 0
    assert tie_aware_hits([(1, 0.9)], []) == 0


def test_a_catalogue_of_identical_vectors_passes_the_check(tmp_path) -> None:
    # 300 products, 200 of them share one vector (never trained): the exact top 10 of a
    # query near that vector is an arbitrary 10 of the 200, so an id-set recall fails.
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(100, 16)).astype(np.float32)
    shared = np.tile(rng.normal(size=(1, 16)).astype(np.float32), (200, 1))
    vectors = np.concatenate([distinct, shared])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, len(vectors) + 1)
    queries = shared[:20] + 1e-3 * rng.normal(size=(20, 16)).astype(np.float32)
    cfg = IndexConfig(location=str(tmp_path / "index"), full_scan_threshold_kb=1)
    store = open_store(cfg)
    payloads = [{"item_id": int(i)} for i in ids]
    mf = build_version(store, ids, vectors, payloads, model_version="m", queries=queries)
    report = verify_version(
        store, mf.version, expected_count=len(ids), queries=queries, vectors=vectors, ids=ids
    )
    assert report.ok and report.recall >= 0.98, report
    # an id-set recall over the engine's own answers would not have passed
    reader = store.open(version=mf.version)
    try:
        hits = 0
        for q in queries:
            ann = {h.item_id for h in reader.search(q, 10, with_payload=False)}
            scores = vectors @ (q / np.linalg.norm(q))
            top = np.argsort(-scores, kind="stable")[:10]
            hits += len(ann & {int(ids[i]) for i in top})
    finally:
        reader.close()
    assert hits / (10 * len(queries)) < 0.98
