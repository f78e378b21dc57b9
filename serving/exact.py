"""Exact (brute-force) item search in numpy for catalogues small enough to scan.

For a catalogue of some 10^4 items a dot product against every item vector costs tens of
microseconds, far less than an HNSW query through the engine's Python binding, and it is
exact.  :class:`ExactSearch` keeps one ``(N, D)`` matrix per index version (read once from
the index, so the vectors are the ones the index serves), answers batches of queries with
one matrix product, and applies the request filters with the index's semantics through
:class:`~serving.catalog.ItemCatalog` masks (cached per filter, never rebuilt per request).

Above ``max_items`` (``ServeConfig.exact_max_items``, the measured crossover) the engine
keeps using the index's ANN search.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexing.base import SearchFilter
from serving.catalog import ItemCatalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExactMatrix:
    """One index version's vectors in memory."""

    version: str
    ids: np.ndarray  # (N,) int64 item ids, ascending
    vectors: np.ndarray  # (N, D) float32, unit rows (cosine)
    row_of: np.ndarray  # (n_items + 1,) int64 row of an item id, -1 when not indexed


def supports_exact(flt: SearchFilter) -> bool:
    """Filters the catalogue masks reproduce (brands and ``only_ids`` go to the index)."""
    return not flt.brands and not flt.only_ids


class ExactSearch:
    """Brute-force top-n over the live index version's vectors, for many queries at once."""

    def __init__(self, catalog: ItemCatalog, max_items: int, mask_cache: int = 256) -> None:
        self.catalog = catalog
        self.max_items = max_items
        self._mats: dict[str, ExactMatrix] = {}
        self._too_big: set[str] = set()
        self._loading: set[str] = set()
        self._lock = threading.Lock()
        self._masks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._mask_cache = mask_cache
        self.loads = 0

    # -- matrices per version ---------------------------------------------------------------
    def matrix(self, index: Any, version: str, block: bool = False) -> ExactMatrix | None:
        """The matrix of ``version`` when loaded; else start loading it (in the background
        unless ``block``) and return None (the caller uses the index meanwhile)."""
        m = self._mats.get(version)
        if m is not None or version in self._too_big or self.max_items <= 0:
            return m
        with self._lock:
            if version in self._loading:
                return None
            self._loading.add(version)
        if block:
            self._load(index, version)
            return self._mats.get(version)
        threading.Thread(
            target=self._load, args=(index, version), name="ecomrec-exact-load", daemon=True
        ).start()
        return None

    def _load(self, index: Any, version: str) -> None:
        try:
            n = index.manifest().count if hasattr(index, "manifest") else -1
            if n > self.max_items or not hasattr(index, "get_vectors"):
                log.info(
                    "exact search off for version %s (%d items > %d)", version, n, self.max_items
                )
                self._too_big.add(version)
                return
            all_ids = range(1, self.catalog.n_items + 1)
            ids = np.array(sorted(index.existing_ids(all_ids)), np.int64)  # (N,)
            if n > len(ids):
                # items beyond the catalogue (index-only): the catalogue masks cannot filter
                # them, so the index answers (its payloads carry the filter fields)
                log.info(
                    "exact search off for version %s (%d of its %d items are not in the "
                    "serving catalogue)",
                    version,
                    n - len(ids),
                    n,
                )
                self._too_big.add(version)
                return
            vecs = np.ascontiguousarray(index.get_vectors(ids.tolist()), np.float32)  # (N, D)
            if index.version != version:  # the alias moved while reading: not this version
                return
            norms = np.linalg.norm(vecs, axis=1) if len(vecs) else np.ones(0, np.float32)
            if not np.isfinite(vecs).all() or not (np.abs(norms - 1.0) < 1e-2).all():
                # damaged data (cosine vectors are stored unit-norm): the index path, with
                # its integrity checks, answers or degrades instead
                log.error("exact search off for version %s: damaged vectors", version)
                self._too_big.add(version)
                return
            row_of = np.full(self.catalog.n_items + 1, -1, np.int64)
            row_of[ids] = np.arange(len(ids))
            self._mats[version] = ExactMatrix(version, ids, vecs, row_of)
            for old in list(self._mats)[:-2]:  # the previous version may still be answering
                self._mats.pop(old, None)
            self.loads += 1
            log.info("exact search: version %s, %d x %d in memory", version, *vecs.shape)
        except Exception as e:  # the index answers instead; the next request retries
            log.warning("exact search: cannot load version %s: %r", version, e)
        finally:
            with self._lock:
                self._loading.discard(version)

    # -- masks ---------------------------------------------------------------------------
    def _mask(self, m: ExactMatrix, flt: SearchFilter) -> np.ndarray | None:
        """(N,) bool rows passing ``flt`` without its exclusions; None = every row."""
        base = SearchFilter(
            categories=flt.categories,
            price_min=flt.price_min,
            price_max=flt.price_max,
            in_stock=flt.in_stock,
        )
        if base.is_empty:
            return None
        key = (m.version, base)
        got = self._masks.get(key)
        if got is None:
            got = self.catalog.mask(base)[m.ids]  # (N,)
            with self._lock:
                self._masks[key] = got
                while len(self._masks) > self._mask_cache:
                    self._masks.popitem(last=False)
        return got

    # -- search --------------------------------------------------------------------------
    def search(
        self,
        m: ExactMatrix,
        queries: np.ndarray,
        n: Sequence[int],
        flts: Sequence[SearchFilter],
        exclude: Sequence[np.ndarray],
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query ``(item ids (n_i,), cosine (n_i,) float32)``, best first.

        ``queries`` (B, D) are normalised here (cosine, as the index does); ``exclude[i]``
        holds item ids query i must not return.
        """
        q = np.asarray(queries, np.float32)  # (B, D)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        scores = q @ m.vectors.T  # (B, N) one product for the whole batch
        out = []
        for i in range(len(q)):
            s = scores[i]  # (N,) a row of this batch's product, modified in place
            mask = self._mask(m, flts[i])
            if mask is not None:
                s[~mask] = -np.inf
            ex = exclude[i]
            if len(ex):
                rows = m.row_of[np.asarray(ex, np.int64)]
                s[rows[rows >= 0]] = -np.inf
            k = min(int(n[i]), len(s))
            if k <= 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
                continue
            top = top_rows(s, k)
            top = top[np.lexsort((m.ids[top], -s[top]))]  # score desc, then id
            top = top[np.isfinite(s[top])]
            out.append((m.ids[top], s[top].astype(np.float32)))
        return out


def top_rows(s: np.ndarray, k: int, stride: int = 8) -> np.ndarray:
    """Indices of the ``k`` largest of ``s`` (N,), unordered (ties at the cut may add more).

    A strided sample's k-th largest value is a lower bound that at least k elements of
    ``s`` reach (the sample is a subset), so only the few above it are partitioned: about
    a quarter of the cost of ``argpartition`` over all N, and still exact.
    """
    n = len(s)
    if k >= n:
        return np.arange(n)
    if n >= 64 * k:
        sample = s[::stride]  # (N / stride,) a view
        cut = np.partition(sample, len(sample) - k)[len(sample) - k]
        cand = np.flatnonzero(s >= cut)  # (>= k,)
        if len(cand) <= k:
            return cand
        if len(cand) < n // 2:
            return cand[np.argpartition(s[cand], len(cand) - k)[len(cand) - k :]]
    return np.argpartition(s, n - k)[n - k :]
