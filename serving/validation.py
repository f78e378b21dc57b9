"""Boundary validation: protobuf requests -> plain frozen dataclasses.

Every check raises :class:`ecomrec.errors.InvalidArgumentError` naming the offending
field (``recent_events[3].event_type``) or :class:`ecomrec.errors.NotFoundError` for ids
the model does not know.  Nothing past this module sees a protobuf message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ecomrec.errors import InvalidArgumentError, NotFoundError
from indexing.base import SearchFilter
from intake.schema import EVENT_TYPE_IDS
from serving.config import ServeConfig

MAX_CATEGORIES = 50
#: FindAudience.segments: names per request (duplicates are dropped after this check).
MAX_AUDIENCE_SEGMENTS = 50
#: Characters of a bad value quoted back in an error message (the rest is elided: a
#: 16 KB value must not become a 16 KB status message).
QUOTE_CHARS = 32
# Events more than this far in the future are rejected (clock skew allowance).
FUTURE_SLACK_S = 86_400
DEFAULT_K = 10


class IdLookup(Protocol):
    """What validation needs from an id map (``intake.dataset.IdMap`` satisfies it)."""

    def get(self, external_id: str) -> int | None: ...


@dataclass(frozen=True)
class RecentEvent:
    """One request-supplied event, in internal ids."""

    item_id: int
    event_type: int  # id from intake.schema.EVENT_TYPE_IDS
    ts: int  # unix seconds


@dataclass(frozen=True)
class RecommendQuery:
    """A validated Recommend request."""

    request_id: str
    user_external: str  # "" when anonymous
    user: int | None  # internal id, None when anonymous or unknown (cold start)
    recent: tuple[RecentEvent, ...]
    k: int
    filters: SearchFilter
    exclude: tuple[int, ...]
    include_purchased: bool = False
    skip_rerank: bool = False
    mode: str = "explore"  # "explore" | "buy-again"


@dataclass(frozen=True)
class SimilarQuery:
    """A validated SimilarItems request."""

    request_id: str
    item: int
    item_external: str
    k: int
    filters: SearchFilter


@dataclass(frozen=True)
class AudienceQuery:
    """A validated FindAudience request."""

    request_id: str
    text: str
    items: tuple[int, ...]
    k: int
    segments: tuple[str, ...]


def quote(value: str) -> str:
    """``repr`` of at most :data:`QUOTE_CHARS` characters of a caller's value, for messages."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def _check_id(field: str, value: str, cfg: ServeConfig, *, required: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "expected a string")
    if required and not value:
        raise InvalidArgumentError(field, "is required")
    if len(value) > cfg.max_id_length:
        raise InvalidArgumentError(field, f"longer than {cfg.max_id_length} characters")
    if value and (not value.isprintable() or value != value.strip()):
        raise InvalidArgumentError(field, "must be printable without surrounding spaces")
    return value


def check_request_id(value: str, cfg: ServeConfig) -> str:
    """The caller's request id (may be empty: the server then makes one)."""
    return _check_id("request_id", value, cfg)


def check_k(k: int, cfg: ServeConfig, field: str = "k") -> int:
    """``k`` in ``[1, max_k]``; 0 (proto default) means :data:`DEFAULT_K`."""
    if k == 0:
        return min(DEFAULT_K, cfg.max_k)
    if not 1 <= k <= cfg.max_k:
        raise InvalidArgumentError(field, f"must be in [1, {cfg.max_k}], got {k}")
    return int(k)


def check_filters(msg: Any, cfg: ServeConfig, field: str = "filters") -> SearchFilter:
    """A ``Filters`` message -> :class:`indexing.base.SearchFilter`."""
    cats = list(msg.categories)
    if len(cats) > MAX_CATEGORIES:
        raise InvalidArgumentError(f"{field}.categories", f"at most {MAX_CATEGORIES} entries")
    for i, c in enumerate(cats):
        _check_id(f"{field}.categories[{i}]", c, cfg, required=True)
    bounds: dict[str, float | None] = {}
    for name in ("price_min", "price_max"):
        if msg.HasField(name):
            v = float(getattr(msg, name))
            if not math.isfinite(v) or v < 0:
                raise InvalidArgumentError(
                    f"{field}.{name}", f"must be a finite number >= 0, got {v}"
                )
            bounds[name] = v
        else:
            bounds[name] = None
    lo, hi = bounds["price_min"], bounds["price_max"]
    if lo is not None and hi is not None and lo > hi:
        raise InvalidArgumentError(f"{field}.price_min", f"{lo} is greater than price_max {hi}")
    return SearchFilter(
        categories=tuple(dict.fromkeys(cats)),
        price_min=lo,
        price_max=hi,
        in_stock=True if msg.in_stock_only else None,
    )


def check_events(
    events: Sequence[Any], items: IdLookup, cfg: ServeConfig, now: float
) -> tuple[RecentEvent, ...]:
    """Request events -> internal ids, in time order (stable for equal times)."""
    if len(events) > cfg.max_recent_events:
        raise InvalidArgumentError("recent_events", f"at most {cfg.max_recent_events} events")
    out = []
    for i, e in enumerate(events):
        f = f"recent_events[{i}]"
        ext = _check_id(f"{f}.item_id", e.item_id, cfg, required=True)
        item = items.get(ext)
        if item is None:
            raise NotFoundError(f"{f}.item_id: unknown item {ext!r}")
        et_name = e.event_type or "purchase"
        if et_name not in EVENT_TYPE_IDS:
            raise InvalidArgumentError(
                f"{f}.event_type", f"{quote(e.event_type)} is not one of {sorted(EVENT_TYPE_IDS)}"
            )
        ts = int(e.ts) if e.ts else int(now)
        if ts < 0 or ts > now + FUTURE_SLACK_S:
            raise InvalidArgumentError(f"{f}.ts", f"{e.ts} is not a plausible unix time")
        out.append(RecentEvent(item, EVENT_TYPE_IDS[et_name], ts))
    out.sort(key=lambda ev: ev.ts)
    return tuple(out)


def check_exclude(ids: Sequence[str], items: IdLookup, cfg: ServeConfig) -> tuple[int, ...]:
    """Item ids to exclude; unknown ids are harmless and dropped."""
    if len(ids) > cfg.max_exclude_ids:
        raise InvalidArgumentError("exclude_item_ids", f"at most {cfg.max_exclude_ids} ids")
    out = []
    for i, ext in enumerate(ids):
        _check_id(f"exclude_item_ids[{i}]", ext, cfg, required=True)
        item = items.get(ext)
        if item is not None:
            out.append(item)
    return tuple(dict.fromkeys(out))


def validate_recommend(
    req: Any, cfg: ServeConfig, users: IdLookup, items: IdLookup, now: float | None = None
) -> RecommendQuery:
    """Check a ``RecommendRequest``; an unknown user id is a cold start, not an error."""
    now = time.time() if now is None else now
    rid = check_request_id(req.request_id, cfg)
    user_ext = _check_id("user_id", req.user_id, cfg)
    return RecommendQuery(
        request_id=rid,
        user_external=user_ext,
        user=users.get(user_ext) if user_ext else None,
        recent=check_events(req.recent_events, items, cfg, now),
        k=check_k(req.k, cfg),
        filters=check_filters(req.filters, cfg),
        exclude=check_exclude(req.exclude_item_ids, items, cfg),
        include_purchased=bool(req.include_purchased),
        skip_rerank=bool(req.skip_rerank),
        mode=check_mode(getattr(req, "mode", "")),
    )


RECOMMEND_MODES = ("explore", "buy-again")


def check_mode(mode: str) -> str:
    """``""`` -> ``"explore"``; anything else must be one of :data:`RECOMMEND_MODES`."""
    m = mode or "explore"
    if m not in RECOMMEND_MODES:
        raise InvalidArgumentError(
            "mode", f"{quote(mode)} is not one of {', '.join(RECOMMEND_MODES)}"
        )
    return m


SEGMENT_KINDS = ("", "rfm", "behavioural")


def check_segment_kind(kind: str) -> str:
    """``ListSegmentsRequest.kind``: one of :data:`SEGMENT_KINDS` (``""`` = all)."""
    if kind not in SEGMENT_KINDS:
        raise InvalidArgumentError("kind", f"{quote(kind)} is not one of 'rfm', 'behavioural', ''")
    return kind


def validate_similar(req: Any, cfg: ServeConfig, items: IdLookup) -> SimilarQuery:
    """Check a ``SimilarItemsRequest``; an unknown item is NOT_FOUND."""
    rid = check_request_id(req.request_id, cfg)
    ext = _check_id("item_id", req.item_id, cfg, required=True)
    item = items.get(ext)
    if item is None:
        raise NotFoundError(f"item_id: unknown item {ext!r}")
    return SimilarQuery(rid, item, ext, check_k(req.k, cfg), check_filters(req.filters, cfg))


def validate_user_id(user_id: str, cfg: ServeConfig, users: IdLookup) -> int:
    """A required, known external user id -> internal id."""
    ext = _check_id("user_id", user_id, cfg, required=True)
    u = users.get(ext)
    if u is None:
        raise NotFoundError(f"user_id: unknown user {ext!r}")
    return u


def validate_audience(req: Any, cfg: ServeConfig, items: IdLookup) -> AudienceQuery:
    """Check a ``FindAudienceRequest``: a text or item ids (at least one).  Every list and
    string is size-checked before any of it is looked up."""
    rid = check_request_id(req.request_id, cfg)
    text = req.text
    if len(text) > cfg.max_text_length:
        raise InvalidArgumentError("text", f"longer than {cfg.max_text_length} characters")
    if len(req.item_ids) > cfg.max_exclude_ids:
        raise InvalidArgumentError("item_ids", f"at most {cfg.max_exclude_ids} ids")
    if len(req.segments) > MAX_AUDIENCE_SEGMENTS:
        raise InvalidArgumentError(
            "segments", f"at most {MAX_AUDIENCE_SEGMENTS} names, got {len(req.segments)}"
        )
    k = check_k(req.k, cfg)
    segs = tuple(
        dict.fromkeys(
            _check_id(f"segments[{i}]", s, cfg, required=True) for i, s in enumerate(req.segments)
        )
    )
    ids = []
    for i, ext in enumerate(req.item_ids):
        _check_id(f"item_ids[{i}]", ext, cfg, required=True)
        item = items.get(ext)
        if item is None:
            raise NotFoundError(f"item_ids[{i}]: unknown item {ext!r}")
        ids.append(item)
    if not text.strip() and not ids:
        raise InvalidArgumentError("text", "give a text or item_ids")
    return AudienceQuery(rid, text.strip(), tuple(ids), k, segs)
