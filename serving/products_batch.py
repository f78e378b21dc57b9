"""``CompleteBasketBatch`` / ``SearchProductsBatch``: many requests in one call.

The RecommendBatch pattern (serving/service.py): server streaming, one item per request
in request order, a request's own error (bad input, unknown items) in its item with the
status code a single call would give, the whole call ended by a deadline or a cancel.
The same limits apply: ``max_batch_requests`` requests per call, one of the gate's
``max_streams`` batch slots (serving/server.py), the API key.  The engine works in
chunks of 64 on the worker pool; for SearchProductsBatch each chunk's queries go
through ONE MiniLM forward first (the encoder's LRU then answers each request).  Every
answer equals the single call's (tests/serving/test_products_batch.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from ecomrec.errors import InvalidArgumentError
from serving.complete import ProductsResult, complete_basket, validate_basket
from serving.discovery import resolve
from serving.requests import RequestContext
from serving.search import search_products, validate_search
from serving.status import status_for

log = logging.getLogger(__name__)

CHUNK = 64


def _basket_chunk(
    engine: Any, cfg: Any, reqs: Sequence[Any], ctx: RequestContext
) -> list[ProductsResult | BaseException]:
    out: list[ProductsResult | BaseException] = []
    for r in reqs:
        try:
            q = validate_basket(r, cfg, engine.users, engine.items)
            out.append(complete_basket(engine, q, ctx))
        except Exception as e:
            out.append(e)
    return out


def _search_chunk(
    engine: Any, cfg: Any, reqs: Sequence[Any], ctx: RequestContext
) -> list[ProductsResult | BaseException]:
    queries: list[Any] = []
    for r in reqs:
        try:
            queries.append(validate_search(r, cfg, engine.users, engine.items))
        except Exception as e:
            queries.append(e)
    texts = list(dict.fromkeys(q.text for q in queries if not isinstance(q, Exception)))
    if texts:
        try:  # one forward for the chunk; each request then finds its vector in the LRU
            resolve(engine.product_search).encode(texts)
        except Exception as e:  # each request meets (and reports) the fault itself
            log.debug("SearchProductsBatch: chunk encode failed: %r", e)
    out: list[ProductsResult | BaseException] = []
    for q in queries:
        if isinstance(q, Exception):
            out.append(q)
            continue
        try:
            out.append(search_products(engine, q, ctx))
        except Exception as e:
            out.append(e)
    return out


RUNNERS: dict[str, Callable[..., list[ProductsResult | BaseException]]] = {
    "CompleteBasketBatch": _basket_chunk,
    "SearchProductsBatch": _search_chunk,
}


async def stream(
    servicer: Any,
    method: str,
    request: Any,
    context: grpc.aio.ServicerContext,
    call: Any,
    response: Callable[[Any, str, ProductsResult, str], Any],
    item: Any,
) -> AsyncIterator[Any]:
    """The batch call ``method`` of ``servicer``: yields ``item(index=, response=)`` or
    ``item(index=, error_code=, error_message=)`` per request, in order. ``response(request,
    request_id, result, variant)`` builds one answer. The whole call is answered by the
    engine an anonymous call gets (an A/B test's control, docs/outcomes.md)."""
    code = grpc.StatusCode.OK
    reqs = list(request.requests)
    n = len(reqs)
    cfg = servicer.cfg
    run = RUNNERS[method]
    try:
        if n == 0 or n > cfg.max_batch_requests:
            raise InvalidArgumentError(
                "requests", f"give 1..{cfg.max_batch_requests} requests, got {n}"
            )
        variant, engine = servicer._route("")  # one engine for the whole call: the control
        loop = asyncio.get_running_loop()
        for a in range(0, n, CHUNK):
            call.ctx.check("batch")
            chunk = reqs[a : a + CHUNK]
            results = await loop.run_in_executor(None, run, engine, cfg, chunk, call.ctx)
            for i, (r, res) in enumerate(zip(chunk, results, strict=True), start=a):
                if isinstance(res, BaseException):
                    c, detail = status_for(res)
                    if c == grpc.StatusCode.INTERNAL:
                        log.error("%s item %d: unexpected error", method, i, exc_info=res)
                        detail = f"internal error (request {r.request_id or i})"
                    if c in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                        raise res  # the whole call is over
                    yield item(index=i, error_code=c.value[0], error_message=detail)
                else:
                    yield item(index=i, response=response(r, res.request_id, res, variant))
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as e:
        code, detail = status_for(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s: unexpected error", method)
            detail = f"internal error ({method})"
        await context.abort(code, detail)
    finally:
        if servicer.metrics is not None:
            servicer.metrics.record_call(method, code.name, time.perf_counter() - call.t0, {})
