"""Retrieval: the user tower and the vector search of concurrent requests, run as one batch.

:class:`Retrieval` encodes every request of a batch in one forward, then searches each
group of requests that share an index object: one matrix product over the live version's
vectors in memory (:class:`indexing.exact.ExactIndex`) when the catalogue is below
``exact_max_items`` and the filters allow it, else one batched index query per (filter,
n) group.  Every index read goes through :func:`versioned`, which reports the version that
answered and turns engine faults into :class:`~ecomrec.errors.IndexUnavailableError` (the
caller then serves the degraded answer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError, NotFoundError
from indexing.base import Hit, ItemIndex, SearchFilter
from indexing.exact import ExactSearch
from serving.batching import Batcher
from serving.catalog import ItemCatalog
from serving.config import ServeConfig
from serving.encoders import (
    EncoderUnavailableError,
    MicroBatchingEncoder,
    concat_batches,
    encode_with_status,
)
from serving.requests import DeadlineExceededError, UnavailableError
from towers.sequences import SequenceBatch

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class RetrievalWork:
    """One request's user-tower input and search, for the (batched) retrieval stage."""

    batch: SequenceBatch  # one row
    n: int  # candidates wanted
    flt: SearchFilter
    exclude: np.ndarray  # (E,) int64 item ids the answer must not hold
    index: ItemIndex | None
    deadline: float  # time.monotonic()


@dataclass
class Retrieved:
    """Candidates of one request, best first, and how they were found."""

    ids: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float32 cosine
    version: str  # index version that answered
    encoder_degraded: bool
    encode_s: float  # this request's share of the batch: the batch's encode time
    ann_s: float
    exact: bool


def versioned(index: ItemIndex, query: Callable[[], _T]) -> tuple[_T, str]:
    """Run an index query and return it with the version it searched: the alias is read
    before and after, and the query repeated (up to 3 times) when a swap happened in
    between.  Engine faults (closed shard, I/O) become IndexUnavailableError, so the
    caller serves the degraded answer."""
    try:
        for _ in range(3):
            v0 = index.version
            hits = query()
            v1 = index.version
            if v0 == v1:
                return hits, v0
        return hits, v1
    except (InvalidArgumentError, NotFoundError, IndexUnavailableError):
        raise
    except Exception as e:
        log.warning("index search failed: %r", e)
        raise IndexUnavailableError(f"index search failed: {e}") from e


class Retrieval:
    """User vectors and candidate search for the engine, batched over concurrent requests.

    ``encoder`` and ``cfg`` may be replaced while serving (the engine forwards its own).
    """

    def __init__(self, cfg: ServeConfig, encoder: Any, catalog: ItemCatalog) -> None:
        self.cfg = cfg
        self.encoder = encoder
        self.catalog = catalog
        # exact numpy search below the crossover (the catalogue's masks filter it)
        self.exact: ExactSearch | None = (
            ExactSearch(catalog, cfg.exact_max_items) if cfg.exact_max_items > 0 else None
        )
        self._coming = 0  # requests between arrival and the retrieval batcher
        self._coming_lock = threading.Lock()
        self.batcher: Batcher[RetrievalWork, Retrieved] | None = (
            Batcher(
                self.retrieve_many,
                cfg.batch_max,
                cfg.batch_wait_ms / 1e3,
                "ecomrec-retrieval",
                # requests still before this stage: a lone request runs inline, and a batch
                # waits for company only while some is on its way
                coming=lambda: self._coming,
            )
            if cfg.batch_max > 1
            else None
        )

    def arrive(self, d: int) -> None:
        """Count a request in (+1) or out (-1) of the stretch before the batcher."""
        with self._coming_lock:
            self._coming += d

    def warm(self, index: ItemIndex, *, block: bool) -> None:
        """Load the exact matrix of ``index``'s live version (now when ``block``, else in
        the background); failures leave the index path answering and are retried."""
        if self.exact is None:
            return
        try:
            self.exact.matrix(index, index.version, block=block)
        except Exception as e:  # a broken index shows up on search
            if block:
                log.warning("exact search: cannot read the index version: %r", e)

    # -- one request ------------------------------------------------------------------------
    def search(
        self,
        index: ItemIndex | None,
        vector: np.ndarray,
        n: int,
        flt: SearchFilter,
        exclude: Sequence[int],
    ) -> tuple[list[Hit], str]:
        """ANN search on ONE index version; returns (hits, version) (see :func:`versioned`)."""
        if index is None:
            raise IndexUnavailableError("no index loaded")
        return versioned(
            index,
            lambda: index.search(
                vector, n, flt, exclude_ids=exclude, hnsw_ef=self.cfg.hnsw_ef, with_payload=False
            ),
        )

    def retrieve(self, work: RetrievalWork) -> Retrieved:
        """One request's retrieval, through the batcher when batching is on."""
        if self.batcher is None:
            r = self.retrieve_many([work])[0]
        else:
            try:
                r = self.batcher.run(work, max(work.deadline - time.monotonic(), 0.0) + 0.05)
            except TimeoutError:
                raise DeadlineExceededError("deadline exceeded in encode/ann") from None
        if isinstance(r, BaseException):
            raise r
        return r

    def item_vectors(self, index: ItemIndex | None, items: list[int], field: str) -> np.ndarray:
        """Stored vectors of catalogue items; NOT_FOUND names the shop's ids, every index
        fault (missing, unloadable, damaged) is IndexUnavailableError."""
        if index is None:
            raise IndexUnavailableError("no index loaded")
        try:
            vecs = np.asarray(index.get_vectors(items), np.float32)  # (n, D)
        except NotFoundError:
            try:
                have = index.existing_ids(items)
            except Exception:
                have = set()
            gone = [self.catalog.external_ids[i] for i in items if i not in have]
            raise NotFoundError(
                f"{field}: {', '.join(map(repr, gone[:10]))} is not in the index (deleted?)"
            ) from None
        except (InvalidArgumentError, IndexUnavailableError):
            raise
        except Exception as e:
            raise IndexUnavailableError(f"index lookup failed: {e}") from e
        if not np.isfinite(vecs).all():
            raise IndexUnavailableError("the index returned non-finite vectors")
        return vecs

    # -- a batch ----------------------------------------------------------------------------
    def retrieve_many(self, works: Sequence[RetrievalWork]) -> list[Retrieved | BaseException]:
        """Encode every request in one forward, then search: one matrix product (exact) or
        one batched index query per (index, filter, n) group.  Per-request failures come
        back as exception instances."""
        t0 = time.perf_counter()
        enc = self.encoder
        if isinstance(enc, MicroBatchingEncoder):
            enc = enc.inner  # this batcher already merges the requests
        live = [w for w in works if w.deadline > time.monotonic()]
        out: dict[int, Retrieved | BaseException] = {
            id(w): DeadlineExceededError("deadline exceeded before encode")
            for w in works
            if w.deadline <= time.monotonic()
        }
        if live:
            timeout = max(max(w.deadline for w in live) - time.monotonic(), 0.001)
            try:
                vecs, degraded = encode_with_status(
                    enc, concat_batches([w.batch for w in live]), timeout
                )  # (B, D)
            except EncoderUnavailableError as e:
                err = UnavailableError(f"user encoder unavailable: {e}")
                return [err for _ in works]
            t1 = time.perf_counter()
            groups: dict[int, list[int]] = {}
            for i, w in enumerate(live):
                groups.setdefault(id(w.index), []).append(i)
            for rows in groups.values():
                for i, r in zip(rows, self._search_group([live[i] for i in rows], vecs[rows])):
                    out[id(live[i])] = r
            t2 = time.perf_counter()
            for w in live:
                r = out[id(w)]
                if isinstance(r, Retrieved):
                    r.encoder_degraded = degraded
                    r.encode_s, r.ann_s = t1 - t0, t2 - t1
        return [out[id(w)] for w in works]

    def _search_group(
        self, works: Sequence[RetrievalWork], vecs: np.ndarray
    ) -> list[Retrieved | BaseException]:
        """Search for requests that share one index object; ``vecs`` (B, D)."""
        index = works[0].index
        if index is None:
            return [IndexUnavailableError("no index loaded") for _ in works]
        try:
            version = index.version
        except Exception as e:  # the alias is gone: every request falls back
            err = e if isinstance(e, IndexUnavailableError) else IndexUnavailableError(str(e))
            return [err for _ in works]
        exact = self.exact.index(index, version) if self.exact is not None else None
        if exact is not None and all(exact.supports(w.flt) for w in works):
            found = exact.search_arrays(
                vecs, [w.n for w in works], [w.flt for w in works], [w.exclude for w in works]
            )
            return [Retrieved(ids, sc, exact.version, False, 0.0, 0.0, True) for ids, sc in found]
        # the index: one batched query per (filter, n) group
        res: list[Retrieved | BaseException] = [IndexUnavailableError("not searched")] * len(works)
        by: dict[tuple[SearchFilter, int], list[int]] = {}
        for i, w in enumerate(works):
            by.setdefault((w.flt, w.n), []).append(i)
        for (flt, n), rows in by.items():
            try:
                hits, ver = self._search_batch(
                    index, vecs[rows], n, flt, [works[i].exclude.tolist() for i in rows]
                )
            except (InvalidArgumentError, NotFoundError, IndexUnavailableError) as e:
                for i in rows:
                    res[i] = e
                continue
            for i, h in zip(rows, hits):
                res[i] = Retrieved(
                    np.array([x.item_id for x in h], np.int64),
                    np.array([x.score for x in h], np.float32),
                    ver,
                    False,
                    0.0,
                    0.0,
                    False,
                )
        return res

    def _search_batch(
        self,
        index: ItemIndex,
        vectors: np.ndarray,
        n: int,
        flt: SearchFilter,
        exclude: list[list[int]],
    ) -> tuple[list[list[Hit]], str]:
        """:meth:`search` for a batch (one ``search_batch`` call for more than one row)."""
        if len(vectors) == 1:
            hits, version = self.search(index, vectors[0], n, flt, exclude[0])
            return [hits], version
        return versioned(
            index,
            lambda: index.search_batch(
                vectors, n, flt, exclude_ids=exclude, hnsw_ef=self.cfg.hnsw_ef, with_payload=False
            ),
        )
