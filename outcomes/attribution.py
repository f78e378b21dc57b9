"""Attribution: which answer led to an impression, click, cart or purchase.

The rule (docs/outcomes.md), applied to each event once, last touch:

1. **By id**: the event carries a ``recommendation_id`` that the served log holds, and it
   happened within its type's window after that answer (``-clock_skew_s <= event.ts -
   served.ts <= window``): it is that answer's (whatever the product; send the id only on
   the products that came from the answer).
2. **Else by window**: the most recent answer served to the **same customer** that
   **contained the product**, served at most ``clock_skew_s`` after the event and at most
   the type's window before it.
3. Else the event is unattributed.

Windows: impression, click and cart 24 h, purchase 7 days (:class:`AttributionRule`).
Returns and views are not attributed (revenue is gross of returns).

The same :class:`AttributionIndex` serves the report (every answer of the period) and the
running service (the most recent ``max_answers`` answers, for the live /metrics counters).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from intake.live_log import LiveEvent
from outcomes.served_log import Served

ATTRIBUTED_TYPES: tuple[str, ...] = ("impression", "click", "cart", "purchase")
DAY_S = 86400


@dataclass(frozen=True)
class AttributionRule:
    """Windows per event type (seconds after the answer) and the clock tolerance."""

    impression_window_s: int = DAY_S
    click_window_s: int = DAY_S
    cart_window_s: int = DAY_S
    purchase_window_s: int = 7 * DAY_S
    # the shop's event clock and the server's may differ a little (and event times are whole
    # seconds): an event up to this long BEFORE its answer still counts
    clock_skew_s: int = 60

    def window(self, event_type: str) -> int | None:
        """The window of an attributed type; None for the others (view, return)."""
        return {
            "impression": self.impression_window_s,
            "click": self.click_window_s,
            "cart": self.cart_window_s,
            "purchase": self.purchase_window_s,
        }.get(event_type)

    @property
    def max_window_s(self) -> int:
        return max(
            self.impression_window_s,
            self.click_window_s,
            self.cart_window_s,
            self.purchase_window_s,
        )

    def describe(self) -> str:
        h = 3600
        return (
            "an event carrying a recommendation_id the served log holds is that answer's "
            "(within its window after it); else the most recent answer served to the same "
            "customer that contained the product (last touch); windows: impression "
            f"{self.impression_window_s / h:g} h, click {self.click_window_s / h:g} h, cart "
            f"{self.cart_window_s / h:g} h, purchase {self.purchase_window_s / h:g} h after "
            f"the answer (clock tolerance {self.clock_skew_s} s); each event at most once; "
            "views and returns are not attributed"
        )


@dataclass(frozen=True)
class Attributed:
    """An event and the answer it is attributed to."""

    event: LiveEvent
    served: Served
    how: str  # "id" | "window"


class AttributionIndex:
    """Answers by id and by customer (time order); thread-safe.

    ``max_answers`` bounds memory (the running service): the oldest answers are dropped
    first. ``None``: keep all (a report over a period).
    """

    def __init__(self, rule: AttributionRule | None = None, max_answers: int | None = None):
        self.rule = rule or AttributionRule()
        self.max_answers = max_answers
        self._by_id: OrderedDict[str, tuple[Served, frozenset[str]]] = OrderedDict()
        # customer -> answers in time order (ts list kept beside for bisect)
        self._by_customer: dict[str, tuple[list[float], list[str]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, answers: Iterable[Served]) -> None:
        with self._lock:
            for s in answers:
                if s.recommendation_id in self._by_id:
                    continue
                self._by_id[s.recommendation_id] = (s, frozenset(s.items))
                if s.customer_id:
                    ts, ids = self._by_customer.setdefault(s.customer_id, ([], []))
                    if not ts or s.ts >= ts[-1]:
                        ts.append(s.ts)
                        ids.append(s.recommendation_id)
                    else:  # out of order (a batch drained late): keep time order
                        i = bisect.bisect_right(ts, s.ts)
                        ts.insert(i, s.ts)
                        ids.insert(i, s.recommendation_id)
                if self.max_answers is not None:
                    while len(self._by_id) > self.max_answers:
                        self._evict()

    def _evict(self) -> None:
        rid, (s, _) = self._by_id.popitem(last=False)
        if not s.customer_id:
            return
        entry = self._by_customer.get(s.customer_id)
        if entry is None:
            return
        ts, ids = entry
        try:
            i = ids.index(rid)
        except ValueError:
            return
        del ts[i], ids[i]
        if not ids:
            del self._by_customer[s.customer_id]

    def get(self, recommendation_id: str) -> Served | None:
        with self._lock:
            hit = self._by_id.get(recommendation_id)
        return None if hit is None else hit[0]

    def match(self, e: LiveEvent) -> Attributed | None:
        """The answer ``e`` is attributed to under the rule, or None."""
        window = self.rule.window(e.event_type)
        if window is None:
            return None
        skew = self.rule.clock_skew_s
        with self._lock:
            if e.recommendation_id:
                hit = self._by_id.get(e.recommendation_id)
                if hit is not None and -skew <= e.ts - hit[0].ts <= window:
                    return Attributed(e, hit[0], "id")
            entry = self._by_customer.get(e.customer_id) if e.customer_id else None
            if entry is None:
                return None
            ts, ids = entry
            i = bisect.bisect_right(ts, e.ts + skew)  # answers served up to skew after it
            while i > 0:
                i -= 1
                if e.ts - ts[i] > window:
                    break  # older answers are further out
                s, items = self._by_id[ids[i]]
                if e.product_id in items:
                    return Attributed(e, s, "window")
        return None

    def forget(self, customer_id: str) -> None:
        with self._lock:
            entry = self._by_customer.pop(customer_id, None)
            if entry is not None:
                for rid in entry[1]:
                    self._by_id.pop(rid, None)


def attribute(
    answers: Iterable[Served],
    events: Iterable[LiveEvent],
    rule: AttributionRule | None = None,
) -> tuple[list[Attributed], dict[str, int]]:
    """Every event of an attributed type -> its answer (each event at most once).

    Returns the attributed events (in event order) and counts of the others:
    ``unattributed`` (no answer under the rule) and ``unknown_ids`` (an id the served log
    does not hold, or outside its window: the window rule was tried instead).
    """
    index = AttributionIndex(rule)
    index.add(answers)
    out: list[Attributed] = []
    stats = {"events": 0, "by_id": 0, "by_window": 0, "unattributed": 0, "unknown_ids": 0}
    for e in events:
        if index.rule.window(e.event_type) is None:
            continue
        stats["events"] += 1
        a = index.match(e)
        if e.recommendation_id and (a is None or a.how != "id"):
            stats["unknown_ids"] += 1
        if a is None:
            stats["unattributed"] += 1
            continue
        stats["by_id" if a.how == "id" else "by_window"] += 1
        out.append(a)
    return out, stats
