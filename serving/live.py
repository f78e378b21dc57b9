"""Live history: the events a shop's backend sent through ``TrackEvents``, per customer.

The event log calls :meth:`LiveHistory.add` with every committed batch before the append
returns (``SqliteEventLog(on_commit=...)``), so an acknowledged event is in the next
Recommend / GetUserProfile of that customer. Events are kept with the shop's product ids and
mapped to the served catalogue's internal ids when read (an engine swapped in by a refresh
may have another catalogue; products it does not know are skipped: they have no vector), the
most recent ``max_per_customer`` per customer, for at most ``max_customers`` customers (the
least recently active are dropped first: their events stay in the log for the next refresh;
ServeConfig ``live_events_per_customer`` / ``live_customers``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from intake.live_log import StoredEvent
from intake.schema import EVENT_TYPE_IDS, FEATURE_EVENT_TYPE
from serving.validation import IdLookup, RecentEvent


class LiveHistory:
    """Customer external id -> recent live events (time order), thread-safe."""

    def __init__(self, max_per_customer: int = 200, max_customers: int = 100_000) -> None:
        self._max_per = max_per_customer
        self._max_customers = max_customers
        # customer -> [(product external id, event-type id, ts)] in time order
        self._by_customer: OrderedDict[str, list[tuple[str, int, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.position = 0  # the last log position seen

    def add(self, stored: Iterable[StoredEvent]) -> None:
        """Take committed events (the event log's ``on_commit`` hook)."""
        with self._lock:
            for s in stored:
                self.position = max(self.position, s.seq)
                e = s.event
                feature = FEATURE_EVENT_TYPE[e.event_type]
                if feature is None:  # an impression: an outcome, not a behaviour
                    continue
                evs = self._by_customer.pop(e.customer_id, [])
                evs.append((e.product_id, EVENT_TYPE_IDS[feature], e.ts))
                if len(evs) > 1 and evs[-1][2] < evs[-2][2]:  # late arrival: keep time order
                    evs.sort(key=lambda ev: ev[2])
                del evs[: -self._max_per]
                self._by_customer[e.customer_id] = evs  # most recently active last
                while len(self._by_customer) > self._max_customers:
                    self._by_customer.popitem(last=False)

    def count(self, customer_id: str) -> int:
        """How many live events the customer has (known products or not)."""
        with self._lock:
            return len(self._by_customer.get(customer_id, ()))

    def recent(self, customer_id: str, items: IdLookup) -> tuple[RecentEvent, ...]:
        """The customer's live events of products ``items`` knows, in time order."""
        if not customer_id:
            return ()
        with self._lock:
            evs = list(self._by_customer.get(customer_id, ()))
        out = []
        for product, et, ts in evs:
            item = items.get(product)
            if item is not None:
                out.append(RecentEvent(item, et, ts))
        return tuple(out)

    def merged(
        self, customer_id: str, request_events: tuple[RecentEvent, ...], items: IdLookup
    ) -> tuple[RecentEvent, ...]:
        """Live events and the request's own, in time order, exact repeats once."""
        live = self.recent(customer_id, items)
        if not live:
            return request_events
        out = list(dict.fromkeys(live + request_events))
        out.sort(key=lambda ev: ev.ts)
        return tuple(out)

    def forget(self, customer_id: str) -> bool:
        """Drop the customer's live events; True when there were any."""
        with self._lock:
            return self._by_customer.pop(customer_id, None) is not None

    def customers(self) -> int:
        with self._lock:
            return len(self._by_customer)
