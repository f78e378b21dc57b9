"""The recommendation engine: plain Python over validated dataclasses, no protobuf.

:class:`Recommender` does the work of one request (stored history + request events ->
user vector -> ANN with filters -> segment-aware re-rank with reasons) and raises the
errors of :mod:`ecomrec.errors` or the ones below; :mod:`serving.status` maps them to gRPC
status codes and :mod:`serving.service` is the gRPC edge around it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from ecomrec.errors import (
    EcomrecError,
    IndexUnavailableError,
    InvalidArgumentError,
    NotFoundError,
)
from indexing.base import Hit, ItemIndex, SearchFilter
from intake.schema import EVENT_TYPE_IDS
from serving import rerank as rr
from serving import validation as val
from serving.batching import Batcher
from serving.catalog import IndexOnlyItems, ItemCatalog, ItemInfo, SegmentPopularity
from serving.config import ServeConfig
from serving.encoders import (
    EncoderUnavailableError,
    MicroBatchingEncoder,
    concat_batches,
    encode_with_status,
)
from serving.exact import ExactSearch, supports_exact
from serving.history import History, HistoryStore, merge, to_batch
from serving.observability import Metrics
from serving.segments import COLD_START, SegmentInfo, SegmentLookup, UserSegments, segment_info
from towers.sequences import SequenceBatch, item_bag

log = logging.getLogger(__name__)
access_log = logging.getLogger("ecomrec.serving.access")

# Degraded reasons (stable strings).
ENCODER_FALLBACK = "ENCODER_FALLBACK"
INDEX_UNAVAILABLE = "INDEX_UNAVAILABLE"
BUY_AGAIN = "BUY_AGAIN"  # reason code: an own item of the buy-again mode


class DeadlineExceededError(EcomrecError):
    """The request's deadline passed before the named stage."""


class CancelledError(EcomrecError):
    """The client cancelled the request."""


class UnavailableError(EcomrecError):
    """A dependency is down and no fallback exists."""


def _require_finite(ranked: Sequence[rr.Ranked]) -> None:
    """A damaged index must degrade, never answer NaN/inf scores (issue 14)."""
    for r in ranked:
        if not (np.isfinite(r.score) and np.isfinite(r.relevance)):
            log.error("non-finite score for item %d: the index data is damaged", r.item_id)
            raise IndexUnavailableError("the index returned non-finite scores")


class IdMapLike(Protocol):
    def get(self, external_id: str) -> int | None: ...
    def to_external(self, internal_id: int) -> str: ...


@dataclass
class RequestContext:
    """Deadline and cancellation of one request, checked between stages."""

    deadline: float  # time.monotonic() value
    is_active: Callable[[], bool] = lambda: True
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @classmethod
    def with_timeout(
        cls, seconds: float, is_active: Callable[[], bool] = lambda: True
    ) -> RequestContext:
        return cls(time.monotonic() + seconds, is_active)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, stage: str) -> None:
        if not self.is_active():
            raise CancelledError(f"cancelled before {stage}")
        if time.monotonic() >= self.deadline:
            raise DeadlineExceededError(f"deadline exceeded before {stage}")

    def timed(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (t1 - t0)
        return t1


@dataclass(frozen=True)
class ResultItem:
    item_id: str
    score: float
    relevance: float
    reasons: tuple[str, ...]
    category: str
    price: float
    title: str


@dataclass(frozen=True)
class RecommendResult:
    request_id: str
    items: tuple[ResultItem, ...]
    segment: str
    model_version: str
    index_version: str
    degraded: bool
    degraded_reasons: tuple[str, ...]


@dataclass(frozen=True)
class ProfileResult:
    user_id: str
    segments: UserSegments
    n_events: int


@dataclass(frozen=True)
class AudienceResult:
    request_id: str
    members: tuple[tuple[str, float, str], ...]  # (external user id, score, segment)
    degraded: bool


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


@dataclass
class _Prepared:
    """A request after the history stage."""

    q: val.RecommendQuery
    hist: History
    seg_name: str
    policy: rr.RerankPolicy
    pop_segment: str | None
    exclude: set[int]
    index: ItemIndex | None
    work: RetrievalWork | None  # None: cold start (nothing to encode)


class UserVectors:
    """Every known customer's vector in memory, computed lazily on first use (FindAudience)."""

    def __init__(self, build: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._users: np.ndarray | None = None
        self._vecs: np.ndarray | None = None

    def _ensure(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._users is None or self._vecs is None:
                self._users, self._vecs = self._build()
            return self._users, self._vecs

    def warm_async(self) -> threading.Thread:
        """Compute the vectors in a background thread (so the first FindAudience is fast)."""
        t = threading.Thread(target=self._ensure, name="ecomrec-user-vectors", daemon=True)
        t.start()
        return t

    def search(
        self, vector: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        users, vecs = self._ensure()  # (N,), (N, D)
        scores = vecs @ np.asarray(vector, np.float32)  # (N,)
        if allowed is not None:
            scores = np.where(np.isin(users, allowed), scores, -np.inf)
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(users[i]), float(scores[i])) for i in top]


_T = TypeVar("_T")


def _versioned(index: ItemIndex, query: Callable[[], _T]) -> tuple[_T, str]:
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


class Recommender:
    """The request path over injected dependencies (no gRPC types)."""

    def __init__(
        self,
        *,
        cfg: ServeConfig,
        model_version: str,
        max_len: int,
        users: IdMapLike,
        items: IdMapLike,
        encoder: Any,
        index: ItemIndex | None,
        history: HistoryStore,
        catalog: ItemCatalog,
        segments: SegmentLookup,
        popularity: SegmentPopularity,
        policies: rr.RerankPolicies,
        metrics: Metrics | None = None,
        text_embedder: Callable[[list[str]], np.ndarray] | None = None,
        user_vectors: UserVectors | None = None,
        complements: Any = None,  # towers.complements.ComplementModel (CompleteBasket)
        product_search: Any = None,  # towers.product_search.ProductSearch (SearchProducts)
    ) -> None:
        self.cfg = cfg
        self.model_version = model_version
        self.max_len = max_len
        self.users = users
        self.items = items
        self.encoder = encoder
        self._index = index
        self.history = history
        self.catalog = catalog
        self.segments = segments
        self.popularity = popularity
        self.policies = policies
        self.metrics = metrics
        self.text_embedder = text_embedder
        self.user_vectors = user_vectors
        self.complements = complements
        self.product_search = product_search
        # items the index holds beyond the catalogue: metadata from their index payloads
        self.index_only = IndexOnlyItems()
        # exact numpy search below the crossover; batching of encode + search
        self._coming = 0  # requests between arrival and the retrieval batcher
        self._coming_lock = threading.Lock()
        self.exact: ExactSearch | None = (
            ExactSearch(catalog, cfg.exact_max_items) if cfg.exact_max_items > 0 else None
        )
        self._batcher: Batcher[RetrievalWork, Retrieved] | None = (
            Batcher(
                self._retrieve_many,
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
        if self.exact is not None and index is not None:
            self._warm_exact(index)

    def _warm_exact(self, index: ItemIndex) -> None:
        """Load the live version's vectors now (not on the first request)."""
        if self.exact is None:
            return
        try:
            self.exact.matrix(index, index.version, block=True)
        except Exception as e:  # the first requests use the index; loading is retried
            log.warning("exact search: cannot read the index version: %r", e)

    # -- index handling -----------------------------------------------------------------
    @property
    def index(self) -> ItemIndex | None:
        return self._index

    def swap_index(self, new: ItemIndex | None) -> ItemIndex | None:
        """Serve from ``new`` from the next request on; returns the old index (not closed)."""
        old, self._index = self._index, new
        if new is not None and self.exact is not None:
            with contextlib.suppress(Exception):  # a broken index shows up on search
                self.exact.matrix(new, new.version)  # background load
        if self.metrics is not None:
            self.metrics.set_versions(self.model_version, self.index_version(new))
        return old

    @staticmethod
    def index_version(index: ItemIndex | None) -> str:
        if index is None:
            return ""
        try:
            return index.version
        except Exception:  # the version is informational; an index fault shows up on search
            return ""

    def _search(
        self,
        index: ItemIndex | None,
        vector: np.ndarray,
        n: int,
        flt: SearchFilter,
        exclude: Sequence[int],
    ) -> tuple[list[Hit], str]:
        """ANN search on ONE index version; returns (hits, version).

        The alias is read before and after the query: if a swap happened in between the
        query is repeated, so the version reported is the version searched.  Any engine
        failure becomes IndexUnavailableError (the caller falls back).
        """
        if index is None:
            raise IndexUnavailableError("no index loaded")
        kw = self._search_kw(index)
        return _versioned(
            index,
            lambda: index.search(
                vector, n, flt, exclude_ids=exclude, hnsw_ef=self.cfg.hnsw_ef, **kw
            ),
        )

    @staticmethod
    @functools.cache
    def _search_kw_for(cls: type) -> tuple[tuple[str, Any], ...]:
        import inspect

        # payloads come from the catalogue: skip them when the backend allows it
        params = inspect.signature(getattr(cls, "search")).parameters  # noqa: B009
        return (("with_payload", False),) if "with_payload" in params else ()

    def _search_kw(self, index: ItemIndex) -> dict[str, Any]:
        return dict(self._search_kw_for(type(index)))

    # -- retrieval: user tower + vector search, batched over concurrent requests --------------
    def _retrieve_many(self, works: Sequence[RetrievalWork]) -> list[Retrieved | BaseException]:
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
        m = self.exact.matrix(index, version) if self.exact is not None else None
        if m is not None and all(supports_exact(w.flt) for w in works):
            found = self.exact.search(  # type: ignore[union-attr]
                m, vecs, [w.n for w in works], [w.flt for w in works], [w.exclude for w in works]
            )
            return [Retrieved(ids, sc, m.version, False, 0.0, 0.0, True) for ids, sc in found]
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
        """:meth:`_search` for a batch (``search_batch`` when the index has it)."""
        if len(vectors) == 1 or not hasattr(index, "search_batch"):
            out = [self._search(index, v, n, flt, ex) for v, ex in zip(vectors, exclude)]
            return [h for h, _ in out], out[-1][1]
        kw = self._search_kw(index)
        return _versioned(
            index,
            lambda: index.search_batch(
                vectors, n, flt, exclude_ids=exclude, hnsw_ef=self.cfg.hnsw_ef, **kw
            ),
        )

    def _retrieve(self, work: RetrievalWork) -> Retrieved:
        """One request's retrieval, through the batcher when batching is on."""
        if self._batcher is None:
            r = self._retrieve_many([work])[0]
        else:
            try:
                r = self._batcher.run(work, max(work.deadline - time.monotonic(), 0.0) + 0.05)
            except TimeoutError:
                raise DeadlineExceededError("deadline exceeded in encode/ann") from None
        if isinstance(r, BaseException):
            raise r
        return r

    # -- helpers ------------------------------------------------------------------------
    def _item_vectors(self, index: ItemIndex | None, items: list[int], field: str) -> np.ndarray:
        """Stored vectors of catalogue items; NOT_FOUND names the shop's ids, every index
        fault (missing, unloadable, damaged) is IndexUnavailableError."""
        if index is None:
            raise IndexUnavailableError("no index loaded")
        try:
            vecs = np.asarray(index.get_vectors(items), np.float32)  # (n, D)
        except NotFoundError:
            try:
                have = index.existing_ids(items)  # type: ignore[attr-defined]
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

    def _user_segments(self, user: int | None) -> UserSegments | None:
        return None if user is None else self.segments.user(user)

    def _policy(self, segs: UserSegments | None) -> tuple[str, rr.RerankPolicy]:
        rfm = segs.rfm if segs else None
        beh = segs.behavioural if segs else None
        name, policy = self.policies.for_segments(rfm, beh)
        return (name or rfm or beh or ""), policy

    def _user_context(self, hist: History, policy: rr.RerankPolicy) -> rr.UserContext:
        """Seen categories (as the catalogue's codes at the policy depth) and price centre."""
        codes = self.catalog.category_codes(policy.category_depth)[hist.items]  # (L,)
        seen = frozenset(int(c) for c in np.unique(codes) if c >= 0)
        prices = self.catalog.price[hist.items] if len(hist) else np.zeros(0)
        if hist.price is not None and len(hist):
            prices = np.where(np.isfinite(hist.price), hist.price, prices)
        prices = prices[np.isfinite(prices) & (prices > 0)]
        center = rr.median(np.log1p(prices)) if len(prices) else None
        return rr.UserContext(frozenset(), center, seen)

    def _candidates_arr(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        segment: str | None,
        policy: rr.RerankPolicy,
        extra: dict[int, ItemInfo] | None = None,
    ) -> rr.Candidates:
        """Candidates from id/score arrays with the catalogue's precomputed per-item arrays;
        ``extra`` describes the candidates above the catalogue (index-only items: no
        popularity in the histories, category/price/boosts from their payloads)."""
        c = self.catalog
        boost = c.boosts(policy.boosts)
        depth = policy.category_depth
        outside = ids > c.n_items  # (N,) bool: index-only items
        if not outside.any():
            return rr.Candidates(
                item_ids=ids,
                relevance=scores,
                categories=(),
                price=c.price[ids],
                popularity=self.popularity.scores(segment)[ids],
                category_codes=c.category_codes(depth)[ids],
                boost=boost[ids] if boost is not None else np.zeros(len(ids)),
            )
        extra = extra or {}
        if len(extra) < int(outside.sum()):  # some were deleted since the search: drop them
            keep = ~outside | np.isin(ids, np.fromiter(extra, np.int64, len(extra)))
            ids, scores, outside = ids[keep], scores[keep], outside[keep]
        safe = np.where(outside, 0, ids)  # (N,) catalogue rows (0 = padding for the rest)
        price = c.price[safe].copy()
        pop = self.popularity.scores(segment)[safe].copy()
        codes = c.category_codes(depth)[safe].copy()
        bst = boost[safe].copy() if boost is not None else np.zeros(len(ids))
        rows = np.flatnonzero(outside)
        infos = [extra[int(ids[r])] for r in rows]
        price[rows] = [x.price for x in infos]
        pop[rows] = 0.0  # no events in the histories the popularity counts come from
        codes[rows] = [c.category_code(x.category, depth) for x in infos]
        if policy.boosts:
            bst[rows] = rr.boost_vector(
                [x.category for x in infos], [x.external_id for x in infos], policy.boosts
            )
        return rr.Candidates(
            item_ids=ids,
            relevance=scores,
            categories=(),
            price=price,
            popularity=pop,
            category_codes=codes,
            boost=bst,
        )

    def _index_only(
        self, index: ItemIndex | None, version: str, ids: Sequence[int] | np.ndarray
    ) -> dict[int, ItemInfo]:
        """Payload metadata of the ids above the catalogue (none: ``{}``, no index call)."""
        arr = np.asarray(ids, np.int64)
        outside = arr[arr > self.catalog.n_items]
        if not len(outside) or index is None:
            return {}
        try:
            return self.index_only.info(index, version, outside.tolist())
        except (InvalidArgumentError, IndexUnavailableError):
            raise
        except Exception as e:
            raise IndexUnavailableError(f"index payload lookup failed: {e}") from e

    def _items(
        self, ranked: Sequence[rr.Ranked], extra: dict[int, ItemInfo] | None = None
    ) -> tuple[ResultItem, ...]:
        c = self.catalog
        out = []
        for r in ranked:
            info = extra.get(r.item_id) if extra and r.item_id > c.n_items else None
            if info is not None:
                out.append(
                    ResultItem(
                        item_id=info.external_id,
                        score=r.score,
                        relevance=r.relevance,
                        reasons=r.reasons,
                        category=info.category or "",
                        price=info.price if np.isfinite(info.price) else 0.0,
                        title=info.title,
                    )
                )
                continue
            p = float(c.price[r.item_id])
            out.append(
                ResultItem(
                    item_id=c.external_ids[r.item_id],
                    score=r.score,
                    relevance=r.relevance,
                    reasons=r.reasons,
                    category=c.categories[r.item_id] or "",
                    price=p if np.isfinite(p) else 0.0,
                    title=c.titles[r.item_id],
                )
            )
        return tuple(out)

    def _popular(
        self, segment: str | None, k: int, flt: SearchFilter, reason: str
    ) -> list[rr.Ranked]:
        ids = self.popularity.top(segment, k, self.catalog.mask(flt))
        scores = self.popularity.scores(segment)
        return [rr.Ranked(int(i), float(scores[i]), 0.0, (reason,)) for i in ids]

    def _degrade(self, method: str, reasons: Sequence[str]) -> None:
        if self.metrics is not None:
            for r in reasons:
                self.metrics.degraded.labels(method, r).inc()

    # -- Recommend ------------------------------------------------------------------------
    def recommend(self, q: val.RecommendQuery, ctx: RequestContext) -> RecommendResult:
        """History -> user vector -> ANN (over-fetched, filtered) -> segment-aware re-rank."""
        self._arrive(1)  # counted until it reaches the retrieval batcher
        arrived = True
        try:
            p = self._prepare(q, ctx)
            t = time.perf_counter()
            got: Retrieved | BaseException | None = None
            if p.work is not None:
                ctx.check("encode")
                self._arrive(-1)
                arrived = False
                try:
                    got = self._retrieve(p.work)
                except IndexUnavailableError as e:
                    got = e
            return self._finish(p, got, ctx, t)
        finally:
            if arrived:
                self._arrive(-1)

    def recommend_many(
        self, queries: Sequence[val.RecommendQuery], ctx: RequestContext, chunk: int = 64
    ) -> Iterator[RecommendResult | BaseException]:
        """Answers for many requests (backend jobs), in order; a failed request yields its
        exception.  Each chunk's encode and search run as one batch in this thread; each
        answer equals :meth:`recommend`'s for the same query."""
        for start in range(0, len(queries), chunk):
            part = queries[start : start + chunk]
            preps: list[_Prepared | BaseException] = []
            for q in part:
                try:
                    ctx.check("history")
                    preps.append(self._prepare(q, RequestContext(ctx.deadline, ctx.is_active)))
                except Exception as e:
                    preps.append(e)
            works = [p.work for p in preps if isinstance(p, _Prepared) and p.work is not None]
            t = time.perf_counter()
            found = iter(self._retrieve_many(works) if works else [])
            for p in preps:
                if isinstance(p, BaseException):
                    yield p
                    continue
                sub = RequestContext(ctx.deadline, ctx.is_active)
                got = next(found) if p.work is not None else None
                try:
                    if isinstance(got, BaseException) and not isinstance(
                        got, IndexUnavailableError
                    ):
                        raise got
                    yield self._finish(p, got, sub, t)
                except Exception as e:
                    yield e

    def _prepare(self, q: val.RecommendQuery, ctx: RequestContext) -> _Prepared:
        """History, segment, policy and exclusions of one request; its retrieval work."""
        t = time.perf_counter()
        ctx.check("history")
        stored = self.history.get(q.user) if q.user is not None else History.empty()
        hist = merge(stored, q.recent)
        segs = self._user_segments(q.user)
        seg_name, policy = self._policy(segs)
        pop_segment = (segs.rfm or segs.behavioural) if segs else None
        exclude = set(q.exclude)
        buy_again = q.mode == "buy-again"
        if not (q.include_purchased or buy_again):
            exclude.update(int(i) for i in hist.purchased())
        index = self._index  # one index object for the whole request
        work = None
        if len(hist):
            n = max(q.k * self.cfg.overfetch, self.cfg.min_candidates) if not q.skip_rerank else q.k
            work = RetrievalWork(
                to_batch([hist], self.max_len),
                n,
                q.filters,
                np.fromiter(sorted(exclude), np.int64, len(exclude)),
                index,
                ctx.deadline,
            )
        ctx.timed("history", t)
        return _Prepared(q, hist, seg_name, policy, pop_segment, exclude, index, work)

    def _index_fallback(
        self, p: _Prepared, err: BaseException | None, reasons: list[str]
    ) -> list[Any]:
        """The degraded answer when the index cannot be searched: per-segment popularity
        with the request's filters, marked INDEX_UNAVAILABLE."""
        log.warning("index unavailable, serving segment popularity: %s", err)
        reasons.append(INDEX_UNAVAILABLE)
        return self._popular(
            p.pop_segment, p.q.k, p.q.filters.with_excluded(sorted(p.exclude)), rr.POPULAR_FALLBACK
        )

    def _finish(
        self,
        p: _Prepared,
        got: Retrieved | BaseException | None,
        ctx: RequestContext,
        t: float,
    ) -> RecommendResult:
        """Re-rank the retrieved candidates (or the popularity fallback) into the answer."""
        q, flt = p.q, p.q.filters
        reasons: list[str] = []
        seg_name = p.seg_name
        extra: dict[int, ItemInfo] = {}
        if p.work is None:
            # Cold start: nothing to encode; the segment's (or overall) best sellers.
            ranked = self._popular(
                p.pop_segment, q.k, flt.with_excluded(sorted(p.exclude)), rr.POPULAR_IN_SEGMENT
            )
            seg_name = seg_name or COLD_START
            index_version = self.index_version(p.index)
        elif isinstance(got, Retrieved):
            if got.encoder_degraded:
                reasons.append(ENCODER_FALLBACK)
            # the batch's encode and search times; the wait for company counts as encode
            ctx.stages["encode"] = ctx.stages.get("encode", 0.0) + max(
                time.perf_counter() - t - got.ann_s, 0.0
            )
            ctx.stages["ann"] = ctx.stages.get("ann", 0.0) + got.ann_s
            t = time.perf_counter()
            index_version = got.version
            ctx.check("rerank")
            try:
                extra = self._index_only(p.index, got.version, got.ids)
                cands = self._candidates_arr(got.ids, got.scores, p.pop_segment, p.policy, extra)
                ranked = (
                    rr.relevance_only(cands, q.k)
                    if q.skip_rerank
                    else rr.rerank(cands, self._user_context(p.hist, p.policy), p.policy, q.k)
                )
                _require_finite(ranked)  # damaged vectors never reach an answer
            except IndexUnavailableError as e:
                ranked, index_version = self._index_fallback(p, e, reasons), ""
        else:
            t = ctx.timed("ann", t)
            ranked, index_version = self._index_fallback(p, got, reasons), ""
        ctx.timed("rerank", t)
        if p.q.mode == "buy-again":
            ranked = self._buy_again(ranked, p.hist, q.k, flt, p.exclude)
        self._degrade("Recommend", reasons)
        return RecommendResult(
            request_id=q.request_id,
            items=self._items(ranked, extra),
            segment=seg_name,
            model_version=self.model_version,
            index_version=index_version,
            degraded=bool(reasons),
            degraded_reasons=tuple(reasons),
        )

    def _arrive(self, d: int) -> None:
        with self._coming_lock:
            self._coming += d

    def _buy_again(
        self,
        ranked: Sequence[rr.Ranked],
        hist: History,
        k: int,
        flt: SearchFilter,
        exclude: set[int],
    ) -> list[rr.Ranked]:
        """Repeat/explore mixture: own items (passing the filters, not excluded) score
        ``buy_again_weight * rf / max rf`` plus their retrieval score, then the top ``k``."""
        pur = hist.event_type == EVENT_TYPE_IDS["purchase"]
        now = int(hist.ts.max(initial=0)) + 1
        bag = item_bag([hist.items[pur]], [hist.ts[pur]], [now])
        rf = bag.recency_frequency(self.cfg.buy_again_half_life_days)
        ok = self.catalog.mask(flt)[bag.items] & ~np.isin(bag.items, list(exclude))
        items, rf = bag.items[ok], rf[ok]
        if len(items) == 0:
            return list(ranked)[:k]
        own = dict(
            zip(items.tolist(), (self.cfg.buy_again_weight * rf / rf.max()).tolist(), strict=True)
        )
        out: dict[int, rr.Ranked] = {}
        for r in ranked:
            extra = own.pop(r.item_id, None)
            out[r.item_id] = (
                r
                if extra is None
                else rr.Ranked(r.item_id, r.score + extra, r.relevance, (*r.reasons, BUY_AGAIN))
            )
        for i, s in own.items():
            out[i] = rr.Ranked(int(i), float(s), 0.0, (BUY_AGAIN,))
        return sorted(out.values(), key=lambda r: -r.score)[:k]

    # -- SimilarItems ---------------------------------------------------------------------
    def similar(self, q: val.SimilarQuery, ctx: RequestContext) -> RecommendResult:
        """Nearest items to an item's vector (the item itself excluded)."""
        index = self._index
        reasons: list[str] = []
        extra: dict[int, ItemInfo] = {}
        t = time.perf_counter()
        ctx.check("ann")
        try:
            if index is None:
                raise IndexUnavailableError("no index loaded")
            vec = self._item_vectors(index, [q.item], "item_id")[0]
            hits, version = self._search(index, vec, q.k, q.filters, [q.item])
            extra = self._index_only(index, version, [h.item_id for h in hits[: q.k]])
            ranked = [
                rr.Ranked(h.item_id, h.score, h.score, (rr.SIMILAR,))
                for h in hits[: q.k]
                if h.item_id <= self.catalog.n_items or h.item_id in extra
            ]
            _require_finite(ranked)
        except IndexUnavailableError as e:
            log.warning("index unavailable for SimilarItems: %s", e)
            reasons.append(INDEX_UNAVAILABLE)
            version = ""
            cat = self.catalog.categories[q.item]
            flt = q.filters
            if cat:
                flt = SearchFilter(
                    categories=(rr.category_key(cat, 99),),
                    price_min=flt.price_min,
                    price_max=flt.price_max,
                    in_stock=flt.in_stock,
                )
            ranked = self._popular(None, q.k, flt.with_excluded([q.item]), rr.POPULAR_FALLBACK)
        ctx.timed("ann", t)
        self._degrade("SimilarItems", reasons)
        return RecommendResult(
            q.request_id,
            self._items(ranked, extra),
            "",
            self.model_version,
            version,
            bool(reasons),
            tuple(reasons),
        )

    # -- profiles and segments -----------------------------------------------------------
    def profile(self, user: int) -> ProfileResult:
        segs = self.segments.user(user) or UserSegments()
        return ProfileResult(self.users.to_external(user), segs, len(self.history.get(user)))

    def list_segments(self, kind: str) -> list[SegmentInfo]:
        if kind not in ("", "rfm", "behavioural"):
            raise InvalidArgumentError("kind", f"{kind!r} is not one of 'rfm', 'behavioural', ''")
        return [s for s in self.segments.segments() if not kind or s.kind == kind]

    def get_segment(self, segment_id: str) -> SegmentInfo:
        if not segment_id:
            raise InvalidArgumentError("segment_id", "is required")
        return segment_info(self.segments, segment_id)

    # -- FindAudience ---------------------------------------------------------------------
    def find_audience(self, q: val.AudienceQuery, ctx: RequestContext) -> AudienceResult:
        """Customers whose vectors are closest to a text's or items' vector."""
        if self.user_vectors is None:
            raise UnavailableError("no user vectors configured for FindAudience")
        parts = []
        if q.text:
            if self.text_embedder is None:
                raise InvalidArgumentError(
                    "text", "this deployment has no text model; give item_ids"
                )
            parts.append(np.asarray(self.text_embedder([q.text]), np.float32)[0])
        if q.items:
            vecs = self._item_vectors(self._index, list(q.items), "item_ids")  # (n, D)
            parts.append(np.asarray(vecs, np.float32).mean(axis=0))
        vec = np.mean(parts, axis=0)  # (D,)
        vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        ctx.check("audience")
        allowed = None
        if q.segments:
            allowed = np.concatenate([self.segments.members(s) for s in q.segments])
        found = self.user_vectors.search(vec, q.k, allowed)
        members = []
        for u, s in found:
            segs = self.segments.user(u)
            members.append(
                (self.users.to_external(u), s, (segs.rfm or segs.behavioural or "") if segs else "")
            )
        return AudienceResult(q.request_id, tuple(members), False)
