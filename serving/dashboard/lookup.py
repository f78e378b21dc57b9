"""The customer lookup: profile and recommendations, asked of the running gRPC service
with the signed-in user's API key (the service's own checks apply)."""

from __future__ import annotations

from typing import Any

import grpc

#: What a refused call means to someone reading the page (never a traceback).
_CODES = {
    grpc.StatusCode.NOT_FOUND: "unknown customer",
    grpc.StatusCode.UNAUTHENTICATED: "the service refused this API key",
    grpc.StatusCode.PERMISSION_DENIED: "the service refused this API key",
    grpc.StatusCode.UNAVAILABLE: "the Recommend service is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the Recommend service did not answer in time",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the Recommend service is busy: try again",
}


def call_error(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"invalid request: {e.details() if hasattr(e, 'details') else ''}"
    return _CODES.get(code, f"the service answered {getattr(code, 'name', code)}")  # type: ignore[arg-type]


def _num(v: float) -> float | None:
    """The proto's -1 (no model / not known yet) as None."""
    return None if v < 0 else float(v)


class ServiceLookup:
    """One channel to the service, shared by every request (each call carries its key)."""

    def __init__(self, target: str, *, tls_ca: str = "", timeout_s: float = 2.0) -> None:
        from serving.client import RecommendClient

        self._client = RecommendClient(
            target, tls_ca=tls_ca or None, timeout_s=timeout_s, retries=1
        )
        self.pb = self._client.pb
        self.timeout_s = timeout_s

    def _call(self, method: str, request: Any, key: str) -> Any:
        return getattr(self._client.stub, method)(
            request, metadata=(("x-api-key", key),), timeout=self.timeout_s
        )

    def profile(self, key: str, user_id: str) -> dict[str, Any]:
        p = self._call("GetUserProfile", self.pb.GetUserProfileRequest(user_id=user_id), key)
        return {
            "user_id": p.user_id,
            "rfm_segment": p.rfm_segment,
            "behavioural_segment": p.behavioural_segment,
            "churn_probability": _num(p.churn_probability),
            "high_value_probability": _num(p.high_value_probability),
            "recency_days": _num(p.recency_days),
            "frequency": None if p.frequency < 0 else int(p.frequency),
            "monetary": _num(p.monetary),
            "n_events": int(p.n_events),
        }

    def recommend(self, key: str, user_id: str, k: int) -> dict[str, Any]:
        r = self._call("Recommend", self.pb.RecommendRequest(user_id=user_id, k=k), key)
        return {
            "segment": r.segment,
            "model_version": r.model_version,
            "index_version": r.index_version,
            # issue 27's A/B fields, where the service has them
            "variant": getattr(r, "variant", ""),
            "degraded": bool(r.degraded),
            "degraded_reasons": list(r.degraded_reasons),
            "items": [
                {
                    "item_id": it.item_id,
                    "title": it.title,
                    "category": it.category,
                    "price": float(it.price),
                    "score": float(it.score),
                    "reasons": list(it.reasons),
                }
                for it in r.items
            ],
        }

    def customer(self, key: str, user_id: str, k: int) -> dict[str, Any]:
        """Profile and recommendations; a refused call fills ``*_error`` instead."""
        out: dict[str, Any] = {"profile": None, "profile_error": None}
        out.update(recommendations=None, recommend_error=None)
        try:
            out["profile"] = self.profile(key, user_id)
        except grpc.RpcError as e:
            out["profile_error"] = call_error(e)
        try:
            out["recommendations"] = self.recommend(key, user_id, k)
        except grpc.RpcError as e:
            out["recommend_error"] = call_error(e)
        return out

    def close(self) -> None:
        self._client.close()
