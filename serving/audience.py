"""FindAudience: every known customer's vector in memory, searched with a text's or items'
vector (the campaign side of the service; :class:`~serving.engine.Recommender` delegates)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ecomrec.errors import InvalidArgumentError
from serving import validation as val
from serving.requests import AudienceResult, IdMapLike, RequestContext, UnavailableError
from serving.segments import SegmentLookup


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


def find_audience(
    q: val.AudienceQuery,
    ctx: RequestContext,
    *,
    user_vectors: UserVectors | None,
    text_embedder: Callable[[list[str]], np.ndarray] | None,
    item_vectors: Callable[[list[int]], np.ndarray],
    segments: SegmentLookup,
    users: IdMapLike,
) -> AudienceResult:
    """Customers whose vectors are closest to a text's or items' vector.

    ``item_vectors(ids) -> (n, D)`` reads the items' stored vectors (the live index)."""
    if user_vectors is None:
        raise UnavailableError("no user vectors configured for FindAudience")
    parts = []
    if q.text:
        if text_embedder is None:
            raise InvalidArgumentError("text", "this deployment has no text model; give item_ids")
        parts.append(np.asarray(text_embedder([q.text]), np.float32)[0])
    if q.items:
        vecs = item_vectors(list(q.items))  # (n, D)
        parts.append(np.asarray(vecs, np.float32).mean(axis=0))
    vec = np.mean(parts, axis=0)  # (D,)
    vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
    ctx.check("audience")
    allowed = None
    if q.segments:
        allowed = np.concatenate([segments.members(s) for s in q.segments])
    found = user_vectors.search(vec, q.k, allowed)
    members = []
    for u, s in found:
        segs = segments.user(u)
        members.append(
            (users.to_external(u), s, (segs.rfm or segs.behavioural or "") if segs else "")
        )
    return AudienceResult(q.request_id, tuple(members), False)
