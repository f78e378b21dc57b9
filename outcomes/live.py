"""The running service's side of outcomes: ids, the served log, live attribution counters.

:class:`LiveOutcomes` is what the service holds: :meth:`served` gives an answer its id and
queues it for the served log (the hot path: an id and a deque append); the served log's
writer drains the queue every flush into the bounded :class:`AttributionIndex` and the
"recommendations served" counters; :meth:`observe` attributes each event TrackEvents
acknowledged and counts it per variant and model version (the /metrics counters). These
counters are live and approximate: they start at 0 with the process, and an event whose
answer is older than the index's memory (``max_answers``) or was served by another replica
is not attributed here. ``ecomrec report online`` (the served log and the event log) is
the account of record.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from intake.live_log import LiveEvent
from outcomes.attribution import AttributionIndex, AttributionRule
from outcomes.served_log import RecommendationIds, Served, ServedLog

# (variant, model_version, method) / (variant, model_version, event_type) / (variant, mv)
CounterKey = tuple[str, str, str]


class LiveOutcomes:
    """Recommendation ids, the served log and live attribution counters of one process."""

    def __init__(
        self,
        served_log_path: str | Path | None,
        flush_interval_s: float = 0.2,
        max_answers: int = 50_000,
        rule: AttributionRule | None = None,
    ) -> None:
        self.index = AttributionIndex(rule, max_answers=max_answers)
        self.log = ServedLog(served_log_path, flush_interval_s, on_served=self._on_served)
        self.ids: RecommendationIds = self.log.ids
        self._lock = threading.Lock()
        self.served_counts: Counter[CounterKey] = Counter()
        self.attributed_counts: Counter[CounterKey] = Counter()
        self.revenue: dict[tuple[str, str], float] = {}
        self.unattributed: Counter[str] = Counter()

    # ------------------------------------------------------------------ hot path
    def served(
        self,
        method: str,
        customer_id: str,
        variant: str,
        model_version: str,
        items: Sequence[str],
    ) -> str:
        """A new recommendation id for this answer, queued for the served log."""
        rid = self.ids.next()
        self.log.record(rid, customer_id, variant, model_version, method, items)
        return rid

    # ------------------------------------------------------------------ off it
    def _on_served(self, rows: list[Served]) -> None:
        self.index.add(rows)
        with self._lock:
            for s in rows:
                self.served_counts[(s.variant, s.model_version, s.method)] += 1

    def observe(self, events: Iterable[LiveEvent]) -> int:
        """Attribute acknowledged events (TrackEvents); returns how many were attributed."""
        self.log.drain()  # an answer of the last few ms is in the index before matching
        n = 0
        for e in events:
            if self.index.rule.window(e.event_type) is None:
                continue
            a = self.index.match(e)
            with self._lock:
                if a is None:
                    self.unattributed[e.event_type] += 1
                    continue
                key = (a.served.variant, a.served.model_version)
                self.attributed_counts[(*key, e.event_type)] += 1
                if e.event_type == "purchase":
                    rev = (e.price or 0.0) * e.quantity
                    self.revenue[key] = self.revenue.get(key, 0.0) + rev
            n += 1
        return n

    def snapshot(
        self,
    ) -> tuple[
        dict[CounterKey, int], dict[CounterKey, int], dict[tuple[str, str], float], dict[str, int]
    ]:
        """Copies of the counters (served, attributed events, revenue, unattributed)."""
        self.log.drain()
        with self._lock:
            return (
                dict(self.served_counts),
                dict(self.attributed_counts),
                dict(self.revenue),
                dict(self.unattributed),
            )

    def forget(self, customer_id: str) -> int:
        """Drop the customer's answers from the index and the served log."""
        n = self.log.forget(customer_id)  # drains the queue into the index first
        self.index.forget(customer_id)
        return n

    def close(self) -> None:
        self.log.close()
