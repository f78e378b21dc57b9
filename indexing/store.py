"""Write side of an index backend (``IndexStore``) and the query logic both readers share.

A store holds named *versions* (one Qdrant shard or collection each) and *aliases*
pointing at one complete version.  A version is complete once its manifest is
committed; builds write a new version, verify it, then swap the alias.  Published
versions are never written to again: incremental updates clone the live version,
apply the change to the clone and swap (copy-on-write), so a reader never sees a
half-applied update and a rollback is an alias swap.  The embedded backend "clones" a
large version as a delta over it (only the changed points are written; see
:mod:`indexing.qdrant_edge`).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from ecomrec.errors import InvalidArgumentError
from indexing.base import (
    Hit,
    IndexConfig,
    IndexManifest,
    ItemIndex,
    SearchFilter,
    check_query_vector,
)

log = logging.getLogger(__name__)


class IndexStore(Protocol):
    """Versions and aliases of one backend (embedded directory or Qdrant server)."""

    cfg: IndexConfig

    def create_version(self, version: str, dim: int, payload_indexes: dict[str, str]) -> None:
        """Create an empty, incomplete version ready for upserts."""
        ...

    def clone_version(self, src: str, dst: str) -> None:
        """Create the incomplete version ``dst`` holding a copy of complete version ``src``."""
        ...

    def upsert(
        self, version: str, ids: np.ndarray, vectors: np.ndarray, payloads: list[dict[str, Any]]
    ) -> None:
        """Insert or replace points in an incomplete version."""
        ...

    def delete(self, version: str, ids: Sequence[int]) -> None:
        """Delete points (missing ids are ignored) from an incomplete version."""
        ...

    def seal(self, version: str) -> None:
        """Build the HNSW graph and flush; the version can now be opened for reading."""
        ...

    def commit(self, version: str, manifest: IndexManifest) -> None:
        """Write the manifest: the version becomes complete (eligible for an alias)."""
        ...

    def versions(self, alias: str) -> list[IndexManifest]:
        """Complete versions built for ``alias``, oldest first."""
        ...

    def base_of(self, version: str) -> str | None:
        """The version a delta version reads through to (None: the version stands alone)."""
        ...

    def incomplete_versions(self, alias: str) -> list[str]:
        """Versions for ``alias`` without a committed manifest (failed or running builds)."""
        ...

    def alias_target(self, alias: str) -> str | None:
        """The version ``alias`` points at, or None when it does not exist."""
        ...

    def set_alias(self, alias: str, version: str) -> None:
        """Atomically point ``alias`` at the complete version ``version``."""
        ...

    def drop_version(self, version: str) -> None:
        """Delete a version and its data."""
        ...

    def build_lock(self, alias: str) -> AbstractContextManager[None]:
        """Exclusive lock for writers of ``alias`` (IndexUnavailableError when held)."""
        ...

    def open(self, alias: str | None = None, version: str | None = None) -> QdrantReader:
        """A reader following ``alias`` (default: the config's) or pinned to ``version``."""
        ...

    def open_for_update(
        self, alias: str | None = None, version: str | None = None, like: Any = None
    ) -> QdrantReader:
        """A reader for a writer's own checks (upsert/delete): it may skip hashing file
        contents (sizes only) and reuse what reader ``like`` has loaded."""
        ...

    def scroll_all(
        self, version: str, with_vectors: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]]:
        """Batches ``(ids, vectors (n, D) or None, payloads)`` of every point in a version."""
        ...

    def close(self) -> None:
        """Release every open shard/connection."""
        ...


def plain_payload(v: Any) -> Any:
    """Payload values as plain JSON types (numpy scalars are not accepted by the engines)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return [plain_payload(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain_payload(x) for k, x in v.items()}
    return v


def fetch_limit(k: int, overfetch: float) -> int:
    """Number of hits to fetch for ``k`` results with an over-fetch factor (for re-ranking)."""
    if k < 1:
        raise InvalidArgumentError("k", f"must be >= 1, got {k}")
    if not overfetch >= 1.0:
        raise InvalidArgumentError("overfetch", f"must be >= 1, got {overfetch}")
    return max(k, math.ceil(k * overfetch))


class QdrantReader(abc.ABC, ItemIndex):
    """Shared query planning: validation, filters, exclusions, exact fallback, batching.

    Subclasses supply the backend primitives (``_resolve``, ``_query``, ``_count``,
    ``_retrieve``).  ``_resolve`` returns a handle on ONE version; a query runs
    entirely on that handle.
    """

    def __init__(self, cfg: IndexConfig, alias: str | None, version: str | None) -> None:
        self.cfg = cfg
        self.alias = alias or cfg.alias
        self._pinned = version
        self._lock = threading.Lock()
        self._tls = threading.local()  # .version: what this thread's last query ran on
        self._estimates: dict[tuple[str, SearchFilter], int] = {}

    # -- backend primitives -------------------------------------------------------------
    @abc.abstractmethod
    def _resolve(self) -> tuple[str, Any]:
        """(version name, backend handle) of the version to query now."""

    @abc.abstractmethod
    def _query(
        self,
        handle: Any,
        vectors: np.ndarray,
        limit: int,
        flts: list[Any],
        hnsw_ef: int,
        exact: list[bool],
        with_payload: bool,
    ) -> list[list[Hit]]:
        """One batch of queries ``(B, D)``, each with its own filter (SearchFilter/UserFilter)."""

    @abc.abstractmethod
    def _count(self, handle: Any, flt: Any, exact: bool = True) -> int:
        """Number of points matching ``flt`` (SearchFilter/UserFilter/None); ``exact=False``
        is the engine's cheap cardinality estimate (for query planning)."""

    @abc.abstractmethod
    def _retrieve(
        self, handle: Any, ids: list[int], with_vectors: bool
    ) -> dict[int, tuple[np.ndarray | None, dict[str, Any]]]:
        """Stored vector/payload for the ids that exist."""

    @abc.abstractmethod
    def _manifest(self, version: str) -> IndexManifest:
        """Manifest of a complete version."""

    # -- ItemIndex ----------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._resolve()[0]

    @property
    def dim(self) -> int:
        return self.manifest().dim

    def manifest(self) -> IndexManifest:
        return self._manifest(self.version)

    def count(self, flt: SearchFilter | None = None) -> int:
        _, handle = self._resolve()
        return self._count(handle, None if flt is None or flt.is_empty else flt)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        exclude_ids: Sequence[int] = (),
        hnsw_ef: int | None = None,
        *,
        overfetch: float = 1.0,
        with_payload: bool = True,
    ) -> list[Hit]:
        """Top-``k`` (times ``overfetch``) hits for one vector ``(D,)``, best first."""
        v = np.asarray(vector, dtype=np.float32)
        return self.search_batch(
            v.reshape(1, -1) if v.ndim == 1 else v,
            k,
            flt,
            [exclude_ids],
            hnsw_ef,
            overfetch=overfetch,
            with_payload=with_payload,
            _single=True,
        )[0]

    def search_batch(
        self,
        vectors: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        exclude_ids: Sequence[Sequence[int]] | None = None,
        hnsw_ef: int | None = None,
        *,
        overfetch: float = 1.0,
        with_payload: bool = True,
        exact: bool = False,
        _single: bool = False,
    ) -> list[list[Hit]]:
        """Top-``k`` hits for each row of ``vectors`` ``(B, D)``; one version for the batch.

        Scores a healthy index cannot produce (NaN, infinite, a cosine outside [-1, 1]:
        a damaged vector file) raise :class:`~indexing.integrity.IndexCorruptError`.
        """
        out = self._search_batch(
            vectors, k, flt, exclude_ids, hnsw_ef,
            overfetch=overfetch, with_payload=with_payload, exact=exact, _single=_single,
        )  # fmt: skip
        self._check_scores(out)
        return out

    def _check_scores(self, results: list[list[Hit]]) -> None:
        scores = np.fromiter((h.score for hits in results for h in hits), np.float64)
        if not len(scores):
            return
        bound = 1.0 + 1e-3 if self.manifest().distance == "cosine" else np.inf
        bad = ~np.isfinite(scores) | (np.abs(scores) > bound)
        if bad.any():
            from indexing.integrity import IndexCorruptError

            version = getattr(self._tls, "version", "?")
            err = IndexCorruptError(
                f"index version {version} returned {int(bad.sum())} impossible score(s) "
                f"(e.g. {scores[bad][0]!r}): its vector data is damaged"
            )
            log.error("%s", err)
            self._quarantine(version, err)
            raise err

    def _quarantine(self, version: str, err: Exception) -> None:
        """Stop serving a version found damaged (backends that can; default: nothing)."""
        return None

    def _search_batch(
        self,
        vectors: np.ndarray,
        k: int,
        flt: SearchFilter | None,
        exclude_ids: Sequence[Sequence[int]] | None,
        hnsw_ef: int | None,
        *,
        overfetch: float,
        with_payload: bool,
        exact: bool,
        _single: bool,
    ) -> list[list[Hit]]:
        limit = fetch_limit(k, overfetch)
        ef = self.cfg.hnsw_ef if hnsw_ef is None else int(hnsw_ef)
        if ef < 1:
            raise InvalidArgumentError("hnsw_ef", f"must be >= 1, got {ef}")
        version, handle = self._resolve()
        self._tls.version = version
        dim = self._manifest(version).dim
        arr = np.asarray(vectors, dtype=np.float32)
        if _single:
            check_query_vector(arr.reshape(-1) if arr.shape[0] == 1 else arr, dim)
        elif arr.ndim != 2 or arr.shape[1] != dim:
            raise InvalidArgumentError("vectors", f"expected shape (B, {dim}), got {arr.shape}")
        elif not np.isfinite(arr).all():
            raise InvalidArgumentError("vectors", "contains NaN or infinite values")
        b = arr.shape[0]
        if exclude_ids is not None and len(exclude_ids) != b:
            raise InvalidArgumentError(
                "exclude_ids", f"expected one list per query ({b}), got {len(exclude_ids)}"
            )
        base = flt or SearchFilter()
        flts = [base.with_excluded(exclude_ids[i] if exclude_ids else ()) for i in range(b)]
        if exact:
            return self._query(handle, arr, limit, list(flts), ef, [True] * b, with_payload)
        payload_only = SearchFilter(
            categories=base.categories,
            brands=base.brands,
            price_min=base.price_min,
            price_max=base.price_max,
            in_stock=base.in_stock,
        )
        if payload_only.is_empty:
            return self._query(handle, arr, limit, list(flts), ef, [False] * b, with_payload)
        # A payload filter.  HNSW that checks the filter while walking the graph loses
        # recall badly on this engine (measured: recall@10 0.66 at ef 128 for an 16%
        # filter on clustered data), so the planner picks by the candidate count n:
        #   n < exact_threshold        -> exact search over the candidates (cheap, exact);
        #   selectivity >= postfilter  -> unfiltered HNSW for limit/selectivity*2 ids, then
        #                                 the filter + exact scoring on just those ids (if too
        #                                 few pass: once more with 4x the ids, then exact
        #                                 search over all candidates);
        #   rarer                      -> filtered HNSW with ef scaled by 1/selectivity.
        n = self._estimate(version, handle, payload_only)
        if n < self.cfg.exact_threshold:
            return self._query(handle, arr, limit, list(flts), ef, [True] * b, with_payload)
        total = self._manifest(version).count
        total = total if total > 0 else self._count(handle, None)
        sel = max(n / max(total, 1), 1e-9)
        n_excl = max((len(f.exclude_ids) for f in flts), default=0)
        fetch = math.ceil(limit / sel * 2) + n_excl
        if sel >= self.cfg.postfilter_min_selectivity and fetch <= self.cfg.postfilter_max_fetch:
            # phase 1: ids only (no payload transfer); phase 2: the engine applies the
            # filter to those few ids and scores them exactly.
            raw = self._query(handle, arr, fetch, [None] * b, max(ef, fetch), [False] * b, False)
            narrowed = [
                dataclasses.replace(f, only_ids=tuple(h.item_id for h in hits))
                for f, hits in zip(flts, raw)
            ]
            out = self._query(handle, arr, limit, list(narrowed), ef, [True] * b, with_payload)
            short = [i for i, hits in enumerate(out) if len(hits) < limit]
            wider = min(4 * fetch, self.cfg.postfilter_max_fetch)
            if short and wider > fetch:  # unlucky draw: once more with 4x the ids
                arr_s = arr[short]
                raw = self._query(
                    handle, arr_s, wider, [None] * len(short), max(ef, wider),
                    [False] * len(short), False,
                )  # fmt: skip
                narrowed = [
                    dataclasses.replace(flts[i], only_ids=tuple(h.item_id for h in hits))
                    for i, hits in zip(short, raw)
                ]
                redo = self._query(
                    handle, arr_s, limit, narrowed, ef, [True] * len(short), with_payload
                )
                for i, hits in zip(short, redo):
                    out[i] = hits
                short = [i for i in short if len(out[i]) < limit]
            if short:  # still too few matches among the fetched: exact over all candidates
                redo = self._query(
                    handle,
                    arr[short],
                    limit,
                    [flts[i] for i in short],
                    ef,
                    [True] * len(short),
                    with_payload,
                )
                for i, hits in zip(short, redo):
                    out[i] = hits
            return out
        ef_f = min(self.cfg.max_filtered_ef, max(ef, math.ceil(ef / sel)))
        return self._query(handle, arr, limit, list(flts), ef_f, [False] * b, with_payload)

    def _estimate(self, version: str, handle: Any, flt: SearchFilter) -> int:
        """The engine's cardinality estimate for a payload filter, cached per version (a
        version's contents never change; ~0.3 ms per call at 100k points)."""
        key = (version, flt)
        n = self._estimates.get(key)
        if n is None:
            n = self._count(handle, flt, exact=False)
            if len(self._estimates) >= 4096:
                self._estimates.clear()
            self._estimates[key] = n
        return n

    def count_raw(self, flt: Any) -> int:
        """Exact count for any filter type the backend translates (None = all points)."""
        _, handle = self._resolve()
        return self._count(handle, flt)

    def search_raw(
        self,
        vectors: np.ndarray,
        limit: int,
        flts: list[Any],
        hnsw_ef: int | None = None,
        exact: bool = False,
    ) -> tuple[str, list[list[Hit]]]:
        """Unplanned batch query (any filter type the backend translates); returns the version."""
        version, handle = self._resolve()
        ef = self.cfg.hnsw_ef if hnsw_ef is None else hnsw_ef
        arr = np.asarray(vectors, dtype=np.float32)
        return version, self._query(handle, arr, limit, flts, ef, [exact] * len(arr), True)

    def get_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors ``(N, D)`` (unit-normalised under cosine distance)."""
        version, handle = self._resolve()
        want = [int(i) for i in ids]
        got = self._retrieve(handle, want, True)
        missing = [i for i in want if i not in got]
        if missing:
            from ecomrec.errors import NotFoundError

            raise NotFoundError(f"unknown item id(s) {missing[:10]} in index {self.alias!r}")
        if not want:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.stack([np.asarray(got[i][0], dtype=np.float32) for i in want])  # (N, D)
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(out.astype(np.float64), axis=1)  # (N,) unit under cosine
        bad = ~np.isfinite(norms)
        if self.manifest().distance == "cosine":
            bad |= np.abs(norms - 1.0) > 1e-2
        if bad.any():
            from indexing.integrity import IndexCorruptError

            err = IndexCorruptError(
                f"index version {version} holds {int(bad.sum())} damaged vector(s) "
                f"(item id {want[int(np.flatnonzero(bad)[0])]})"
            )
            log.error("%s", err)
            self._quarantine(version, err)
            raise err
        return out

    def existing_ids(self, ids: Sequence[int]) -> set[int]:
        """The subset of ``ids`` stored in the live version (one round trip)."""
        _, handle = self._resolve()
        return set(self._retrieve(handle, [int(i) for i in ids], False))

    def get_payloads(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        _, handle = self._resolve()
        want = [int(i) for i in ids]
        got = self._retrieve(handle, want, False)
        missing = [i for i in want if i not in got]
        if missing:
            from ecomrec.errors import NotFoundError

            raise NotFoundError(f"unknown item id(s) {missing[:10]} in index {self.alias!r}")
        return [got[i][1] for i in want]

    def close(self) -> None:  # pragma: no cover - overridden
        return None


def exact_search(
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    distance: str = "cosine",
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` in numpy: ``(ids (Q, k), scores (Q, k))``, ``-1`` where fewer.

    ``vectors (N, D)``, ``ids (N,)``, ``queries (Q, D)``; ``mask (N,)`` or ``(Q, N)`` keeps
    the points that may be returned.  Ties break by lower id.
    """
    x = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(queries, dtype=np.float32)
    ids = np.asarray(ids)
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    n = len(x)
    kk = min(k, n)
    top_i = np.full((len(q), kk), -1, dtype=np.int64)
    top_s = np.full((len(q), kk), -np.inf, dtype=np.float32)
    for a in range(0, len(q), 64):  # 64 queries at a time: (64, N) scores, not (Q, N)
        scores = q[a : a + 64] @ x.T  # (b, N)
        if mask is not None:
            scores = np.where(mask if mask.ndim == 1 else mask[a : a + 64], scores, -np.inf)
        if kk < n:  # the k-th best score per row; every point tying with it stays a candidate
            kth = -np.partition(-scores, kk - 1, axis=1)[:, kk - 1 : kk]  # (b, 1)
        else:
            kth = np.full((len(scores), 1), -np.inf, dtype=scores.dtype)
        for r in range(len(scores)):
            cand = np.flatnonzero(scores[r] >= kth[r, 0])  # ~k points unless there are ties
            order = cand[np.lexsort((ids[cand], -scores[r, cand]))][:kk]
            top_s[a + r] = scores[r, order]
            top_i[a + r] = np.where(np.isfinite(top_s[a + r]), ids[order], -1)
    return top_i, top_s
