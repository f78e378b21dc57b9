"""Build, verify, swap, roll back and incrementally update an index (backend-agnostic).

Every write goes to a NEW version; the alias moves only after the version is sealed
(HNSW built), verified (point count and recall@k of ANN vs exact search on real query
vectors) and its manifest committed.  Any failure, or a crash, leaves the alias on the
previous version; the next writer deletes the leftover incomplete version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from ecomrec.config import config_hash as _config_hash
from ecomrec.errors import DataError, IndexUnavailableError, NotFoundError
from indexing.base import (
    PAYLOAD_INDEXES,
    IndexConfig,
    IndexManifest,
    ItemIndex,
    VerificationError,
    check_vectors,
    config_dict,
    new_version_name,
)
from indexing.store import IndexStore, QdrantReader, exact_search, plain_payload
from indexing.text_index import TEXT_DIM, TextPoints, text_alias, text_version_of
from intake.schema import ITEMS_SCHEMA, require_columns

log = logging.getLogger(__name__)

#: Catalogue columns an index build needs.
CATALOG_COLUMNS: tuple[str, ...] = tuple(ITEMS_SCHEMA)


def open_store(cfg: IndexConfig) -> IndexStore:
    """The store for ``cfg.backend`` at ``cfg.location``."""
    if cfg.backend == "edge":
        from indexing.qdrant_edge import EdgeStore

        return EdgeStore(cfg)
    from indexing.qdrant_server import ServerStore

    return ServerStore(cfg)


def open_index(
    cfg: IndexConfig, alias: str | None = None, *, local_copy: bool | str = False
) -> ItemIndex:
    """A reader following ``alias`` (default ``cfg.alias``): what serving uses.

    ``local_copy`` (embedded backend): serve from checked private copies of the versions
    (True = under the system temp dir, or a parent directory), so damage to the published
    files cannot reach the reader's memory maps (a truncated file would be a SIGBUS).
    """
    if cfg.backend == "edge":
        from indexing.qdrant_edge import EdgeStore

        return EdgeStore(cfg).open(alias=alias, local_copy=local_copy)
    return open_store(cfg).open(alias=alias)


# -- payloads --------------------------------------------------------------------------------
def category_path(category: str | None) -> list[str]:
    """Every prefix of every ``" | "``-separated ``" > "`` path, in order, deduplicated."""
    if not category:
        return []
    out: dict[str, None] = {}
    for path in str(category).split(" | "):
        parts = [p.strip() for p in path.split(">") if p.strip()]
        for i in range(1, len(parts) + 1):
            out[" > ".join(parts[:i])] = None
    return list(out)


def item_payloads(
    items: pl.DataFrame,
    model_version: str,
    popularity: np.ndarray | None = None,
    *,
    source: str = "catalogue",
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Point ids ``(N,)`` and payloads for a canonical items frame.

    ``popularity`` is indexed by item id (e.g. ``Interactions.item_counts()``); optional
    catalogue columns ``in_stock`` (bool/0-1) and ``popularity`` override the defaults
    (in stock, popularity from ``popularity`` or 0).
    """
    require_columns(items, CATALOG_COLUMNS, file=source)
    if items.height == 0:
        raise DataError("the catalogue has no items", file=source)
    ids = items["item_id"].cast(pl.Int64).to_numpy()
    if (ids < 1).any():
        row = int(np.flatnonzero(ids < 1)[0])
        raise DataError(
            f"item ids must be >= 1, got {ids[row]}", file=source, row=row, column="item_id"
        )
    if len(np.unique(ids)) != len(ids):
        raise DataError("duplicate item ids", file=source, column="item_id")
    stock = (
        items["in_stock"].cast(pl.Int64).fill_null(1).to_list()
        if "in_stock" in items.columns
        else [1] * items.height
    )
    if "popularity" in items.columns:
        pop = items["popularity"].cast(pl.Int64).fill_null(0).to_list()
    elif popularity is not None:
        pc = np.asarray(popularity)
        pop = [int(pc[i]) if i < len(pc) else 0 for i in ids]
    else:
        pop = [0] * items.height
    payloads = []
    rows = items.select("external_id", "brand", "category", "price").iter_rows()
    for (ext, brand, cat, price), s_flag, p in zip(rows, stock, pop):
        payloads.append(
            {
                "external_id": str(ext),
                "brand": brand,
                "category": cat,
                "category_path": category_path(cat),
                "price": None if price is None or price != price else float(price),
                "in_stock": 1 if s_flag else 0,
                "popularity": int(p),
                "model_version": model_version,
            }
        )
    return ids, payloads


# -- verification ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyReport:
    """Outcome of verifying a version: recall of ANN vs exact, counts, latency."""

    version: str
    k: int
    n_queries: int
    recall: float
    count: int
    expected_count: int
    p50_ms: float
    p99_ms: float
    hnsw_ef: int
    ok: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample_queries(
    queries: np.ndarray | None, vectors: np.ndarray | None, n: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = queries if queries is not None and len(queries) else vectors
    if src is None or not len(src):
        raise DataError("no query vectors to verify with")
    take = rng.choice(len(src), size=min(n, len(src)), replace=False)
    return np.asarray(src, dtype=np.float32)[np.sort(take)]


TIE_TOLERANCE = 1e-5  # scores this close to the exact k-th score tie with it


def tie_aware_hits(
    ann: list[tuple[int, float]], exact: list[tuple[int, float]], tol: float = TIE_TOLERANCE
) -> int:
    """How many of the exact top-k the ANN answer found, ties at the k-th score included.

    ``ann`` / ``exact``: ``(id, score)`` best first (higher is better).  An ANN id counts
    when the exact answer holds it, or when its score ties with the exact k-th score (which
    of several equal points is "the" k-th is arbitrary: products without a trained signal
    share one vector).  At most ``len(exact)`` hits.
    """
    if not exact:
        return 0
    kth = exact[-1][1]
    wanted = {i for i, _ in exact}
    found = sum(1 for i, s in ann if i in wanted or s >= kth - tol)
    return min(found, len(exact))


def verify_version(
    store: IndexStore,
    version: str,
    *,
    expected_count: int,
    queries: np.ndarray | None = None,
    vectors: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    k: int | None = None,
    hnsw_ef: int | None = None,
    min_recall: float | None = None,
    n_queries: int | None = None,
    reader: QdrantReader | None = None,
) -> VerifyReport:
    """Recall@k of the version's ANN vs exact search, count check and latency.

    The exact answer comes from numpy brute force over ``vectors``/``ids`` when given
    (an independent check of the engine), else from the engine's own exact search.
    Queries: ``n_queries`` (default ``IndexConfig.verify_sample``) sampled from
    ``queries`` (real user vectors), else from ``vectors``.  ``reader``: a reader pinned
    to ``version`` to use (default: one is opened and closed here).
    """
    cfg = store.cfg
    k = k or cfg.verify_k
    ef = hnsw_ef or cfg.hnsw_ef
    min_recall = cfg.verify_min_recall if min_recall is None else min_recall
    if queries is None and vectors is None:
        # no user vectors given: query with stored item vectors (first scroll batch)
        vectors_for_q = next(
            iter(store.scroll_all(version, with_vectors=True)), (None, None, None)
        )[1]
    else:
        vectors_for_q = vectors
    own = reader is None
    if reader is None:
        reader = store.open(version=version)
    try:
        count = reader.count()
        q = _sample_queries(queries, vectors_for_q, n_queries or cfg.verify_sample, cfg.seed)
        if q.shape[1] != reader.dim:
            raise DataError(
                f"query vectors have dimension {q.shape[1]}, the index has {reader.dim}"
            )
        lat = []
        ann: list[list[tuple[int, float]]] = []
        for row in q:
            t = time.perf_counter()
            hits = reader.search(row, k, hnsw_ef=ef, with_payload=False)
            lat.append((time.perf_counter() - t) * 1e3)
            ann.append([(h.item_id, float(h.score)) for h in hits])
        if vectors is not None and ids is not None:
            ex_ids, ex_scores = exact_search(vectors, ids, q, k, cfg.distance)
            exact = [
                [(int(i), float(s)) for i, s in zip(r_ids, r_s) if i >= 0]
                for r_ids, r_s in zip(ex_ids, ex_scores)
            ]
        else:
            res = reader.search_batch(q, k, hnsw_ef=ef, exact=True, with_payload=False)
            exact = [[(h.item_id, float(h.score)) for h in r] for r in res]
        denom = sum(len(e) for e in exact)
        hit = sum(tie_aware_hits(a, e) for a, e in zip(ann, exact))
        recall = hit / denom if denom else 1.0
    finally:
        if own:
            reader.close()
    reasons = []
    if count != expected_count:
        reasons.append(f"count {count} != expected {expected_count}")
    if recall < min_recall:
        reasons.append(f"recall@{k} {recall:.4f} < {min_recall}")
    return VerifyReport(
        version=version,
        k=k,
        n_queries=len(q),
        recall=float(recall),
        count=int(count),
        expected_count=int(expected_count),
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        hnsw_ef=int(ef),
        ok=not reasons,
        reason="; ".join(reasons),
    )


# -- lifecycle ---------------------------------------------------------------------------------
def _cleanup_incomplete(store: IndexStore, alias: str) -> None:
    live = store.alias_target(alias)
    for v in store.incomplete_versions(alias):
        if v != live:
            log.warning("removing incomplete version %s (failed or interrupted build)", v)
            store.drop_version(v)
    if live is None or not live.startswith(f"{alias}_v"):
        return
    live_text = text_version_of(live, alias)
    for v in store.incomplete_versions(text_alias(alias)):
        if v != live_text:
            store.drop_version(v)


def prune(store: IndexStore, alias: str, keep: int) -> list[str]:
    """Drop complete versions beyond the newest ``keep`` (the live one is always kept, and
    so are the full versions that kept delta versions extend)."""
    live = store.alias_target(alias)
    names = [m.version for m in store.versions(alias)]
    keep_set = set(names[-keep:]) | ({live} if live else set())
    keep_set |= {b for b in (store.base_of(n) for n in keep_set) if b is not None}
    dropped = [n for n in names if n not in keep_set]
    for n in dropped:
        store.drop_version(n)
        log.info("pruned old version %s", n)
    # text collections (indexing.text_index) go with their item version
    left = {text_version_of(n, alias) for n in names if n not in dropped}
    texts = store.versions(text_alias(alias))
    left |= {b for b in (store.base_of(m.version) for m in texts if m.version in left) if b}
    for m in texts:
        if m.version not in left:
            store.drop_version(m.version)
            log.info("pruned text collection %s", m.version)
    return dropped


def _validate_points(
    ids: np.ndarray,
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    dim: int | None,
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(
            f"ids must be a 1-d integer array, got {ids.dtype} {ids.shape}", file=source
        )
    vecs = check_vectors(vectors, dim, source=source)
    if len(ids) != len(vecs) or len(ids) != len(payloads):
        raise DataError(
            f"{len(ids)} ids, {len(vecs)} vectors and {len(payloads)} payloads do not line up",
            file=source,
        )
    if (ids < 1).any():
        row = int(np.flatnonzero(ids < 1)[0])
        raise DataError(f"ids must be >= 1 (0 is padding), got {ids[row]}", file=source, row=row)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"duplicate id {uniq[counts > 1][0]}", file=source)
    norms = np.linalg.norm(vecs, axis=1)
    if (norms == 0).any():
        row = int(np.flatnonzero(norms == 0)[0])
        raise DataError("zero vector (no direction under cosine distance)", file=source, row=row)
    return ids.astype(np.int64), vecs


def _finish(
    store: IndexStore,
    alias: str,
    version: str,
    report: VerifyReport,
    *,
    model_version: str,
    config_hash: str,
    t0: float,
    kind: str,
    parent: str | None,
    dim: int,
    provenance: dict[str, Any] | None = None,
    publish: bool = True,
) -> IndexManifest:
    if not report.ok:
        store.drop_version(version)
        raise VerificationError(
            f"version {version} failed verification: {report.reason}; alias {alias!r} unchanged"
        )
    manifest = IndexManifest(
        version=version,
        alias=alias,
        dim=dim,
        count=report.count,
        distance=store.cfg.distance,
        model_version=model_version,
        config_hash=config_hash,
        build_seconds=round(time.perf_counter() - t0, 3),
        created_at=time.time(),
        index_config=config_dict(store.cfg),
        verify=report.to_dict(),
        kind=kind,  # type: ignore[arg-type]
        parent=parent,
        provenance=dict(provenance or {}),
    )
    store.commit(version, manifest)
    if not publish:  # complete and verified, the alias is moved later (publish_version)
        log.info("version %s committed unpublished (alias %s unchanged)", version, alias)
        return manifest
    store.set_alias(alias, version)
    log.info(
        "alias %s -> %s (%d points, recall@%d %.4f)",
        alias,
        version,
        report.count,
        report.k,
        report.recall,
    )
    prune(store, alias, store.cfg.keep_versions)
    return manifest


def without_untrained(
    ids: np.ndarray, vectors: np.ndarray, payloads: Sequence[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], int]:
    """Leave out catalogue rows without a trained vector (all zeros): products a model
    without a content path (ids only, ALS/EASE, the basket tower) never saw in training.

    Returns (ids, vectors, payloads, how many were left out). Such a product has no
    direction under cosine distance, so it cannot be searched for; it stays in the
    catalogue (the service still knows it, and popularity fills may return it) and gets a
    vector once a training run sees it. The count goes into the build report
    (``provenance["left_out_no_vector"]``)."""
    vecs = np.asarray(vectors)
    keep = np.abs(vecs).sum(axis=1) > 0 if len(vecs) else np.zeros(0, bool)
    n = int((~keep).sum())
    if n:
        log.warning("%d catalogue rows have no trained vector: left out of the index", n)
    return (
        np.asarray(ids)[keep],
        vecs[keep],
        [p for p, k in zip(payloads, keep.tolist(), strict=True) if k],
        n,
    )


def build_version(
    store: IndexStore,
    ids: np.ndarray,
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    *,
    model_version: str,
    config_hash: str = "",
    queries: np.ndarray | None = None,
    alias: str | None = None,
    kind: str = "items",
    payload_indexes: dict[str, str] | None = None,
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    publish: bool = True,
    text: TextPoints | None = None,
) -> IndexManifest:
    """Write a new version with these points, verify it and point the alias at it.

    ``text``: the catalogue's text vectors (SearchProducts), written to the version's
    text collection (:mod:`indexing.text_index`) and committed before the alias moves.

    ``provenance`` (model id, catalogue hash, dataset fingerprint) is recorded in the
    manifest; updates of the version carry it over.

    ``publish=False`` commits the verified version without moving the alias (a refresh
    publishes it with :func:`publish_version` after its own commit).

    ``ids (N,)`` ints >= 1, ``vectors (N, D)`` finite, ``payloads`` one dict per point.
    ``queries (Q, D)``: real user vectors for the recall check (a sample of the item
    vectors is used when None).  Raises DataError on bad input before anything is
    written, VerificationError when the version fails verification (alias untouched).
    """
    alias = alias or store.cfg.alias
    ids, vecs = _validate_points(ids, vectors, payloads, None, "vectors")
    if queries is not None:
        queries = check_vectors(queries, vecs.shape[1], source="verification queries")
    t0 = time.perf_counter()
    with store.build_lock(alias):
        _cleanup_incomplete(store, alias)
        version = new_version_name(alias)
        indexes = dict(PAYLOAD_INDEXES if payload_indexes is None else payload_indexes)
        store.create_version(version, vecs.shape[1], indexes)
        try:
            _upsert_batches(store, version, ids, vecs, list(payloads), progress)
            store.seal(version)
            report = verify_version(
                store, version, expected_count=len(ids), queries=queries, vectors=vecs, ids=ids
            )
            if text is not None and report.ok:
                text = text.with_text()
                if len(text.ids):
                    build_text_version(store, alias, version, text, progress=progress)
                else:  # a catalogue without titles: nothing for SearchProducts to search
                    log.info("no product has text: version %s gets no text collection", version)
        except BaseException:
            store.drop_version(version)
            raise
        return _finish(
            store,
            alias,
            version,
            report,
            model_version=model_version,
            config_hash=config_hash or _config_hash(store.cfg),
            t0=t0,
            kind=kind,
            parent=store.alias_target(alias),
            dim=vecs.shape[1],
            provenance=provenance,
            publish=publish,
        )


def _commit_text(
    store: IndexStore, alias: str, tv: str, item_version: str, report: VerifyReport, t0: float
) -> IndexManifest:
    if not report.ok:
        store.drop_version(tv)
        raise VerificationError(
            f"text collection {tv} failed verification: {report.reason}; alias {alias!r} unchanged"
        )
    manifest = IndexManifest(
        version=tv,
        alias=text_alias(alias),
        dim=TEXT_DIM,
        count=report.count,
        distance=store.cfg.distance,
        model_version="all-MiniLM-L6-v2",
        config_hash=_config_hash(store.cfg),
        build_seconds=round(time.perf_counter() - t0, 3),
        created_at=time.time(),
        index_config=config_dict(store.cfg),
        verify=report.to_dict(),
        provenance={"item_version": item_version},
    )
    store.commit(tv, manifest)
    log.info("text collection %s committed (%d points)", tv, report.count)
    return manifest


def build_text_version(
    store: IndexStore, alias: str, item_version: str, text: TextPoints, *, progress: bool = False
) -> IndexManifest:
    """Write, seal, verify and commit the text collection of ``item_version`` (not yet
    published: the caller moves the item alias afterwards)."""
    text = text.with_text()
    ids, vecs = _validate_points(text.ids, text.vectors, text.payloads, TEXT_DIM, "text vectors")
    t0 = time.perf_counter()
    tv = text_version_of(item_version, alias)
    store.drop_version(tv)  # a leftover of an interrupted build of this very name
    store.create_version(tv, TEXT_DIM, dict(PAYLOAD_INDEXES))
    try:
        _upsert_batches(store, tv, ids, vecs, list(text.payloads), progress)
        store.seal(tv)
        report = verify_version(store, tv, expected_count=len(ids), vectors=vecs, ids=ids)
    except BaseException:
        store.drop_version(tv)
        raise
    return _commit_text(store, alias, tv, item_version, report, t0)


def update_text_version(
    store: IndexStore,
    alias: str,
    live_version: str,
    new_version: str,
    *,
    upsert: TextPoints | None = None,
    delete: Sequence[int] = (),
) -> IndexManifest | None:
    """The text collection of an updated item version: a copy-on-write clone of the live
    version's with ``upsert`` / ``delete`` applied, committed before the alias moves.
    None when the live version has no text collection (nothing to carry)."""
    src = text_version_of(live_version, alias)
    if src not in {m.version for m in store.versions(text_alias(alias))}:
        return None
    t0 = time.perf_counter()
    tv = text_version_of(new_version, alias)
    store.drop_version(tv)
    store.clone_version(src, tv)
    try:
        n_before = _text_count(store, alias, src)
        added = 0
        if upsert is not None and len(upsert.ids):
            up = upsert.with_text()
            ids, vecs = _validate_points(up.ids, up.vectors, up.payloads, TEXT_DIM, "text vectors")
            reader = store.open_for_update(version=src)
            try:
                added = len(ids) - len(reader.existing_ids(ids.tolist()))
            finally:
                reader.close()
            _upsert_batches(store, tv, ids, vecs, list(up.payloads), False)
        gone = 0
        if len(delete):
            reader = store.open_for_update(version=src)
            try:
                present = sorted(reader.existing_ids([int(i) for i in delete]))
            finally:
                reader.close()
            store.delete(tv, present)
            gone = len(present)
        store.seal(tv)
        report = verify_version(
            store,
            tv,
            expected_count=n_before + added - gone,
            n_queries=store.cfg.verify_sample_update,
        )
    except BaseException:
        store.drop_version(tv)
        raise
    return _commit_text(store, alias, tv, new_version, report, t0)


def has_text(store: IndexStore, alias: str, version: str) -> bool:
    """True when item version ``version`` has a committed text collection."""
    tv = text_version_of(version, alias)
    return tv in {m.version for m in store.versions(text_alias(alias))}


def _text_count(store: IndexStore, alias: str, version: str) -> int:
    for m in store.versions(text_alias(alias)):
        if m.version == version:
            return m.count
    raise NotFoundError(f"text collection {version} has no manifest")


def publish_version(store: IndexStore, version: str, alias: str | None = None) -> None:
    """Point ``alias`` at the complete version ``version`` (under the build lock), then prune."""
    alias = alias or store.cfg.alias
    with store.build_lock(alias):
        if version not in [m.version for m in store.versions(alias)]:
            raise NotFoundError(f"version {version!r} is not a complete version of {alias!r}")
        if store.alias_target(alias) != version:
            store.set_alias(alias, version)
            log.info("alias %s -> %s (published)", alias, version)
        prune(store, alias, store.cfg.keep_versions)


def _upsert_batches(
    store: IndexStore,
    version: str,
    ids: np.ndarray,
    vecs: np.ndarray,
    payloads: list[dict[str, Any]],
    progress: bool,
) -> None:
    bs = store.cfg.upsert_batch
    starts = range(0, len(ids), bs)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"upsert {version}", unit="batch")  # type: ignore[assignment]
    for a in starts:
        store.upsert(version, ids[a : a + bs], vecs[a : a + bs], payloads[a : a + bs])


def _live(store: IndexStore, alias: str) -> IndexManifest:
    live = store.alias_target(alias)
    if live is None:
        raise IndexUnavailableError(f"index alias {alias!r} does not exist: build it first")
    for m in store.versions(alias):
        if m.version == live:
            return m
    raise IndexUnavailableError(f"alias {alias!r} points at {live}, which has no manifest")


def _unchanged(
    store: IndexStore,
    reader: QdrantReader,
    ids: np.ndarray,
    vecs: np.ndarray,
    payloads: Sequence[dict[str, Any]],
) -> bool:
    """True when every point already exists with the same payload and vector direction."""
    try:
        stored = reader.get_vectors(ids.tolist())  # (N, D)
        stored_payloads = reader.get_payloads(ids.tolist())
    except NotFoundError:
        return False
    want = vecs
    if store.cfg.distance == "cosine":
        want = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    same_vec = np.allclose(stored, want, atol=1e-5)
    same_payload = all(sp == plain_payload(p) for sp, p in zip(stored_payloads, payloads))
    return bool(same_vec and same_payload)


def upsert_points(
    store: IndexStore,
    ids: np.ndarray,
    vectors: np.ndarray,
    payloads: Sequence[dict[str, Any]],
    *,
    queries: np.ndarray | None = None,
    alias: str | None = None,
    text: TextPoints | None = None,
) -> IndexManifest:
    """Insert or replace points: clone the live version, apply, verify, swap.

    The live version's text collection (if any) is carried to the new version with
    ``text`` (these items' text vectors) applied; without ``text`` new items have none.

    Idempotent: when every point is already stored unchanged, nothing is written and
    the live manifest is returned.  The recall check queries with ``queries`` when given,
    else with the upserted vectors themselves.
    """
    alias = alias or store.cfg.alias
    t0 = time.perf_counter()
    with store.build_lock(alias):
        live = _live(store, alias)
        ids, vecs = _validate_points(ids, vectors, payloads, live.dim, "upsert")
        live_reader = store.open_for_update(version=live.version)
        try:
            if _unchanged(store, live_reader, ids, vecs, payloads):
                log.info(
                    "upsert: all %d point(s) already stored unchanged; nothing to do", len(ids)
                )
                return live
            existing = live_reader.existing_ids(ids.tolist())
            version, report = _copy_on_write(
                store, alias, live, live_reader,
                lambda v: _upsert_batches(store, v, ids, vecs, list(payloads), False),
                expected=live.count + len(ids) - len(existing),
                queries=vecs if queries is None else queries,
            )  # fmt: skip
        finally:
            live_reader.close()
        _text_update(store, alias, live.version, version, report, upsert=text)
        return _finish_update(store, alias, live, version, report, t0)


def delete_points(
    store: IndexStore,
    ids: Sequence[int],
    *,
    alias: str | None = None,
    missing_ok: bool = True,
    queries: np.ndarray | None = None,
) -> IndexManifest:
    """Delete points: clone, delete, verify, swap.  Idempotent (absent ids are no-ops)

    unless ``missing_ok=False``, which raises NotFoundError for ids not in the index.
    """
    alias = alias or store.cfg.alias
    want = [int(i) for i in ids]
    t0 = time.perf_counter()
    with store.build_lock(alias):
        live = _live(store, alias)
        live_reader = store.open_for_update(version=live.version)
        try:
            stored = live_reader.existing_ids(want)
            present = [i for i in dict.fromkeys(want) if i in stored]
            missing = sorted(set(want) - set(present))
            if missing and not missing_ok:
                raise NotFoundError(f"item id(s) {missing[:10]} are not in index {alias!r}")
            if not present:
                log.info("delete: none of the %d id(s) is in the index; nothing to do", len(want))
                return live
            if queries is None:  # the deleted points' neighbourhoods must still be found
                queries = live_reader.get_vectors(present[: store.cfg.verify_sample_update])
            version, report = _copy_on_write(
                store, alias, live, live_reader,
                lambda v: store.delete(v, present),
                expected=live.count - len(present),
                queries=queries,
            )  # fmt: skip
        finally:
            live_reader.close()
        _text_update(store, alias, live.version, version, report, delete=present)
        return _finish_update(store, alias, live, version, report, t0)


def _copy_on_write(
    store: IndexStore,
    alias: str,
    live: IndexManifest,
    live_reader: QdrantReader,
    apply: Callable[[str], None],
    *,
    expected: int,
    queries: np.ndarray,
) -> tuple[str, VerifyReport]:
    """An update of the live version: clone it (full copy or delta layer), ``apply`` the
    change to the clone, seal and verify it (``expected`` points); the clone is dropped
    when anything fails.  Returns (new version, verification report); not yet published."""
    _cleanup_incomplete(store, alias)
    version = new_version_name(alias)
    store.clone_version(live.version, version)
    try:
        apply(version)
        store.seal(version)
        report = _verify_update(store, version, expected, queries, live_reader)
    except BaseException:
        store.drop_version(version)
        raise
    return version, report


def _text_update(
    store: IndexStore,
    alias: str,
    live: str,
    version: str,
    report: VerifyReport,
    *,
    upsert: TextPoints | None = None,
    delete: Sequence[int] = (),
) -> None:
    """Carry the text collection to a verified updated version (before its alias moves);
    a failure drops the new item version too (the alias stays where it was)."""
    if not report.ok:
        return
    try:
        update_text_version(store, alias, live, version, upsert=upsert, delete=delete)
    except BaseException:
        store.drop_version(version)
        raise


def _finish_update(
    store: IndexStore,
    alias: str,
    live: IndexManifest,
    version: str,
    report: VerifyReport,
    t0: float,
) -> IndexManifest:
    """Publish an updated version; its manifest carries the live one's model and lineage."""
    return _finish(
        store, alias, version, report,
        model_version=live.model_version, config_hash=live.config_hash, t0=t0,
        kind=live.kind, parent=live.version, dim=live.dim, provenance=live.provenance,
    )  # fmt: skip


def _verify_update(
    store: IndexStore,
    version: str,
    expected: int,
    queries: np.ndarray,
    live_reader: QdrantReader,
) -> VerifyReport:
    """Verify an updated version with a reader that shares the live reader's loaded data."""
    reader = store.open_for_update(version=version, like=live_reader)
    try:
        return verify_version(
            store,
            version,
            expected_count=expected,
            queries=queries,
            n_queries=store.cfg.verify_sample_update,
            reader=reader,
        )
    finally:
        reader.close()


def rollback(store: IndexStore, alias: str | None = None, to: str | None = None) -> IndexManifest:
    """Point the alias at ``to`` or, by default, the complete version before the live one."""
    alias = alias or store.cfg.alias
    with store.build_lock(alias):
        versions = store.versions(alias)
        live = store.alias_target(alias)
        names = [m.version for m in versions]
        if to is None:
            if live not in names or names.index(live) == 0:
                raise NotFoundError(f"no version older than {live} to roll back to for {alias!r}")
            to = names[names.index(live) - 1]
        if to not in names:
            raise NotFoundError(
                f"version {to!r} is not a complete version of {alias!r}; have {names}"
            )
        store.set_alias(alias, to)
        log.info("rolled back alias %s: %s -> %s", alias, live, to)
        return versions[names.index(to)]


def list_versions(store: IndexStore, alias: str | None = None) -> list[tuple[IndexManifest, bool]]:
    """Complete versions of ``alias``, oldest first, with a flag for the live one."""
    alias = alias or store.cfg.alias
    live = store.alias_target(alias)
    return [(m, m.version == live) for m in store.versions(alias)]


def user_query_vectors(model: Any, ds: Any, n: int, seed: int) -> Any:
    """(Q, D) user vectors of up to ``n`` dataset users with history (real queries), the
    users and the interactions; users whose vector is zero are left out."""
    import numpy as np

    from towers.sequences import Interactions, batch_for_users

    inter = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
    users = np.flatnonzero(inter.lengths() > 0)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(users, size=min(n, len(users)), replace=False))
    enc = model.user_encoder()
    out = [
        enc.encode(batch_for_users(inter, users[a : a + 256], model.max_len))
        for a in range(0, len(users), 256)
    ]
    vecs = np.concatenate(out) if out else np.zeros((0, model.dim), np.float32)
    # a model may give a user no direction (e.g. nothing it reads in the history): such a
    # query has no cosine order, so it is no test of the index (and no user point)
    ok = np.linalg.norm(vecs, axis=1) > 0
    return vecs[ok], users[ok], inter
