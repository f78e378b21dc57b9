"""The gRPC edge of the Recommend service.

:class:`RecommendServicer` converts protobuf messages to the engine's dataclasses
(:mod:`serving.engine`), runs the request under its deadline, records metrics and the
access log, and maps errors to status codes through :func:`serving.status.status_for`.
Stack traces are logged, never sent.

Every handler is async, in one style: a unary method is an ``async def`` body behind
:func:`_rpc` (call bookkeeping, metrics, access log, error -> status), RecommendBatch an
async generator.  They run on the server's event loop; blocking work (index searches,
FindAudience, Recommend on the "threads" path, RecommendBatch's chunks) goes to the
worker pool (:meth:`RecommendServicer._blocking`), so a client that cancels a call never
strands a worker or a stream slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError, NotFoundError
from outcomes.live import LiveOutcomes
from outcomes.served_log import DEFAULT_VARIANT
from serving import validation as val
from serving.config import ServeConfig
from serving.encoders import EncoderUnavailableError
from serving.engine import Recommender
from serving.events import EventIntake
from serving.observability import LogLimiter, Metrics, pseudonymise
from serving.requests import (
    CancelledError,
    FailedPreconditionError,
    PermissionDeniedError,
    RecommendResult,
    RequestContext,
    ResultItem,
    UnavailableError,
)
from serving.status import status_for

if TYPE_CHECKING:
    from serving._generated.ecomrec.v1 import recommend_pb2 as pb2

log = logging.getLogger(__name__)
access_log = logging.getLogger("ecomrec.serving.access")
_unavailable_log = LogLimiter(log, 10.0)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")


def _pb() -> Any:
    from serving._generated.ecomrec.v1 import recommend_pb2

    return recommend_pb2


def _servicer_base() -> type:
    try:
        from serving._generated.ecomrec.v1 import recommend_pb2_grpc
    except ImportError as e:  # pragma: no cover - stubs not generated
        raise ImportError("gRPC stubs missing: run `python -m serving.gen_protos`") from e
    return recommend_pb2_grpc.RecommendServiceServicer  # type: ignore[no-any-return]


def _activity(context: grpc.aio.ServicerContext) -> Callable[[], bool]:
    """``is_active`` of a call (read from worker threads too: a plain flag read)."""
    done = context.done
    return lambda: not done()


class _Call:
    """One call's bookkeeping: start time, request id, engine context."""

    __slots__ = ("context", "ctx", "rid", "t0")

    def __init__(
        self, request: Any, context: grpc.aio.ServicerContext, default_deadline_s: float
    ) -> None:
        self.t0 = time.perf_counter()
        self.context = context
        self.rid: str = getattr(request, "request_id", "") or uuid.uuid4().hex[:16]
        remaining = context.time_remaining()
        timeout = default_deadline_s if remaining is None else min(remaining, 3600.0)
        self.ctx = RequestContext.with_timeout(timeout, _activity(context))


def _rpc(
    method: str,
) -> Callable[
    [Callable[[Any, _Req, _Call], Awaitable[_Resp]]],
    Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]],
]:
    """Wrap a servicer body ``async (self, request, call) -> response``: request context,
    metrics, access log, error mapping, and a client's cancel counted as CANCELLED."""

    def deco(
        fn: Callable[[Any, _Req, _Call], Awaitable[_Resp]],
    ) -> Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]:
        @functools.wraps(fn)
        async def wrapper(
            self: RecommendServicer, request: _Req, context: grpc.aio.ServicerContext
        ) -> _Resp:
            call = _Call(request, context, self.cfg.default_deadline_s)
            response: Any = None
            error: Exception | None = None
            try:
                response = await fn(self, request, call)
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                self._done(method, call, request, context, None, _cancelled())
                raise
            except Exception as e:
                error = e
            code, detail = self._done(method, call, request, context, response, error)
            if code != grpc.StatusCode.OK:
                await context.abort(code, detail)
            return response  # type: ignore[no-any-return]

        return wrapper

    return deco


def _cancelled() -> CancelledError:
    return CancelledError("cancelled by the client (or its deadline passed)")


def _take(results: Iterator[_T], n: int) -> list[_T]:
    """Up to ``n`` next items of ``results`` (one worker-pool hop per chunk, not per item)."""
    out = []
    for r in results:
        out.append(r)
        if len(out) == n:
            break
    return out


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
        events: EventIntake | None = None,
    ) -> None:
        if engine is None and cfg is None:
            raise ValueError("give an engine or a config")
        self._engine = engine
        self.cfg: ServeConfig = engine.cfg if engine is not None else cfg  # type: ignore[assignment]
        self.metrics = metrics or (engine.metrics if engine is not None else None)
        self.pb = _pb()
        if events is None:
            events = EventIntake.from_config(self.cfg)  # event_backend: sqlite / nats
        self.events = events  # TrackEvents and live history (None: no event log)
        self.forgotten: set[str] = set()  # customers forgotten since start (ForgetCustomer)
        # A/B test (serving.variants.VariantRouter): customer -> (variant, engine); None = no test
        self.router: Any = None
        # recommendation ids, the served log, live attribution (docs/outcomes.md)
        self.outcomes = LiveOutcomes(
            self.cfg.served_log or self.cfg.event_log or None,
            self.cfg.served_log_flush_s,
            self.cfg.outcomes_live_answers,
        )
        self._metrics_registered: set[int] = set()
        if self.metrics is not None:
            self.register_metrics(self.metrics)

    def register_metrics(self, metrics: Metrics) -> None:
        """Put the live outcome counters on ``metrics``' registry (once per registry)."""
        if id(metrics.registry) in self._metrics_registered:
            return
        from serving.outcomes_live import OutcomesCollector

        metrics.registry.register(OutcomesCollector(self.outcomes))
        self._metrics_registered.add(id(metrics.registry))

    def _served(
        self,
        method: str,
        customer: str,
        model_version: str,
        items: Sequence[ResultItem],
        variant: str = DEFAULT_VARIANT,
    ) -> tuple[str, str]:
        """(recommendation id, variant) of an answer, queued for the served log."""
        rid = self.outcomes.served(
            method, customer, variant, model_version, [i.item_id for i in items]
        )
        return rid, variant

    def _served_fields(self, method: str, customer: str, res: Any, variant: str) -> dict[str, str]:
        """The ``recommendation_id`` / ``variant`` fields of one batch item's answer."""
        rid, variant = self._served(method, customer, res.model_version, res.items, variant)
        return {"recommendation_id": rid, "variant": variant}

    def _live(self, q: val.RecommendQuery, engine: Recommender | None = None) -> val.RecommendQuery:
        """``q`` with the customer's acknowledged live events (TrackEvents) merged in; a
        customer forgotten since start is served as a stranger (live events after it only)."""
        if q.user is not None and self._forgotten(q.user_external):
            q = dataclasses.replace(q, user=None)
        if self.events is None:
            return q
        return self.events.with_live(q, (engine or self.engine).items)

    def _forgotten(self, customer: str) -> bool:
        """Forgotten since start, here or (NATS back end) announced by another replica."""
        return customer in self.forgotten or (
            self.events is not None and self.events.is_forgotten(customer)
        )

    def close(self) -> None:
        """Release what the servicer owns (the event log, the served log); called when the
        server stops."""
        self.outcomes.close()
        if self.events is not None:
            self.events.close()

    @property
    def engine(self) -> Recommender:
        """The loaded engine; UNAVAILABLE until :meth:`attach` was called."""
        if self._engine is None:
            raise UnavailableError("the model and index are still loading")
        return self._engine

    def _route(self, customer_id: str) -> tuple[str, Recommender]:
        """``(variant, engine)`` of a customer: the A/B test's (docs/outcomes.md), else
        ``("default", self.engine)``; taken once per call."""
        if self.router is None:
            return "default", self.engine
        return self.router.route(customer_id, lambda: self.engine)  # type: ignore[no-any-return]

    def attach(self, engine: Recommender) -> None:
        """Start answering with ``engine`` (set health SERVING after this)."""
        if engine.metrics is None:
            engine.metrics = self.metrics
        if engine.metrics is not None:
            self.register_metrics(engine.metrics)
        self._engine = engine

    async def _blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the worker pool (the loop's default executor)."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _done(
        self,
        method: str,
        call: _Call,
        request: Any,
        context: grpc.aio.ServicerContext,
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
            elif isinstance(error, IndexUnavailableError | EncoderUnavailableError):
                # the client gets a fixed message; the cause (it may name files) is logged
                _unavailable_log.log(
                    logging.WARNING,
                    method,
                    "request %s: %s unavailable: %s",
                    call.rid,
                    method,
                    error,
                )
        elapsed = time.perf_counter() - call.t0
        stages = call.ctx.stages
        if self.metrics is not None:
            self.metrics.record_call(method, code.name, elapsed, stages)
        if stages and code != grpc.StatusCode.CANCELLED:
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
                        "variant": getattr(response, "variant", ""),  # A/B arm (if any)
                    }
                },
            )
        return code, detail

    @_rpc("Recommend")
    async def Recommend(self, request: pb2.RecommendRequest, call: _Call) -> pb2.RecommendResponse:
        """On the event loop (``ServeConfig.recommend_path``), or on a worker thread where
        concurrent requests' encode and search are batched."""
        # one engine per request (a reload or an experiment change may swap it meanwhile)
        variant, engine = self._route(request.user_id)
        q = self._live(
            val.validate_recommend(request, self.cfg, engine.users, engine.items), engine
        )
        if self.cfg.recommend_on_loop:
            res = engine.recommend(q, call.ctx)
        else:
            res = await self._blocking(engine.recommend, q, call.ctx)
        return self._recommend_response(call.rid, res, request.user_id, variant=variant)

    def _recommend_response(
        self,
        rid: str,
        res: RecommendResult,
        customer: str,
        method: str = "Recommend",
        variant: str = DEFAULT_VARIANT,
    ) -> pb2.RecommendResponse:
        rec_id, variant = self._served(method, customer, res.model_version, res.items, variant)
        return self.pb.RecommendResponse(  # type: ignore[no-any-return]
            request_id=rid,
            items=_filters_pb(self.pb, res.items),
            segment=res.segment,
            model_version=res.model_version,
            index_version=res.index_version,
            degraded=res.degraded,
            degraded_reasons=list(res.degraded_reasons),
            recommendation_id=rec_id,
            variant=variant,
        )

    def _batch_item(
        self,
        i: int,
        r: pb2.RecommendRequest,
        res: RecommendResult | BaseException,
        variant: str = "default",
    ) -> pb2.RecommendBatchItem:
        """One streamed item: the answer, or this request's own error."""
        pb = self.pb
        if isinstance(res, BaseException):
            c, detail = status_for(res)
            if c == grpc.StatusCode.INTERNAL:
                log.error("RecommendBatch item %d: unexpected error", i, exc_info=res)
                detail = f"internal error (request {r.request_id or i})"
            if c in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise res  # the whole call is over
            return pb.RecommendBatchItem(  # type: ignore[no-any-return]
                index=i, error_code=c.value[0], error_message=detail
            )
        rid = r.request_id or uuid.uuid4().hex[:16]
        return pb.RecommendBatchItem(  # type: ignore[no-any-return]
            index=i,
            response=self._recommend_response(rid, res, r.user_id, "RecommendBatch", variant),
        )

    def _batch_results(
        self, request: pb2.RecommendBatchRequest, ctx: RequestContext
    ) -> Iterator[tuple[str, RecommendResult | BaseException]]:
        """Every request's (variant, answer or error), in order (runs on the worker pool, in
        chunks).  Under an A/B test each variant's requests go to its own engine."""
        routed = [self._route(r.user_id) for r in request.requests]
        groups: dict[int, list[int]] = {}  # engine -> request positions
        for i, (_, eng) in enumerate(routed):
            groups.setdefault(id(eng), []).append(i)
        queries: dict[int, list[val.RecommendQuery]] = {g: [] for g in groups}
        failed: dict[int, Exception] = {}
        for i, r in enumerate(request.requests):
            engine = routed[i][1]
            try:
                q = val.validate_recommend(r, self.cfg, engine.users, engine.items)
                queries[id(engine)].append(self._live(q, engine))
            except Exception as e:
                failed[i] = e
        if len(groups) == 1:  # one engine: answers computed lazily, chunk by chunk
            g = next(iter(groups))
            results = {g: iter(routed[groups[g][0]][1].recommend_many(queries[g], ctx))}
        else:
            results = {
                g: iter(list(routed[pos[0]][1].recommend_many(queries[g], ctx)))
                for g, pos in groups.items()
            }
        for i in range(len(request.requests)):
            bad = failed.get(i)
            variant, engine = routed[i]
            yield variant, (bad if bad is not None else next(results[id(engine)]))

    async def RecommendBatch(
        self, request: pb2.RecommendBatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.RecommendBatchItem]:
        """Stream one RecommendBatchItem per request, in order (server streaming).  The
        engine works in chunks on the worker pool; a client's cancel ends the stream at the
        next chunk (counted as CANCELLED) and frees its slot at once."""
        call = _Call(request, context, self.cfg.default_deadline_s)
        code = grpc.StatusCode.OK
        n = len(request.requests)
        try:
            if n == 0 or n > self.cfg.max_batch_requests:
                raise InvalidArgumentError(
                    "requests", f"give 1..{self.cfg.max_batch_requests} requests, got {n}"
                )
            results = self._batch_results(request, call.ctx)
            i = 0
            while i < n:
                chunk = await self._blocking(_take, results, 64)
                if not chunk:
                    break
                for variant, res in chunk:
                    yield self._batch_item(i, request.requests[i], res, variant)
                    i += 1
        except (asyncio.CancelledError, GeneratorExit):
            # the client cancelled or its deadline passed: grpc.aio cancels the task or
            # closes this generator at its next yield
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code, detail = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("RecommendBatch: unexpected error")
                detail = "internal error (RecommendBatch)"
            await context.abort(code, detail)
        finally:
            if self.metrics is not None:
                self.metrics.record_call(
                    "RecommendBatch", code.name, time.perf_counter() - call.t0, {}
                )

    @_rpc("SimilarItems")
    async def SimilarItems(
        self, request: pb2.SimilarItemsRequest, call: _Call
    ) -> pb2.SimilarItemsResponse:
        # one engine per request; no customer: the A/B test's control (docs/outcomes.md)
        variant, engine = self._route("")
        q = val.validate_similar(request, self.cfg, engine.items)
        res = await self._blocking(engine.similar, q, call.ctx)  # an index search
        rec_id, variant = self._served("SimilarItems", "", res.model_version, res.items, variant)
        return self.pb.SimilarItemsResponse(  # type: ignore[no-any-return]
            request_id=call.rid,
            items=_filters_pb(self.pb, res.items),
            model_version=res.model_version,
            index_version=res.index_version,
            degraded=res.degraded,
            degraded_reasons=list(res.degraded_reasons),
            recommendation_id=rec_id,
            variant=variant,
        )

    @_rpc("GetUserProfile")
    async def GetUserProfile(
        self, request: pb2.GetUserProfileRequest, call: _Call
    ) -> pb2.UserProfile:
        engine = self.engine  # in-memory lookups: on the loop
        if self._forgotten(request.user_id):
            raise NotFoundError(f"user_id: unknown user {request.user_id[:40]!r}")
        live = 0
        if self.events is not None:
            val._check_id("user_id", request.user_id, self.cfg, required=True)
            live = self.events.live.count(request.user_id)
        if live and engine.users.get(request.user_id) is None:
            # known only from live events: no segments or scores yet (next refresh)
            return self.pb.UserProfile(  # type: ignore[no-any-return]
                user_id=request.user_id,
                churn_probability=-1.0,
                high_value_probability=-1.0,
                recency_days=-1.0,
                frequency=-1,
                monetary=-1.0,
                n_events=live,
            )
        user = val.validate_user_id(request.user_id, self.cfg, engine.users)
        p = engine.profile(user)
        s = p.segments

        def num(v: float | None) -> float:
            return -1.0 if v is None else float(v)

        return self.pb.UserProfile(  # type: ignore[no-any-return]
            user_id=p.user_id,
            rfm_segment=s.rfm or "",
            behavioural_segment=s.behavioural or "",
            churn_probability=num(s.churn_probability),
            high_value_probability=num(s.high_value_probability),
            recency_days=num(s.recency_days),
            frequency=-1 if s.frequency is None else s.frequency,
            monetary=num(s.monetary),
            n_events=p.n_events + live,
        )

    @_rpc("ListSegments")
    async def ListSegments(
        self, request: pb2.ListSegmentsRequest, call: _Call
    ) -> pb2.ListSegmentsResponse:
        kind = val.check_segment_kind(request.kind)
        segs = self.engine.list_segments(kind)  # in memory: on the loop
        return self.pb.ListSegmentsResponse(  # type: ignore[no-any-return]
            segments=[
                self.pb.SegmentSummary(
                    segment_id=s.segment_id, name=s.name, kind=s.kind, size=s.size
                )
                for s in segs
            ]
        )

    @_rpc("GetSegment")
    async def GetSegment(self, request: pb2.GetSegmentRequest, call: _Call) -> pb2.Segment:
        val._check_id("segment_id", request.segment_id, self.cfg, required=True)
        s = self.engine.get_segment(request.segment_id)  # in memory: on the loop
        centroid = [] if s.centroid is None or not request.include_centroid else s.centroid.tolist()
        return self.pb.Segment(  # type: ignore[no-any-return]
            segment_id=s.segment_id,
            name=s.name,
            kind=s.kind,
            size=s.size,
            profile=s.profile,
            centroid=centroid,
            top_categories=list(s.top_categories),
        )

    @_rpc("FindAudience")
    async def FindAudience(
        self, request: pb2.FindAudienceRequest, call: _Call
    ) -> pb2.FindAudienceResponse:
        engine = self.engine  # one engine per request (a reload may swap it meanwhile)
        q = val.validate_audience(request, self.cfg, engine.items)  # sizes before any work
        res = await self._blocking(engine.find_audience, q, call.ctx)
        return self.pb.FindAudienceResponse(  # type: ignore[no-any-return]
            request_id=call.rid,
            members=[
                self.pb.AudienceMember(user_id=u, score=s, segment=g)
                for u, s, g in res.members
                if not self._forgotten(u)
            ],
            model_version=engine.model_version,
            degraded=res.degraded,
        )

    @_rpc("TrackEvents")
    async def TrackEvents(
        self, request: pb2.TrackEventsRequest, call: _Call
    ) -> pb2.TrackEventsResponse:
        """Validate (on the loop), append durably (the log's writer thread), answer."""
        if self.events is None:
            raise FailedPreconditionError(
                'this service has no event log (set event_log, or event_backend = "nats", '
                "in the serve config)"
            )
        res = await self.events.track_async(request)  # validation here, the commit awaited
        if res.events and not res.ack.replayed:
            self.outcomes.observe(res.events)  # live attribution counters (/metrics)
        return self.pb.TrackEventsResponse(  # type: ignore[no-any-return]
            request_id=call.rid,
            accepted=res.accepted,
            errors=[
                self.pb.EventError(index=e.index, field=e.field, message=e.message)
                for e in res.problems
            ],
            first_position=res.ack.first_seq,
            last_position=res.ack.last_seq,
            replayed=res.ack.replayed,
        )

    @_rpc("ForgetCustomer")
    async def ForgetCustomer(
        self, request: pb2.ForgetCustomerRequest, call: _Call
    ) -> pb2.ForgetCustomerResponse:
        """Admin: forget a customer in the log, the service's memory and (configured) the
        dataset folder and derived files."""
        md = dict(call.context.invocation_metadata() or ())
        key = md.get("x-api-key") or md.get("authorization", "").removeprefix("Bearer ").strip()
        if not self.cfg.admin_keys or key not in self.cfg.admin_keys:
            raise PermissionDeniedError("ForgetCustomer needs an admin key (serve admin_keys)")
        customer = val._check_id("customer_id", request.customer_id, self.cfg, required=True)
        receipt, complete = await self._blocking(self._forget, customer)
        return self.pb.ForgetCustomerResponse(  # type: ignore[no-any-return]
            request_id=call.rid, receipt=receipt, complete=complete
        )

    def _forget(self, customer: str) -> tuple[list[str], bool]:
        self.forgotten.add(customer)
        lines = ["forgotten in this service's memory (history, profile, audiences)"]
        n_served = self.outcomes.forget(customer)
        lines.append(f"removed {n_served:>8,}  answers in the served-recommendation log")
        if self.events is not None:
            self.events.live.forget(customer)
        try:
            if self.cfg.forget_dataset:
                from lifecycle.forget import forget_everywhere, user_index_config

                r = forget_everywhere(
                    customer,
                    self.cfg.forget_dataset,
                    event_log=self.events.log if self.events is not None else None,
                    artifacts=self.cfg.forget_artifacts,
                    keys=(self.cfg.pseudonym_salt,),
                    user_index=user_index_config(self.cfg.forget_user_index),
                    users_alias=self.cfg.forget_users_alias,
                )
                return lines + r.lines(), not r.leftover
            if self.events is not None:
                n = self.events.log.forget(customer)
                lines.append(f"removed {n:>8,}  events in the live log")
            lines.append("note: no forget_dataset configured: run `ecomrec customers forget` on it")
            return lines, True
        finally:
            if self.events is not None:  # after the log's erase; NATS: every replica is told
                self.events.forget(customer)

    @_rpc("CompleteBasket")
    async def CompleteBasket(
        self, request: pb2.CompleteBasketRequest, call: _Call
    ) -> pb2.CompleteBasketResponse:
        from serving.complete import complete_basket, validate_basket
        from serving.discovery import is_ready

        variant, engine = self._route(request.user_id)  # one engine per request
        q = validate_basket(request, self.cfg, engine.users, engine.items)
        if is_ready(engine.complements):  # ~1 ms of numpy: on the loop, no thread hand-over
            res = complete_basket(engine, q, call.ctx)
        else:  # the first call builds the model (seconds): on the worker pool
            res = await self._blocking(complete_basket, engine, q, call.ctx)
        rec_id, variant = self._served(
            "CompleteBasket", request.user_id, res.model_version, res.items, variant
        )
        return self.pb.CompleteBasketResponse(  # type: ignore[no-any-return]
            request_id=call.rid,
            items=_filters_pb(self.pb, res.items),
            model_version=res.model_version,
            unknown_item_ids=list(res.unknown),
            degraded=res.degraded,
            degraded_reasons=list(res.degraded_reasons),
            recommendation_id=rec_id,
            variant=variant,
        )

    @_rpc("SearchProducts")
    async def SearchProducts(
        self, request: pb2.SearchProductsRequest, call: _Call
    ) -> pb2.SearchProductsResponse:
        from serving.search import answers_from_memory, search_products, validate_search

        variant, engine = self._route(request.user_id)  # one engine per request
        q = validate_search(request, self.cfg, engine.users, engine.items)
        if answers_from_memory(engine, q):  # ~0.5 ms of numpy: on the loop (docs/complements.md)
            res = search_products(engine, q, call.ctx)
        else:  # a MiniLM or user-tower forward: on the worker pool
            res = await self._blocking(search_products, engine, q, call.ctx)
        rec_id, variant = self._served(
            "SearchProducts", request.user_id, res.model_version, res.items, variant
        )
        return self.pb.SearchProductsResponse(  # type: ignore[no-any-return]
            request_id=call.rid,
            items=_filters_pb(self.pb, res.items),
            model_version=res.model_version,
            degraded=res.degraded,
            degraded_reasons=list(res.degraded_reasons),
            recommendation_id=rec_id,
            variant=variant,
        )

    async def CompleteBasketBatch(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Stream one CompleteBasketBatchItem per request, in order (serving/products_batch.py)."""
        from serving.products_batch import stream

        call = _Call(request, context, self.cfg.default_deadline_s)
        pb = self.pb
        async for item in stream(
            self, "CompleteBasketBatch", request, context, call,
            lambda r, rid, res, variant: pb.CompleteBasketResponse(
                request_id=rid, items=_filters_pb(pb, res.items), model_version=res.model_version,
                unknown_item_ids=list(res.unknown), degraded=res.degraded,
                degraded_reasons=list(res.degraded_reasons),
                **self._served_fields("CompleteBasket", r.user_id, res, variant),
            ),
            pb.CompleteBasketBatchItem,
        ):  # fmt: skip
            yield item

    async def SearchProductsBatch(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Stream one SearchProductsBatchItem per request, in order (serving/products_batch.py)."""
        from serving.products_batch import stream

        call = _Call(request, context, self.cfg.default_deadline_s)
        pb = self.pb
        async for item in stream(
            self, "SearchProductsBatch", request, context, call,
            lambda r, rid, res, variant: pb.SearchProductsResponse(
                request_id=rid, items=_filters_pb(pb, res.items), model_version=res.model_version,
                degraded=res.degraded, degraded_reasons=list(res.degraded_reasons),
                **self._served_fields("SearchProducts", r.user_id, res, variant),
            ),
            pb.SearchProductsBatchItem,
        ):  # fmt: skip
            yield item
