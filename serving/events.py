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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecomrec.errors import ConfigError, InvalidArgumentError
from intake.live_log import (
    MAX_BATCH,
    Ack,
    EventLog,
    EventProblem,
    LiveEvent,
    SqliteEventLog,
    validate_batch,
)
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


class EventIntake:
    """The service's event log and live history."""

    def __init__(self, event_log: EventLog, live: LiveHistory, max_events: int = 1000) -> None:
        self.log = event_log
        self.live = live
        self.max_events = max_events

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
            elif submit is not None:
                ack = await asyncio.wrap_future(submit(good, batch_id))
            else:  # a log without a queue (NATS): its blocking append on a worker
                ack = await asyncio.get_running_loop().run_in_executor(
                    None, self.log.append, good, batch_id
                )
        except ConfigError as e:
            raise UnavailableError("the event log is closed (the server is stopping)") from e
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
        good, problems = validate_batch(raw_events(request, now), now=now)
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
        self.log.close()
