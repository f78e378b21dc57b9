"""``TrackEvents`` behind the service: validate, append durably, feed the live history.

:class:`EventIntake` owns the service's :class:`~intake.live_log.EventLog` and its
:class:`~serving.live.LiveHistory`. On start it replays the log into the live history (the
events after ``since``: the position the served data already holds), then every committed
batch reaches the live history before the append returns (the log's ``on_commit`` hook),
so an acknowledged event is in the customer's next request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecomrec.errors import ConfigError, InvalidArgumentError
from intake.live_log import (
    MAX_BATCH,
    MAX_ID_CHARS,
    MAX_RECOMMENDATION_ID_CHARS,
    RECOMMENDATION_ID_CHARS,
    Ack,
    EventLog,
    EventLogUnavailableError,
    EventProblem,
    LiveEvent,
    SqliteEventLog,
    StoredEvent,
    validate_batch,
)
from intake.loaders.contract import FUTURE_TOLERANCE_S, LIVE_EVENT_SYNONYMS
from serving.config import ServeConfig
from serving.live import LiveHistory
from serving.requests import UnavailableError
from serving.validation import IdLookup, RecommendQuery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackResult:
    """What ``TrackEvents`` answers."""

    accepted: int
    problems: tuple[EventProblem, ...]
    ack: Ack
    events: tuple[LiveEvent, ...] = ()  # the accepted events (outcome attribution)


def raw_events(request: Any, now: float) -> list[dict[str, Any]]:
    """``TrackEventsRequest.events`` -> contract mappings (proto3 zero values = absent)."""
    out = []
    for e in request.events:
        out.append(
            {
                "customer_id": e.customer_id,
                "product_id": e.product_id,
                "event_type": e.event_type or None,
                "timestamp": e.timestamp or int(now),
                "quantity": e.quantity or None,
                "price": e.price if e.HasField("price") else None,
                "order_id": e.order_id or None,
                "session_id": e.session_id or None,
                "recommendation_id": e.recommendation_id or None,
            }
        )
    return out


def validate_request_events(
    events: Sequence[Any], now: float
) -> tuple[list[LiveEvent], list[EventProblem]]:
    """``TrackEventsRequest.events`` -> good events and problems, as
    ``validate_batch(raw_events(...))`` gives them, at a third of its cost per event (it
    runs on the event loop): the typed proto fields are checked directly, and an event that
    fails any check goes through the contract's own :func:`validate_batch` for its exact
    problem (the tests hold the two paths equal)."""
    good: list[LiveEvent] = []
    problems: list[EventProblem] = []
    synonyms = LIVE_EVENT_SYNONYMS
    rec_chars = RECOMMENDATION_ID_CHARS
    default_ts = int(now)
    limit = now + FUTURE_TOLERANCE_S
    for i, e in enumerate(events):
        c, p, o, sid = e.customer_id, e.product_id, e.order_id, e.session_id
        rec = e.recommendation_id
        et = synonyms.get((e.event_type or "purchase").lower())
        ts = e.timestamp or default_ts
        q = e.quantity or 1
        price = e.price if e.HasField("price") else None
        if (
            et is not None
            and 0 < len(c) <= MAX_ID_CHARS
            and 0 < len(p) <= MAX_ID_CHARS
            and len(o) <= MAX_ID_CHARS
            and len(sid) <= MAX_ID_CHARS
            and 0 < ts <= limit
            and q >= 1
            and (price is None or 0.0 <= price < math.inf)  # NaN fails both
            and (not rec or (len(rec) <= MAX_RECOMMENDATION_ID_CHARS and set(rec) <= rec_chars))
        ):
            good.append(LiveEvent(c, p, et, ts, q, price, o or None, sid or None, rec or None))
            continue
        ok, bad = validate_batch(raw_events(_OneEvent(e), now), now=now)
        good += ok  # (none: the fast checks refuse nothing the contract takes; tests)
        problems += [dataclasses.replace(b, index=i) for b in bad]
    return good, problems


@dataclass(frozen=True)
class _OneEvent:
    """One proto event in the shape :func:`raw_events` reads (``request.events``)."""

    event: Any

    @property
    def events(self) -> list[Any]:
        return [self.event]


class EventIntake:
    """The service's event log and live history."""

    def __init__(self, event_log: EventLog, live: LiveHistory, max_events: int = 1000) -> None:
        self.log = event_log
        self.live = live
        self.max_events = max_events
        self.forgotten_tokens: set[str] = set()  # announced by other replicas (NATS)
        self._stops: list[Callable[[], None]] = []  # the follower, the forget listener

    @classmethod
    def open(
        cls,
        path: str | Path,
        since: int = 0,
        max_events: int = 1000,
        max_per_customer: int = 200,
        max_customers: int = 100_000,
    ) -> EventIntake:
        """The embedded log at ``path`` (created when missing), replayed after ``since``."""
        live = LiveHistory(max_per_customer=max_per_customer, max_customers=max_customers)
        t = time.perf_counter()
        event_log = SqliteEventLog(path, on_commit=live.add)
        batch = []
        for s in event_log.read(after=since):
            batch.append(s)
            if len(batch) == 10_000:
                live.add(batch)
                batch = []
        live.add(batch)
        log.info(
            "event log %s: %d customers with live events after position %d (%.2f s)",
            path,
            live.customers(),
            since,
            time.perf_counter() - t,
        )
        return cls(event_log, live, max_events)

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> EventIntake | None:
        """The serve config's back end (``event_backend``); None when TrackEvents is off."""
        if cfg.event_backend == "nats":
            return cls.open_nats(cfg)
        if not cfg.event_log:
            return None
        return cls.open(
            cfg.event_log,
            cfg.event_log_since,
            cfg.max_track_events,
            cfg.live_events_per_customer,
            cfg.live_customers,
        )

    @classmethod
    def open_nats(cls, cfg: ServeConfig) -> EventIntake:
        """The replicated JetStream log (``nats_servers``); the live history follows the
        stream from ``event_log_since`` (every replica's appends, in stream order) and takes
        this replica's own appends before their acknowledgement leaves (so the next request
        here sees them even before the follower delivers them; each event is added once)."""
        from intake.live_log_nats import NatsEventLog, NatsLogConfig

        live = LiveHistory(
            max_per_customer=cfg.live_events_per_customer, max_customers=cfg.live_customers
        )
        feed = _Feed(live)
        t = time.perf_counter()
        event_log = NatsEventLog(
            NatsLogConfig(
                servers=tuple(cfg.nats_servers),
                stream=cfg.nats_stream,
                subject_prefix=cfg.nats_subject_prefix,
                ack_timeout_s=cfg.nats_ack_timeout_s,
                append_deadline_s=cfg.nats_append_deadline_s,
            ),
            on_commit=feed.committed,
            connect_deadline_s=cfg.nats_append_deadline_s,  # connect + the stream, at start
        )
        intake = cls(event_log, live, cfg.max_track_events)
        try:
            intake._stops.append(event_log.on_forget(intake._forgotten_elsewhere))
            intake._stops.append(event_log.follow(cfg.event_log_since, feed.followed))
        except BaseException:
            intake.close()
            raise
        log.info(
            "event log nats:%s on %s: following after position %d (%.2f s)",
            cfg.nats_stream,
            ",".join(cfg.nats_servers),
            cfg.event_log_since,
            time.perf_counter() - t,
        )
        return intake

    def _forgotten_elsewhere(self, token: str) -> None:
        """A forget announced on the stream's forget subject (by any replica)."""
        self.forgotten_tokens.add(token)
        n = self.live.forget_token(token)
        log.info("forget announced: %d live customer(s) dropped", n)

    def forget(self, customer_id: str) -> None:
        """Drop the customer from this replica's memory, and tell the other replicas
        (NATS back end: a forget announcement with the customer's token, not the id)."""
        self.live.forget(customer_id)
        announce = getattr(self.log, "announce_forget", None)
        if announce is not None:
            announce(customer_id)

    def is_forgotten(self, customer_id: str) -> bool:
        """Whether another replica announced this customer forgotten since start."""
        if not self.forgotten_tokens or not customer_id:
            return False
        from intake.live_log_nats import customer_token

        return customer_token(customer_id) in self.forgotten_tokens

    def track(self, request: Any, now: float | None = None) -> TrackResult:
        """Validate and append a ``TrackEventsRequest``; returns once the events are durable."""
        good, problems, batch_id = self._validate(request, now)
        try:
            ack = self.log.append(good, batch_id) if good else Ack(0, 0, 0)
        except ConfigError as e:  # closed while stopping
            raise UnavailableError("the event log is closed (the server is stopping)") from e
        return TrackResult(ack.written, tuple(problems), ack, tuple(good))

    async def track_async(self, request: Any, now: float | None = None) -> TrackResult:
        """:meth:`track` for the event loop: validation here (microseconds per event), the
        commit on the log's writer thread, awaited without holding a worker."""
        good, problems, batch_id = self._validate(request, now)
        submit = getattr(self.log, "submit", None)
        try:
            if not good:
                ack = Ack(0, 0, 0)
            elif submit is not None:  # SQLite's writer queue, NATS's client loop
                ack = await asyncio.wrap_future(submit(good, batch_id))
            else:  # a log with a blocking append only: on a worker
                ack = await asyncio.get_running_loop().run_in_executor(
                    None, self.log.append, good, batch_id
                )
        except ConfigError as e:
            raise UnavailableError("the event log is closed (the server is stopping)") from e
        except EventLogUnavailableError as e:  # no quorum / leader in time: retry the batch
            raise UnavailableError(str(e)) from e
        return TrackResult(ack.written, tuple(problems), ack, tuple(good))

    def _validate(
        self, request: Any, now: float | None
    ) -> tuple[list[LiveEvent], list[EventProblem], str | None]:
        now = time.time() if now is None else now
        limit = min(self.max_events, MAX_BATCH)
        if len(request.events) > limit:
            raise InvalidArgumentError(
                "events", f"at most {limit} events per call, got {len(request.events)}"
            )
        if len(request.batch_id) > 128:
            raise InvalidArgumentError("batch_id", "longer than 128 characters")
        good, problems = validate_request_events(request.events, now)
        return good, problems, request.batch_id or None

    def with_live(self, q: RecommendQuery, items: IdLookup) -> RecommendQuery:
        """``q`` with the customer's live events merged into its recent events."""
        if not q.user_external:
            return q
        merged = self.live.merged(q.user_external, q.recent, items)
        return q if merged is q.recent else dataclasses.replace(q, recent=merged)

    def append(self, events: Sequence[LiveEvent], batch_id: str | None = None) -> Ack:
        """Append already-validated events (tools and tests)."""
        return self.log.append(events, batch_id)

    def close(self) -> None:
        for stop in self._stops:
            stop()
        self._stops = []
        self.log.close()


class _Feed:
    """The live history of a NATS-backed replica, from two sources: this replica's
    acknowledged appends (``on_commit``, before the acknowledgement leaves) and the stream's
    follower (every replica's appends, in stream order, usually a few ms later). An event
    both deliver is added once, by its stream position."""

    def __init__(self, live: LiveHistory) -> None:
        self.live = live
        self._ahead: set[int] = set()  # committed here, not yet seen by the follower
        self._followed = 0  # the follower's last position
        self._lock = threading.Lock()

    def committed(self, stored: list[StoredEvent]) -> None:
        with self._lock:
            new = [s for s in stored if s.seq > self._followed]
            self._ahead.update(s.seq for s in new)
            self.live.add(new)

    def followed(self, stored: list[StoredEvent]) -> None:
        with self._lock:
            new = []
            for s in stored:
                self._followed = max(self._followed, s.seq)
                if s.seq in self._ahead:
                    self._ahead.discard(s.seq)
                else:
                    new.append(s)
            if new:
                self.live.add(new)
