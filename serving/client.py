"""A small Python client of the Recommend service: deadlines, retries, API key, optional TLS.

Retries use gRPC's own retry policy (exponential backoff on UNAVAILABLE, the status a
restarting or overloaded server returns); every call carries a deadline.

    with RecommendClient("127.0.0.1:50051", api_key="...") as c:
        resp = c.recommend(user_id="A1B2C3", k=10)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc


def _service_config(retries: int) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "ecomrec.v1.RecommendService"}],
                    "retryPolicy": {
                        "maxAttempts": max(2, retries + 1),
                        "initialBackoff": "0.02s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class RecommendClient:
    """Typed convenience wrapper over the generated stub."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 1.0,
        retries: int = 2,
        tls_ca: str | Path | None = None,
        max_message_bytes: int = 1 << 20,
    ) -> None:
        from serving._generated.ecomrec.v1 import recommend_pb2, recommend_pb2_grpc

        self.pb = recommend_pb2
        self.timeout_s = timeout_s
        options = [
            ("grpc.enable_retries", 1 if retries > 0 else 0),
            ("grpc.service_config", _service_config(retries)),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = recommend_pb2_grpc.RecommendServiceStub(self.channel)
        self._md: tuple[tuple[str, str], ...] = (("x-api-key", api_key),) if api_key else ()

    def _call(self, method: str, request: Any, timeout_s: float | None) -> Any:
        return getattr(self.stub, method)(
            request, metadata=self._md, timeout=timeout_s or self.timeout_s
        )

    def recommend(
        self,
        user_id: str = "",
        k: int = 10,
        *,
        events: Sequence[tuple[str, str, int]] = (),
        categories: Sequence[str] = (),
        price_min: float | None = None,
        price_max: float | None = None,
        in_stock_only: bool = False,
        exclude: Sequence[str] = (),
        include_purchased: bool = False,
        request_id: str = "",
        timeout_s: float | None = None,
        mode: str = "",
    ) -> Any:
        """``RecommendResponse``; ``events`` are ``(item_id, event_type, unix_ts)``; ``mode``
        ``""``/``"explore"`` (new items) or ``"buy-again"`` (own items blended in)."""
        pb = self.pb
        f = pb.Filters(categories=list(categories), in_stock_only=in_stock_only)
        if price_min is not None:
            f.price_min = price_min
        if price_max is not None:
            f.price_max = price_max
        req = pb.RecommendRequest(
            request_id=request_id,
            user_id=user_id,
            k=k,
            recent_events=[pb.Event(item_id=i, event_type=t, ts=ts) for i, t, ts in events],
            filters=f,
            exclude_item_ids=list(exclude),
            include_purchased=include_purchased,
            mode=mode,
        )
        return self._call("Recommend", req, timeout_s)

    def similar_items(self, item_id: str, k: int = 10, timeout_s: float | None = None) -> Any:
        return self._call(
            "SimilarItems", self.pb.SimilarItemsRequest(item_id=item_id, k=k), timeout_s
        )

    def user_profile(self, user_id: str, timeout_s: float | None = None) -> Any:
        return self._call(
            "GetUserProfile", self.pb.GetUserProfileRequest(user_id=user_id), timeout_s
        )

    def list_segments(self, kind: str = "", timeout_s: float | None = None) -> Any:
        return self._call("ListSegments", self.pb.ListSegmentsRequest(kind=kind), timeout_s)

    def get_segment(
        self, segment_id: str, include_centroid: bool = False, timeout_s: float | None = None
    ) -> Any:
        req = self.pb.GetSegmentRequest(segment_id=segment_id, include_centroid=include_centroid)
        return self._call("GetSegment", req, timeout_s)

    def find_audience(
        self,
        text: str = "",
        item_ids: Sequence[str] = (),
        k: int = 100,
        segments: Sequence[str] = (),
        timeout_s: float | None = None,
    ) -> Any:
        req = self.pb.FindAudienceRequest(
            text=text, item_ids=list(item_ids), k=k, segments=list(segments)
        )
        return self._call("FindAudience", req, timeout_s)

    def _filters(
        self,
        categories: Sequence[str] = (),
        price_min: float | None = None,
        price_max: float | None = None,
        in_stock_only: bool = False,
    ) -> Any:
        f = self.pb.Filters(categories=list(categories), in_stock_only=in_stock_only)
        if price_min is not None:
            f.price_min = price_min
        if price_max is not None:
            f.price_max = price_max
        return f

    def complete_basket(
        self,
        item_ids: Sequence[str],
        user_id: str = "",
        k: int = 10,
        *,
        categories: Sequence[str] = (),
        price_min: float | None = None,
        price_max: float | None = None,
        in_stock_only: bool = False,
        exclude: Sequence[str] = (),
        timeout_s: float | None = None,
    ) -> Any:
        """``CompleteBasketResponse``: complements of the items in a cart or on a page."""
        req = self.pb.CompleteBasketRequest(
            item_ids=list(item_ids),
            user_id=user_id,
            k=k,
            filters=self._filters(categories, price_min, price_max, in_stock_only),
            exclude_item_ids=list(exclude),
        )
        return self._call("CompleteBasket", req, timeout_s)

    def search_products(
        self,
        query: str,
        user_id: str = "",
        k: int = 10,
        *,
        categories: Sequence[str] = (),
        price_min: float | None = None,
        price_max: float | None = None,
        in_stock_only: bool = False,
        exclude: Sequence[str] = (),
        timeout_s: float | None = None,
    ) -> Any:
        """``SearchProductsResponse``: products for a text query (personalised with a user)."""
        req = self.pb.SearchProductsRequest(
            query=query,
            user_id=user_id,
            k=k,
            filters=self._filters(categories, price_min, price_max, in_stock_only),
            exclude_item_ids=list(exclude),
        )
        return self._call("SearchProducts", req, timeout_s)

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Block until health says SERVING (or the timeout passes)."""
        import time

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        h = health_pb2_grpc.HealthStub(self.channel)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                r = h.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecommendClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _attribution(resp: Any) -> list[str]:
    """The line a shop's frontend copies into the events it sends back (docs/outcomes.md):
    the answer's ``recommendation_id`` and the A/B ``variant`` that served it."""
    rid = getattr(resp, "recommendation_id", "")
    if not rid:
        return []
    return [f"recommendation_id {rid}  variant {getattr(resp, 'variant', '') or 'default'}"]


def format_response(resp: Any) -> str:
    """A human-readable block for one RecommendResponse."""
    # an empty segment: the customer is in no segment, so "popular" is over all customers
    seg = resp.segment or "none (popular = over all customers)"
    head = f"segment {seg}  model {resp.model_version}  index {resp.index_version or 'none'}"
    if resp.degraded:
        head += f"  DEGRADED {','.join(resp.degraded_reasons)}"
    lines = [head, *_attribution(resp)]
    for n, it in enumerate(resp.items, 1):
        title = (it.title[:60] + "...") if len(it.title) > 63 else it.title
        reasons = [
            "POPULAR" if (r == "POPULAR_IN_SEGMENT" and not resp.segment) else r for r in it.reasons
        ]
        lines.append(f"  {n:>2}. {it.item_id:<12} {it.score:7.3f}  {'+'.join(reasons):<32} {title}")
    return "\n".join(lines)


def format_products(resp: Any) -> str:
    """A human-readable block for a CompleteBasket / SearchProducts response."""
    head = f"model {resp.model_version}"
    unknown = list(getattr(resp, "unknown_item_ids", ()))
    if unknown:
        head += f"  ignored unknown items: {', '.join(unknown)}"
    if resp.degraded:
        head += f"  DEGRADED {','.join(resp.degraded_reasons)}"
    lines = [head, *_attribution(resp)]
    for n, it in enumerate(resp.items, 1):
        title = (it.title[:50] + "...") if len(it.title) > 53 else it.title
        lines.append(
            f"  {n:>2}. {it.item_id:<12} {it.score:7.3f}  {title:<53} {' '.join(it.reasons)}"
        )
    return "\n".join(lines)
