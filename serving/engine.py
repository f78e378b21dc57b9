"""The recommendation engine: plain Python over validated dataclasses, no protobuf.

:class:`Recommender` does the work of one request (stored history + request events ->
user vector -> ANN with filters -> segment-aware re-rank with reasons) and raises the
errors of :mod:`towers.errors` or the ones below; :mod:`serving.status` maps them to gRPC
status codes and :mod:`serving.service` is the gRPC edge around it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from indexing.base import Hit, ItemIndex, SearchFilter
from serving import rerank as rr
from serving import validation as val
from serving.catalog import ItemCatalog, SegmentPopularity
from serving.config import ServeConfig
from serving.encoders import EncoderUnavailableError, encode_with_status
from serving.history import History, HistoryStore, merge, to_batch
from serving.observability import Metrics
from serving.segments import COLD_START, SegmentInfo, SegmentLookup, UserSegments, segment_info
from towers.errors import (
    EcomrecError,
    IndexUnavailableError,
    InvalidArgumentError,
    NotFoundError,
)
from towers.schema import EVENT_TYPE_IDS
from towers.sequences import item_bag

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

    # -- index handling -----------------------------------------------------------------
    @property
    def index(self) -> ItemIndex | None:
        return self._index

    def swap_index(self, new: ItemIndex | None) -> ItemIndex | None:
        """Serve from ``new`` from the next request on; returns the old index (not closed)."""
        old, self._index = self._index, new
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
        try:
            for _ in range(3):
                v0 = index.version
                hits = index.search(
                    vector,
                    n,
                    flt,
                    exclude_ids=exclude,
                    hnsw_ef=self.cfg.hnsw_ef,
                    **self._search_kw(index),
                )
                v1 = index.version
                if v0 == v1:
                    return hits, v0
            return hits, v1
        except (InvalidArgumentError, NotFoundError, IndexUnavailableError):
            raise
        except Exception as e:  # engine faults (closed shard, I/O) -> degraded answer
            log.warning("index search failed: %r", e)
            raise IndexUnavailableError(f"index search failed: {e}") from e

    @staticmethod
    @functools.cache
    def _search_kw_for(cls: type) -> tuple[tuple[str, Any], ...]:
        import inspect

        # payloads come from the catalogue: skip them when the backend allows it
        params = inspect.signature(getattr(cls, "search")).parameters  # noqa: B009
        return (("with_payload", False),) if "with_payload" in params else ()

    def _search_kw(self, index: ItemIndex) -> dict[str, Any]:
        return dict(self._search_kw_for(type(index)))

    # -- helpers ------------------------------------------------------------------------
    def _user_segments(self, user: int | None) -> UserSegments | None:
        return None if user is None else self.segments.user(user)

    def _policy(self, segs: UserSegments | None) -> tuple[str, rr.RerankPolicy]:
        rfm = segs.rfm if segs else None
        beh = segs.behavioural if segs else None
        name, policy = self.policies.for_segments(rfm, beh)
        return (name or rfm or beh or ""), policy

    def _user_context(self, hist: History, policy: rr.RerankPolicy) -> rr.UserContext:
        cats = frozenset(
            rr.category_key(self.catalog.categories[int(i)], policy.category_depth)
            for i in np.unique(hist.items)
        )
        prices = self.catalog.price[hist.items] if len(hist) else np.zeros(0)
        if hist.price is not None and len(hist):
            prices = np.where(np.isfinite(hist.price), hist.price, prices)
        prices = prices[np.isfinite(prices) & (prices > 0)]
        center = float(np.median(np.log1p(prices))) if len(prices) else None
        return rr.UserContext(cats - {""}, center)

    def _candidates(self, hits: Sequence[Hit], segment: str | None) -> rr.Candidates:
        ids = np.array([h.item_id for h in hits], np.int64)
        pop = self.popularity.scores(segment)
        return rr.Candidates(
            item_ids=ids,
            relevance=np.array([h.score for h in hits], np.float32),
            categories=[self.catalog.categories[i] for i in ids],
            price=self.catalog.price[ids],
            popularity=pop[ids] if len(ids) else np.zeros(0, np.float32),
            external_ids=[self.catalog.external_ids[i] for i in ids],
        )

    def _items(self, ranked: Sequence[rr.Ranked]) -> tuple[ResultItem, ...]:
        c = self.catalog
        out = []
        for r in ranked:
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
        flt = q.filters
        t = ctx.timed("history", t)
        reasons: list[str] = []
        index = self._index  # one index object for the whole request
        index_version = ""
        if len(hist) == 0:
            # Cold start: nothing to encode; the segment's (or overall) best sellers.
            ranked = self._popular(
                pop_segment, q.k, flt.with_excluded(sorted(exclude)), rr.POPULAR_IN_SEGMENT
            )
            seg_name = seg_name or COLD_START
            index_version = self.index_version(index)
            ctx.timed("rerank", t)
        else:
            ctx.check("encode")
            batch = to_batch([hist], self.max_len)
            try:
                vecs, enc_degraded = encode_with_status(
                    self.encoder, batch, max(ctx.remaining(), 0.001)
                )
            except EncoderUnavailableError as e:
                raise UnavailableError(f"user encoder unavailable: {e}") from e
            if enc_degraded:
                reasons.append(ENCODER_FALLBACK)
            t = ctx.timed("encode", t)
            ctx.check("ann")
            n = max(q.k * self.cfg.overfetch, self.cfg.min_candidates) if not q.skip_rerank else q.k
            try:
                hits, index_version = self._search(index, vecs[0], n, flt, sorted(exclude))
                t = ctx.timed("ann", t)
                ctx.check("rerank")
                cands = self._candidates(hits, pop_segment)
                user_ctx = self._user_context(hist, policy)
                ranked = (
                    rr.relevance_only(cands, q.k)
                    if q.skip_rerank
                    else rr.rerank(cands, user_ctx, policy, q.k)
                )
            except IndexUnavailableError as e:
                log.warning("index unavailable, serving segment popularity: %s", e)
                reasons.append(INDEX_UNAVAILABLE)
                t = ctx.timed("ann", t)
                ranked = self._popular(
                    pop_segment, q.k, flt.with_excluded(sorted(exclude)), rr.POPULAR_FALLBACK
                )
            ctx.timed("rerank", t)
        if buy_again:
            ranked = self._buy_again(ranked, hist, q.k, flt, exclude)
        self._degrade("Recommend", reasons)
        return RecommendResult(
            request_id=q.request_id,
            items=self._items(ranked),
            segment=seg_name,
            model_version=self.model_version,
            index_version=index_version,
            degraded=bool(reasons),
            degraded_reasons=tuple(reasons),
        )

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
        t = time.perf_counter()
        ctx.check("ann")
        try:
            if index is None:
                raise IndexUnavailableError("no index loaded")
            try:
                vec = index.get_vectors([q.item])[0]
            except NotFoundError:
                raise
            except Exception as e:
                raise IndexUnavailableError(f"index lookup failed: {e}") from e
            hits, version = self._search(index, vec, q.k, q.filters, [q.item])
            ranked = [rr.Ranked(h.item_id, h.score, h.score, (rr.SIMILAR,)) for h in hits[: q.k]]
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
            self._items(ranked),
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
            index = self._index
            if index is None:
                raise UnavailableError("no index loaded")
            parts.append(np.asarray(index.get_vectors(list(q.items)), np.float32).mean(axis=0))
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
