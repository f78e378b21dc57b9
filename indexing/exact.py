"""Exact (brute-force) item search in numpy: the in-memory back end of the search protocol.

For a catalogue of some 10^4 items a dot product against every item vector costs tens of
microseconds, far less than an HNSW query through the engine's Python binding, and it is
exact.  :class:`ExactSearch` keeps one ``(N, D)`` matrix per index version (read once from
an :class:`~indexing.base.ItemIndex`, so the vectors are the ones the index serves) and
hands out :class:`ExactIndex`, one version's :class:`~indexing.base.VectorSearch`: batches
of queries answered with one matrix product, the request filters applied with the index's
semantics through :class:`ItemMasks` (the serving catalogue's, or :class:`PayloadMasks`
from the index payloads), cached per filter, never rebuilt per request.

Above ``max_items`` (``ServeConfig.exact_max_items``, the measured crossover) the serving
engine keeps using the index's ANN search; filters on brands or ``only_ids`` always go to
the index (:func:`supports_exact`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ecomrec.errors import InvalidArgumentError
from indexing.base import Hit, ItemIndex, SearchFilter, VectorSearch, check_query_vector

log = logging.getLogger(__name__)


class ItemMasks(Protocol):
    """Per-item filter masks with the index's semantics (item ids 1..n_items)."""

    @property
    def n_items(self) -> int: ...

    def mask(self, flt: SearchFilter | None) -> np.ndarray:
        """(n_items + 1,) bool: items passing ``flt`` (row 0, padding, never passes)."""
        ...


class PayloadMasks:
    """:class:`ItemMasks` from index payloads, with :meth:`SearchFilter.matches` (the
    reference semantics): for exact search without a serving catalogue."""

    def __init__(self, ids: Sequence[int], payloads: Sequence[Mapping[str, Any]]) -> None:
        self._ids = [int(i) for i in ids]
        self._payloads = list(payloads)
        self._n = max(self._ids, default=0)

    @classmethod
    def from_index(cls, index: ItemIndex, ids: Sequence[int]) -> PayloadMasks:
        have = sorted(index.existing_ids(ids))
        return cls(have, index.get_payloads(have))

    @property
    def n_items(self) -> int:
        return self._n

    def mask(self, flt: SearchFilter | None) -> np.ndarray:
        m = np.zeros(self._n + 1, bool)
        f = flt or SearchFilter()
        for i, p in zip(self._ids, self._payloads):
            m[i] = f.matches(p, i)
        return m


@dataclass(frozen=True)
class ExactMatrix:
    """One index version's vectors in memory."""

    version: str
    ids: np.ndarray  # (N,) int64 item ids, ascending
    vectors: np.ndarray  # (N, D) float32, unit rows (cosine)
    row_of: np.ndarray  # (n_items + 1,) int64 row of an item id, -1 when not indexed


def supports_exact(flt: SearchFilter) -> bool:
    """Filters the masks reproduce (brands and ``only_ids`` go to the index)."""
    return not flt.brands and not flt.only_ids


class ExactSearch:
    """Brute-force top-n over an index version's vectors, for many queries at once."""

    def __init__(self, masks: ItemMasks, max_items: int, mask_cache: int = 256) -> None:
        self.masks = masks
        self.max_items = max_items
        self._mats: dict[str, ExactMatrix] = {}
        self._too_big: set[str] = set()
        self._loading: set[str] = set()
        self._lock = threading.Lock()
        self._masks: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._mask_cache = mask_cache
        self.loads = 0

    # -- matrices per version ---------------------------------------------------------------
    def index(self, source: ItemIndex, version: str, block: bool = False) -> ExactIndex | None:
        """The exact back end of ``version`` of ``source`` when loaded (see :meth:`matrix`)."""
        m = self.matrix(source, version, block)
        return None if m is None else ExactIndex(self, m)

    def matrix(self, index: ItemIndex, version: str, block: bool = False) -> ExactMatrix | None:
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

    def _load(self, index: ItemIndex, version: str) -> None:
        try:
            n = index.manifest().count
            if n > self.max_items:
                log.info(
                    "exact search off for version %s (%d items > %d)", version, n, self.max_items
                )
                self._too_big.add(version)
                return
            all_ids = range(1, self.masks.n_items + 1)
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
            row_of = np.full(self.masks.n_items + 1, -1, np.int64)
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
            got = self.masks.mask(base)[m.ids]  # (N,)
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
        holds item ids (<= n_items) query i must not return; ``flts[i].exclude_ids`` is
        not read here (:meth:`ExactIndex.search_batch` merges it).
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


class ExactIndex(VectorSearch):
    """One index version searched exactly in memory: a :class:`~indexing.base.VectorSearch`.

    Hits carry no payloads (``with_payload`` is accepted and ignored: the caller has the
    metadata) and ``hnsw_ef`` is ignored (there is no graph).  :meth:`search_arrays` is
    the batched form the serving engine calls: arrays, a size and a filter per query.
    """

    def __init__(self, owner: ExactSearch, matrix: ExactMatrix) -> None:
        self._owner = owner
        self.matrix = matrix

    @property
    def dim(self) -> int:
        return int(self.matrix.vectors.shape[1])

    @property
    def version(self) -> str:
        return self.matrix.version

    def supports(self, flt: SearchFilter) -> bool:
        return supports_exact(flt)

    def search_arrays(
        self,
        queries: np.ndarray,
        n: Sequence[int],
        flts: Sequence[SearchFilter],
        exclude: Sequence[np.ndarray],
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query ``(item ids (n_i,), cosine (n_i,))``, best first (see ExactSearch)."""
        return self._owner.search(self.matrix, queries, n, flts, exclude)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        exclude_ids: Sequence[int] = (),
        hnsw_ef: int | None = None,
        *,
        with_payload: bool = True,
    ) -> list[Hit]:
        v = check_query_vector(vector, self.dim)
        return self.search_batch(v[None, :], k, flt, [exclude_ids], hnsw_ef)[0]

    def search_batch(
        self,
        vectors: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        exclude_ids: Sequence[Sequence[int]] | None = None,
        hnsw_ef: int | None = None,
        *,
        with_payload: bool = True,
    ) -> list[list[Hit]]:
        if k < 1:
            raise InvalidArgumentError("k", f"must be >= 1, got {k}")
        f = flt or SearchFilter()
        if not supports_exact(f):
            raise InvalidArgumentError(
                "flt", "exact search filters on categories, price and stock only"
            )
        arr = np.asarray(vectors, np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise InvalidArgumentError(
                "vectors", f"expected shape (B, {self.dim}), got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise InvalidArgumentError("vectors", "contains NaN or infinite values")
        b = len(arr)
        if exclude_ids is not None and len(exclude_ids) != b:
            raise InvalidArgumentError(
                "exclude_ids", f"expected one list per query ({b}), got {len(exclude_ids)}"
            )
        row_ids = len(self.matrix.row_of)
        excl = []
        for i in range(b):
            ex = np.fromiter(
                (*f.exclude_ids, *(exclude_ids[i] if exclude_ids else ())), np.int64
            )  # (E,)
            excl.append(ex[(ex >= 0) & (ex < row_ids)])  # ids beyond the matrix are not in it
        found = self.search_arrays(arr, [k] * b, [f] * b, excl)
        return [
            [Hit(int(i), float(s)) for i, s in zip(ids.tolist(), sc.tolist())] for ids, sc in found
        ]


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
