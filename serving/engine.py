"""The recommendation engine: the Recommend path, in plain Python over validated dataclasses.

:class:`Recommender` does the work of one request: stored history + request events ->
user vector -> vector search with filters (:mod:`serving.retrieval`, batched over
concurrent requests, exact in memory below ``exact_max_items``) -> candidates
(:mod:`serving.candidates`) -> segment-aware re-rank with reasons.  SimilarItems,
profiles, segments and FindAudience (:mod:`serving.audience`) share its parts.  It raises
the errors of :mod:`ecomrec.errors` and :mod:`serving.requests`; :mod:`serving.status`
maps them to gRPC status codes and :mod:`serving.service` is the gRPC edge around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError
from indexing.base import ItemIndex, SearchFilter
from indexing.exact import ExactSearch
from serving import candidates as cand
from serving import rerank as rr
from serving import validation as val
from serving.audience import UserVectors, find_audience
from serving.batching import Batcher
from serving.catalog import IndexOnlyItems, ItemCatalog, ItemInfo, SegmentPopularity
from serving.config import ServeConfig
from serving.history import History, HistoryStore, merge, to_batch
from serving.observability import Metrics
from serving.requests import (
    ENCODER_FALLBACK,
    INDEX_UNAVAILABLE,
    AudienceResult,
    IdMapLike,
    ProfileResult,
    RecommendResult,
    RequestContext,
)
from serving.retrieval import Retrieval, RetrievalWork, Retrieved
from serving.segments import COLD_START, SegmentInfo, SegmentLookup, UserSegments, segment_info

log = logging.getLogger(__name__)


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
        # user tower + vector search (exact below the crossover), batched across requests
        self.retrieval = Retrieval(cfg, encoder, catalog)
        self._cfg = cfg
        self.model_version = model_version
        self.max_len = max_len
        self.users = users
        self.items = items
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
        if index is not None:
            self.retrieval.warm(index, block=True)  # not on the first request

    # -- configuration and the parts it is forwarded to ----------------------------------
    @property
    def cfg(self) -> ServeConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: ServeConfig) -> None:
        self._cfg = self.retrieval.cfg = cfg

    @property
    def encoder(self) -> Any:
        return self.retrieval.encoder

    @encoder.setter
    def encoder(self, encoder: Any) -> None:
        self.retrieval.encoder = encoder

    @property
    def exact(self) -> ExactSearch | None:
        return self.retrieval.exact

    @property
    def _batcher(self) -> Batcher[RetrievalWork, Retrieved] | None:
        return self.retrieval.batcher

    # -- index handling -----------------------------------------------------------------
    @property
    def index(self) -> ItemIndex | None:
        return self._index

    def swap_index(self, new: ItemIndex | None) -> ItemIndex | None:
        """Serve from ``new`` from the next request on; returns the old index (not closed)."""
        old, self._index = self._index, new
        if new is not None:
            self.retrieval.warm(new, block=False)  # background load
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

    # -- Recommend ------------------------------------------------------------------------
    def recommend(self, q: val.RecommendQuery, ctx: RequestContext) -> RecommendResult:
        """History -> user vector -> ANN (over-fetched, filtered) -> segment-aware re-rank."""
        self.retrieval.arrive(1)  # counted until it reaches the retrieval batcher
        arrived = True
        try:
            p = self._prepare(q, ctx)
            t = time.perf_counter()
            got: Retrieved | BaseException | None = None
            if p.work is not None:
                ctx.check("encode")
                self.retrieval.arrive(-1)
                arrived = False
                try:
                    got = self.retrieval.retrieve(p.work)
                except IndexUnavailableError as e:
                    got = e
            return self._finish(p, got, ctx, t)
        finally:
            if arrived:
                self.retrieval.arrive(-1)

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
            found = iter(self.retrieval.retrieve_many(works) if works else [])
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
                cands = cand.candidates(
                    self.catalog,
                    self.popularity,
                    got.ids,
                    got.scores,
                    p.pop_segment,
                    p.policy,
                    extra,
                )
                ranked = (
                    rr.relevance_only(cands, q.k)
                    if q.skip_rerank
                    else rr.rerank(
                        cands, cand.user_context(self.catalog, p.hist, p.policy), p.policy, q.k
                    )
                )
                cand.require_finite(ranked)  # damaged vectors never reach an answer
            except IndexUnavailableError as e:
                ranked, index_version = self._index_fallback(p, e, reasons), ""
        else:
            t = ctx.timed("ann", t)
            ranked, index_version = self._index_fallback(p, got, reasons), ""
        ctx.timed("rerank", t)
        if p.q.mode == "buy-again":
            ranked = cand.buy_again(
                self.catalog,
                ranked,
                p.hist,
                q.k,
                flt,
                p.exclude,
                weight=self.cfg.buy_again_weight,
                half_life_days=self.cfg.buy_again_half_life_days,
            )
        self._degrade("Recommend", reasons)
        return RecommendResult(
            request_id=q.request_id,
            items=cand.result_items(self.catalog, ranked, extra),
            segment=seg_name,
            model_version=self.model_version,
            index_version=index_version,
            degraded=bool(reasons),
            degraded_reasons=tuple(reasons),
        )

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
            vec = self.retrieval.item_vectors(index, [q.item], "item_id")[0]
            hits, version = self.retrieval.search(index, vec, q.k, q.filters, [q.item])
            extra = self._index_only(index, version, [h.item_id for h in hits[: q.k]])
            ranked = [
                rr.Ranked(h.item_id, h.score, h.score, (rr.SIMILAR,))
                for h in hits[: q.k]
                if h.item_id <= self.catalog.n_items or h.item_id in extra
            ]
            cand.require_finite(ranked)
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
            cand.result_items(self.catalog, ranked, extra),
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
        return find_audience(
            q,
            ctx,
            user_vectors=self.user_vectors,
            text_embedder=self.text_embedder,
            item_vectors=lambda ids: self.retrieval.item_vectors(self._index, ids, "item_ids"),
            segments=self.segments,
            users=self.users,
        )

    # -- helpers ------------------------------------------------------------------------
    def _user_segments(self, user: int | None) -> UserSegments | None:
        return None if user is None else self.segments.user(user)

    def _policy(self, segs: UserSegments | None) -> tuple[str, rr.RerankPolicy]:
        rfm = segs.rfm if segs else None
        beh = segs.behavioural if segs else None
        name, policy = self.policies.for_segments(rfm, beh)
        return (name or rfm or beh or ""), policy

    def _popular(
        self, segment: str | None, k: int, flt: SearchFilter, reason: str
    ) -> list[rr.Ranked]:
        return cand.popular(self.catalog, self.popularity, segment, k, flt, reason)

    def _index_only(
        self, index: ItemIndex | None, version: str, ids: Sequence[int] | np.ndarray
    ) -> dict[int, ItemInfo]:
        return cand.index_only_info(self.index_only, self.catalog, index, version, ids)

    def _degrade(self, method: str, reasons: Sequence[str]) -> None:
        if self.metrics is not None:
            for r in reasons:
                self.metrics.degraded.labels(method, r).inc()
