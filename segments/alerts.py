"""Churn warnings in real time: a watcher over the live event log, and the warnings sink.

The sink (the format other parts read; docs/segments.md "Churn warnings") is a JSON Lines
file, one warning per line, appended one whole line per ``write`` (``O_APPEND``) and
fsync'd before the watcher moves on::

    {"customer_id": "shop id", "ts": "2011-09-04T00:00:00+00:00", "risk": 0.83,
     "threshold": 0.7,
     "reasons": [{"kind": "recency", "text": "no purchase for 64 days (usual gap 21)"}],
     "segment": "At Risk", "previous_segment": "Loyal"}

``kind`` is one of :data:`REASON_KINDS`. ``ts`` is the watcher's clock when the warning
was made (UTC, ISO 8601). :func:`read_warnings` reads the file back, newest first, and
skips a torn last line (a writer killed mid-line).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ecomrec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REASON_KINDS: tuple[str, ...] = ("recency", "frequency_drop", "segment_move")


# --------------------------------------------------------------------------- format
@dataclass(frozen=True)
class Reason:
    """Why a customer is warned: ``kind`` (one of REASON_KINDS) and a sentence for people."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in REASON_KINDS:
            raise DataError(f"reason kind {self.kind!r} is not one of {', '.join(REASON_KINDS)}")


@dataclass(frozen=True)
class ChurnWarning:
    """One churn warning as the sink holds it (see the module docstring)."""

    customer_id: str
    ts: int  # unix seconds (written as ISO 8601, UTC)
    risk: float
    threshold: float
    reasons: tuple[Reason, ...]
    segment: str
    previous_segment: str
    extra: dict[str, Any] = field(default_factory=dict)  # written as-is after the fields

    def to_dict(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "ts": iso(self.ts),
            "risk": round(float(self.risk), 4),
            "threshold": float(self.threshold),
            "reasons": [{"kind": r.kind, "text": r.text} for r in self.reasons],
            "segment": self.segment,
            "previous_segment": self.previous_segment,
            **self.extra,
        }


def iso(ts: float) -> str:
    """Unix seconds -> ISO 8601 in UTC (``2011-09-04T00:00:00+00:00``)."""
    return dt.datetime.fromtimestamp(int(ts), dt.UTC).isoformat()


def _to_ts(value: str | float | dt.datetime) -> float:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    try:
        d = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as e:
        raise DataError(f"since: {value!r} is not an ISO 8601 time or unix seconds") from e
    return _to_ts(d)


def validate_warning(obj: Any, where: str) -> dict[str, Any]:
    """Check one parsed line has the sink's fields and types; return it (DataError names ``where``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a warning must be a JSON object")
    need = {
        "customer_id": str,
        "ts": str,
        "risk": (int, float),
        "threshold": (int, float),
        "reasons": list,
        "segment": str,
        "previous_segment": str,
    }
    for key, typ in need.items():
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], typ):  # type: ignore[arg-type]
            raise DataError(f"{where}: field {key!r} has the wrong type")
    for r in obj["reasons"]:
        if not isinstance(r, dict) or r.get("kind") not in REASON_KINDS or "text" not in r:
            raise DataError(f"{where}: a reason must be {{kind: {'|'.join(REASON_KINDS)}, text}}")
    _to_ts(obj["ts"])
    return obj


def read_warnings(path: str | Path, since: str | float | dt.datetime | None = None) -> list[dict]:
    """The warnings of a sink file, newest first (by ``ts``; file order breaks ties, later
    first). ``since`` (ISO 8601 text, a datetime, or unix seconds) keeps warnings with
    ``ts >= since``. A missing file is an empty list; a line that is not JSON (a torn write:
    a writer killed mid-line) is skipped with a log line; a JSON line without the sink's
    fields is a DataError naming the file and line."""
    p = Path(path)
    if not p.exists():
        return []
    if p.is_dir():
        raise ConfigError(f"warnings sink {p} is a folder; give a file path")
    lines = p.read_bytes().split(b"\n")
    cut = _to_ts(since) if since is not None else None
    out: list[tuple[float, int, dict]] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{p}, line {i + 1}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # a writer killed mid-line leaves truncated JSON (the next append starts a new
            # line after it): skipped, never a stop for the readers
            log.warning("%s: skipping a torn line (not JSON)", where)
            continue
        w = validate_warning(obj, where)
        ts = _to_ts(w["ts"])
        if cut is not None and ts < cut:
            continue
        out.append((ts, i, w))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [w for _, _, w in out]


# --------------------------------------------------------------------------- sinks
class Sink(Protocol):
    """Where warnings go: ``publish`` returns once they are delivered (or raises)."""

    def publish(self, warnings: list[ChurnWarning]) -> None: ...


class JsonlSink:
    """The required sink: appends one JSON line per warning to ``path`` and fsyncs.

    Each line is one ``os.write`` on an ``O_APPEND`` descriptor, so concurrent writers and
    readers never see two warnings interleaved; a crash leaves at most a torn last line,
    which :func:`read_warnings` skips.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"warnings sink {self.path} is a folder; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, warnings: list[ChurnWarning]) -> None:
        if not warnings:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size > 0:  # repair a torn last line before appending
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
            for w in warnings:
                line = json.dumps(w.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
                data = line.encode()
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)


class WebhookSink:
    """Optional: POSTs ``{"warnings": [...]}`` as JSON to ``url``; retried ``retries`` times
    with exponential backoff (0.5 s, 1 s, ...) on connection errors and 5xx answers; a 4xx
    answer is not retried. Raises ``ConnectionError`` when every try failed."""

    def __init__(self, url: str, *, retries: int = 3, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--webhook {url!r} must be an http:// or https:// URL")
        self.url = url
        self.retries = max(0, retries)
        self.timeout_s = timeout_s

    def publish(self, warnings: list[ChurnWarning]) -> None:
        if not warnings:
            return
        body = json.dumps({"warnings": [w.to_dict() for w in warnings]}).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise ConnectionError(
                        f"webhook {self.url} refused the warnings: {e.code}"
                    ) from e
                last = e
            except (urllib.error.URLError, OSError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        raise ConnectionError(
            f"webhook {self.url} failed after {self.retries + 1} tries: {last}"
        ) from last


def publish_all(sinks: Iterable[Sink], warnings: list[ChurnWarning]) -> None:
    """Publish to every sink in order (the JSONL file first: it is the record)."""
    for s in sinks:
        s.publish(warnings)
