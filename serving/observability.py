"""Prometheus metrics, structured (JSON) logs and user-id pseudonymisation."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

# Milliseconds-scale buckets, in seconds.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


def pseudonymise(user_id: str, salt: str) -> str:
    """Keyed hash of a user id for logs (stable per salt, not reversible without it)."""
    if not user_id:
        return ""
    return hmac.new(salt.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:16]


class Metrics:
    """The service's Prometheus metrics, in their own registry (one per server)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # label values come from fixed sets only (serving.server.method_label)
        self.requests = Counter(
            "ecomrec_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "ecomrec_request_seconds",
            "RPC latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "ecomrec_stage_seconds",
            "Latency per request stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "ecomrec_degraded",
            "Answers served degraded, by reason",
            ["method", "reason"],
            registry=r,
        )
        self.versions = _VersionsCollector()
        r.register(self.versions)
        self.ready = Gauge("ecomrec_ready", "1 when health reports SERVING", registry=r)
        self.index_ok = Gauge(
            "ecomrec_index_ok", "1 when the served index version can be searched", registry=r
        )
        self.index_ok.set(1)
        self.index_published_ok = Gauge(
            "ecomrec_index_published_ok",
            "1 when the live version's published files match their checksums",
            registry=r,
        )
        self.index_published_ok.set(1)
        # calls refused before their handler ran, by a fixed reason (serving.server.REFUSALS)
        self.refused = Counter(
            "ecomrec_refused",
            "Calls refused by the server's gate, by method and reason",
            ["method", "reason"],
            registry=r,
        )
        self.inflight = _InflightCollector()
        r.register(self.inflight)
        # label children by value: prometheus' labels() costs a lock and a key build per call
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*values))
        return child

    def record_call(self, method: str, code: str, seconds: float, stages: dict[str, float]) -> None:
        """One finished call: ``ecomrec_requests_total``, its latency and its stage times."""
        self._child(self.requests, method, code).inc()
        self._child(self.latency, method).observe(seconds)
        for stage, sec in stages.items():
            self._child(self.stage, stage).observe(sec)

    def count(self, method: str, code: str) -> None:
        """One more ``ecomrec_requests_total{method, code}`` (no latency: the call did no work)."""
        self._child(self.requests, method, code).inc()

    def record_refusal(self, method: str, code: str, reason: str) -> None:
        """A call the gate refused: ``ecomrec_requests_total{code}`` and
        ``ecomrec_refused_total{reason}``."""
        self._child(self.requests, method, code).inc()
        self._child(self.refused, method, reason).inc()

    def set_versions(self, model_version: str, index_version: str) -> None:
        """Versions for ``ecomrec_versions_info`` (the index's is read live once a source is set)."""
        self.versions.model_version = model_version
        self.versions.index_version = index_version

    def set_index_source(self, source: Callable[[], str]) -> None:
        """Read the index version at every scrape (an alias moved by ``ecomrec index
        build/rollback/delete`` shows up without a restart)."""
        self.versions.index_source = source


class _VersionsCollector(Collector):
    """``ecomrec_versions_info{model_version, index_version}``, the index version read live."""

    def __init__(self) -> None:
        self.model_version = ""
        self.index_version = ""
        self.index_source: Callable[[], str] | None = None

    def collect(self) -> Iterator[InfoMetricFamily]:
        index_version = self.index_version
        if self.index_source is not None:
            try:
                index_version = self.index_source() or ""
            except Exception:  # a broken index must not break the scrape
                index_version = ""
        yield InfoMetricFamily(
            "ecomrec_versions",
            "Model and index versions being served",
            value={"model_version": self.model_version, "index_version": index_version},
        )


class _InflightCollector(Collector):
    """``ecomrec_inflight{budget}``: calls holding each of the gate's budgets, read at scrape
    time (nothing is done per call)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "ecomrec_inflight", "Calls in flight per budget of the server's gate", labels=["budget"]
        )
        if self.source is not None:
            for budget, n in sorted(self.source().items()):
                g.add_metric([budget], n)
        yield g


class LogLimiter:
    """At most one line per key every ``every_s`` seconds; the next line that gets through
    says how many were left out (a flood of bad calls must not flood the log)."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (last logged, dropped since)

    def log(self, level: int, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``every_s`` ago."""
        now = time.monotonic()
        with self._lock:
            last, dropped = self._state.get(key, (-1e18, 0))
            if now - last < self.every_s:
                self._state[key] = (last, dropped + 1)
                return False
            self._state[key] = (now, 0)
        if dropped:
            msg += f" ({dropped} more like this in the last {now - last:.0f} s not logged)"
        self.logger.log(level, msg, *args)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed as ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            d.update(fields)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Root logging to stderr, JSON lines by default."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
