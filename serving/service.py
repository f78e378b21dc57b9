"""The gRPC edge of the Recommend service.

:class:`RecommendServicer` converts protobuf messages to the engine's dataclasses
(:mod:`serving.engine`), runs the request under its deadline, records metrics and the
access log, and maps errors to status codes through :func:`serving.status.status_for`.
Stack traces are logged, never sent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ecomrec.errors import InvalidArgumentError
from serving import validation as val
from serving.config import ServeConfig
from serving.engine import Recommender
from serving.observability import Metrics, pseudonymise
from serving.requests import RequestContext, ResultItem, UnavailableError
from serving.status import status_for

log = logging.getLogger(__name__)
access_log = logging.getLogger("ecomrec.serving.access")


def _pb() -> Any:
    from serving._generated.ecomrec.v1 import recommend_pb2

    return recommend_pb2


def _servicer_base() -> type:
    try:
        from serving._generated.ecomrec.v1 import recommend_pb2_grpc
    except ImportError as e:  # pragma: no cover - stubs not generated
        raise ImportError("gRPC stubs missing: run `python -m serving.gen_protos`") from e
    return recommend_pb2_grpc.RecommendServiceServicer  # type: ignore[no-any-return]


def _activity(context: Any) -> Callable[[], bool]:
    """``is_active`` of a call, for either context grpc.aio gives a handler."""
    done = getattr(context, "done", None)  # coroutine handler
    if done is not None:
        return lambda: not done()
    over = threading.Event()  # plain handler on a worker thread: no done()
    context.add_callback(over.set)
    return lambda: not over.is_set()


class _Call:
    """One unary call's bookkeeping: start time, request id, engine context."""

    __slots__ = ("ctx", "rid", "t0")

    def __init__(self, request: Any, context: Any, default_deadline_s: float) -> None:
        self.t0 = time.perf_counter()
        self.rid: str = getattr(request, "request_id", "") or uuid.uuid4().hex[:16]
        remaining = context.time_remaining()
        timeout = default_deadline_s if remaining is None else min(remaining, 3600.0)
        self.ctx = RequestContext.with_timeout(timeout, _activity(context))


def _rpc(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a servicer method: request context, metrics, access log and error mapping."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(self: RecommendServicer, request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(request, context, self.cfg.default_deadline_s)
            response = error = None
            try:
                response = fn(self, request, context, call.ctx, call.rid)
            except Exception as e:
                error = e
            code, detail = self._done(method, call, request, context, response, error)
            if code != grpc.StatusCode.OK:
                context.abort(code, detail)
            return response

        return wrapper

    return deco


def _filters_pb(pb: Any, items: Sequence[ResultItem]) -> list[Any]:
    return [
        pb.ScoredItem(
            item_id=i.item_id,
            score=i.score,
            relevance=i.relevance,
            reasons=list(i.reasons),
            category=i.category,
            price=i.price,
            title=i.title,
        )
        for i in items
    ]


class RecommendServicer(_servicer_base()):  # type: ignore[misc]
    """gRPC servicer: protobuf <-> dataclasses around a :class:`Recommender`."""

    def __init__(
        self,
        engine: Recommender | None,
        cfg: ServeConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if engine is None and cfg is None:
            raise ValueError("give an engine or a config")
        self._engine = engine
        self.cfg: ServeConfig = engine.cfg if engine is not None else cfg  # type: ignore[assignment]
        self.metrics = metrics or (engine.metrics if engine is not None else None)
        self.pb = _pb()

    @property
    def engine(self) -> Recommender:
        """The loaded engine; UNAVAILABLE until :meth:`attach` was called."""
        if self._engine is None:
            raise UnavailableError("the model and index are still loading")
        return self._engine

    def attach(self, engine: Recommender) -> None:
        """Start answering with ``engine`` (set health SERVING after this)."""
        if engine.metrics is None:
            engine.metrics = self.metrics
        self._engine = engine

    def _done(
        self,
        method: str,
        call: _Call,
        request: Any,
        context: Any,
        response: Any,
        error: Exception | None,
    ) -> tuple[grpc.StatusCode, str]:
        """Metrics, stage trailers and the access log of a finished call; its status."""
        code = grpc.StatusCode.OK
        detail = ""
        if error is not None:
            code, detail = status_for(error)
            if code == grpc.StatusCode.INTERNAL:
                log.error("request %s: unexpected error in %s", call.rid, method, exc_info=error)
                detail = f"internal error (request {call.rid})"
        elapsed = time.perf_counter() - call.t0
        stages = call.ctx.stages
        if self.metrics is not None:
            self.metrics.record_call(method, code.name, elapsed, stages)
        if stages:
            context.set_trailing_metadata(
                (("ecomrec-stages", ",".join(f"{k}={v * 1e3:.3f}" for k, v in stages.items())),)
            )
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s",
                method,
                code.name,
                extra={
                    "fields": {
                        "request_id": call.rid,
                        "method": method,
                        "code": code.name,
                        "ms": round(elapsed * 1e3, 3),
                        "user": pseudonymise(
                            getattr(request, "user_id", ""), self.cfg.pseudonym_salt
                        ),
                        "degraded": bool(getattr(response, "degraded", False)),
                    }
                },
            )
        return code, detail

    async def Recommend(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Recommend: on the event loop (``ServeConfig.recommend_path``), or on a worker
        thread where concurrent requests' encode and search are batched."""
        call = _Call(request, context, self.cfg.default_deadline_s)
        response = error = None
        try:
            engine = self.engine  # one engine per request (a reload may swap it meanwhile)
            q = val.validate_recommend(request, self.cfg, engine.users, engine.items)
            if self.cfg.recommend_on_loop:
                res = engine.recommend(q, call.ctx)
            else:
                loop = asyncio.get_running_loop()
                res = await loop.run_in_executor(None, engine.recommend, q, call.ctx)
            response = self._recommend_response(call.rid, res)
        except Exception as e:
            error = e
        code, detail = self._done("Recommend", call, request, context, response, error)
        if code != grpc.StatusCode.OK:
            await context.abort(code, detail)
        return response

    def _recommend_response(self, rid: str, res: Any) -> Any:
        return self.pb.RecommendResponse(
            request_id=rid,
            items=_filters_pb(self.pb, res.items),
            segment=res.segment,
            model_version=res.model_version,
            index_version=res.index_version,
            degraded=res.degraded,
            degraded_reasons=list(res.degraded_reasons),
        )

    def RecommendBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Stream one RecommendBatchItem per request, in order (server streaming)."""
        t0 = time.perf_counter()
        remaining = context.time_remaining()
        timeout = self.cfg.default_deadline_s if remaining is None else min(remaining, 3600.0)
        ctx = RequestContext.with_timeout(timeout, _activity(context))
        pb = self.pb
        code = grpc.StatusCode.OK
        n = len(request.requests)
        try:
            if n == 0 or n > self.cfg.max_batch_requests:
                raise InvalidArgumentError(
                    "requests", f"give 1..{self.cfg.max_batch_requests} requests, got {n}"
                )
            engine = self.engine
            queries: list[Any] = []
            failed: dict[int, Exception] = {}
            for i, r in enumerate(request.requests):
                try:
                    queries.append(val.validate_recommend(r, self.cfg, engine.users, engine.items))
                except Exception as e:
                    failed[i] = e
            results = iter(engine.recommend_many(queries, ctx))
            for i, r in enumerate(request.requests):
                res: Any = failed.get(i)
                if res is None:
                    res = next(results)
                if isinstance(res, BaseException):
                    c, detail = status_for(res)
                    if c == grpc.StatusCode.INTERNAL:
                        log.error("RecommendBatch item %d: unexpected error", i, exc_info=res)
                        detail = f"internal error (request {r.request_id or i})"
                    if c in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                        raise res  # the whole call is over
                    yield pb.RecommendBatchItem(
                        index=i, error_code=c.value[0], error_message=detail
                    )
                    continue
                rid = r.request_id or uuid.uuid4().hex[:16]
                yield pb.RecommendBatchItem(index=i, response=self._recommend_response(rid, res))
        except Exception as e:
            code, detail = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("RecommendBatch: unexpected error")
                detail = "internal error (RecommendBatch)"
            context.abort(code, detail)
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels("RecommendBatch", code.name).inc()
                self.metrics.latency.labels("RecommendBatch").observe(time.perf_counter() - t0)

    @_rpc("SimilarItems")
    def SimilarItems(self, request: Any, context: Any, ctx: RequestContext, rid: str) -> Any:
        engine = self.engine  # one engine per request (a reload may swap it meanwhile)
        q = val.validate_similar(request, self.cfg, engine.items)
        res = engine.similar(q, ctx)
        return self.pb.SimilarItemsResponse(
            request_id=rid,
            items=_filters_pb(self.pb, res.items),
            model_version=res.model_version,
            index_version=res.index_version,
            degraded=res.degraded,
            degraded_reasons=list(res.degraded_reasons),
        )

    @_rpc("GetUserProfile")
    def GetUserProfile(self, request: Any, context: Any, ctx: RequestContext, rid: str) -> Any:
        engine = self.engine  # one engine per request (a reload may swap it meanwhile)
        user = val.validate_user_id(request.user_id, self.cfg, engine.users)
        p = engine.profile(user)
        s = p.segments

        def num(v: float | None) -> float:
            return -1.0 if v is None else float(v)

        return self.pb.UserProfile(
            user_id=p.user_id,
            rfm_segment=s.rfm or "",
            behavioural_segment=s.behavioural or "",
            churn_probability=num(s.churn_probability),
            high_value_probability=num(s.high_value_probability),
            recency_days=num(s.recency_days),
            frequency=-1 if s.frequency is None else s.frequency,
            monetary=num(s.monetary),
            n_events=p.n_events,
        )

    @_rpc("ListSegments")
    def ListSegments(self, request: Any, context: Any, ctx: RequestContext, rid: str) -> Any:
        segs = self.engine.list_segments(request.kind)
        return self.pb.ListSegmentsResponse(
            segments=[
                self.pb.SegmentSummary(
                    segment_id=s.segment_id, name=s.name, kind=s.kind, size=s.size
                )
                for s in segs
            ]
        )

    @_rpc("GetSegment")
    def GetSegment(self, request: Any, context: Any, ctx: RequestContext, rid: str) -> Any:
        val._check_id("segment_id", request.segment_id, self.cfg, required=True)
        s = self.engine.get_segment(request.segment_id)
        centroid = [] if s.centroid is None or not request.include_centroid else s.centroid.tolist()
        return self.pb.Segment(
            segment_id=s.segment_id,
            name=s.name,
            kind=s.kind,
            size=s.size,
            profile=s.profile,
            centroid=centroid,
            top_categories=list(s.top_categories),
        )

    @_rpc("FindAudience")
    def FindAudience(self, request: Any, context: Any, ctx: RequestContext, rid: str) -> Any:
        engine = self.engine  # one engine per request (a reload may swap it meanwhile)
        q = val.validate_audience(request, self.cfg, engine.items)
        res = engine.find_audience(q, ctx)
        return self.pb.FindAudienceResponse(
            request_id=rid,
            members=[
                self.pb.AudienceMember(user_id=u, score=s, segment=g) for u, s, g in res.members
            ],
            model_version=engine.model_version,
            degraded=res.degraded,
        )
