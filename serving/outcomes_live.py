"""The service's online-outcome counters on /metrics (docs/outcomes.md).

A Prometheus collector that reads :class:`outcomes.live.LiveOutcomes` at scrape time, so the
Recommend hot path increments nothing: ``ecomrec_recommendations_served_total{variant,
model_version, method}``, ``ecomrec_attributed_events_total{variant, model_version,
event_type}``, ``ecomrec_attributed_revenue_total{variant, model_version}`` and
``ecomrec_unattributed_events_total{event_type}``. Label values come from the service's own
variants, model versions, method names and the contract's event types (bounded sets).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from outcomes.live import LiveOutcomes


class OutcomesCollector(Collector):
    """Live outcome counters of one process (they start at 0 with it)."""

    def __init__(self, outcomes: LiveOutcomes) -> None:
        self.outcomes = outcomes

    def collect(self) -> Iterator[CounterMetricFamily]:
        served, attributed, revenue, unattributed = self.outcomes.snapshot()
        s = CounterMetricFamily(
            "ecomrec_recommendations_served",
            "Answers served with a recommendation id, by variant, model version and method",
            labels=["variant", "model_version", "method"],
        )
        for key, n in sorted(served.items()):
            s.add_metric(list(key), n)
        yield s
        a = CounterMetricFamily(
            "ecomrec_attributed_events",
            "Impressions, clicks, carts and purchases attributed to an answer (live, this "
            "process's answers), by variant, model version and event type",
            labels=["variant", "model_version", "event_type"],
        )
        for key, n in sorted(attributed.items()):
            a.add_metric(list(key), n)
        yield a
        r = CounterMetricFamily(
            "ecomrec_attributed_revenue",
            "Revenue (price x quantity) of attributed purchases, by variant and model version",
            labels=["variant", "model_version"],
        )
        for key2, v in sorted(revenue.items()):
            r.add_metric(list(key2), v)
        yield r
        u = CounterMetricFamily(
            "ecomrec_unattributed_events",
            "Outcome events no answer in this process's memory explains, by event type",
            labels=["event_type"],
        )
        for et, n in sorted(unattributed.items()):
            u.add_metric([et], n)
        yield u
