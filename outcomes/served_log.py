"""Recommendation ids and the served-recommendation log.

Every answer the service gives (Recommend, each RecommendBatch item, SimilarItems,
CompleteBasket, SearchProducts) carries a ``recommendation_id``: a per-process random
prefix and a counter (``"r" + 10 hex digits + "-" + counter in base 36``), unique across
processes and restarts without coordination, built without a system call.

What was served (id, time, customer, variant, model version, method, items in rank order)
is recorded off the hot path: :meth:`ServedLog.record` appends a tuple to an in-memory
queue (a few hundred nanoseconds); a writer thread commits the queue every
``flush_interval_s`` (default 0.2 s) in one SQLite transaction, in WAL mode with
``synchronous=NORMAL`` (no fsync per commit). **What a crash loses**: the answers of the
last flush interval (and, on a power cut, the WAL's last unsynced commits); they only lose
their attribution (their events stay in the event log, counted as unattributed). By default
the table ``served`` lives in the event log's own SQLite file, so ``ecomrec report online
--event-log FILE`` reads both and forgetting a customer in the log removes their served
rows too.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecomrec.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_VARIANT = "default"  # the variant of every answer while no A/B test runs


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class RecommendationIds:
    """Short unique ids: ``r<10 hex of os.urandom at start>-<counter base 36>``.

    ``next()`` is a counter increment and a string format (thread-safe: ``itertools.count``
    advances atomically under the GIL). 40 random bits per process: two processes share a
    prefix with probability ~n^2 / 2^41 (a million restarts: < 1 in 2,000).
    """

    def __init__(self, prefix: str | None = None) -> None:
        import itertools

        self.prefix = prefix if prefix is not None else "r" + os.urandom(5).hex() + "-"
        self._count = itertools.count(1)

    def next(self) -> str:
        return self.prefix + _base36(next(self._count))


@dataclass(frozen=True)
class Served:
    """One answer as the served log holds it."""

    recommendation_id: str
    ts: float  # Unix seconds (server clock) when the answer was built
    customer_id: str  # "" when the request named no customer
    variant: str
    model_version: str
    method: str  # Recommend | RecommendBatch | SimilarItems | CompleteBasket | SearchProducts
    items: tuple[str, ...]  # product ids (the shop's), rank 1 first


_Row = tuple[str, float, str, str, str, str, tuple[str, ...]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS served (
    recommendation_id TEXT NOT NULL,
    ts REAL NOT NULL,
    customer_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    model_version TEXT NOT NULL,
    method TEXT NOT NULL,
    items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS served_ts ON served(ts);
CREATE INDEX IF NOT EXISTS served_customer ON served(customer_id);
"""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class ServedLog:
    """The served-recommendation log: an in-memory queue, a writer thread, a SQLite table.

    ``on_served`` (optional) is called with each drained batch of :class:`Served` (the live
    attribution index); :meth:`drain` hands the queue to it at once (TrackEvents calls it so
    a click right after its answer finds it).
    """

    def __init__(
        self,
        path: str | Path | None,
        flush_interval_s: float = 0.2,
        max_pending: int = 200_000,
        on_served: Callable[[list[Served]], None] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None  # None: count, write nothing
        if self.path is not None:
            if self.path.exists() and self.path.is_dir():
                raise ConfigError(f"served log {self.path} is a folder; give a file path")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.on_served = on_served
        self.ids = RecommendationIds()
        self.dropped = 0  # answers not recorded because the queue was full
        self.written = 0
        self._pending: collections.deque[_Row] = collections.deque()
        self._unwritten: list[Served] = []
        self._lock = threading.Lock()  # drain vs drain; the queue itself needs none
        self._stop = threading.Event()
        self._conn = _connect(self.path) if self.path is not None else None
        if self._conn is not None:
            self._conn.executescript(_SCHEMA)
        self._writer = threading.Thread(target=self._run, name="served-log-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------- the hot path
    def record(
        self,
        recommendation_id: str,
        customer_id: str,
        variant: str,
        model_version: str,
        method: str,
        items: Sequence[str],
        ts: float | None = None,
    ) -> None:
        """Queue one answer (no I/O, no lock: a deque append)."""
        if len(self._pending) >= self.max_pending:  # the writer is stuck: shed, count
            self.dropped += 1
            return
        self._pending.append(
            (
                recommendation_id,
                time.time() if ts is None else ts,
                customer_id,
                variant,
                model_version,
                method,
                tuple(items),
            )
        )

    # ------------------------------------------------------------- off the hot path
    def drain(self) -> list[Served]:
        """Move the queued answers to the index hook and the writer's list; returns them."""
        with self._lock:
            rows: list[Served] = []
            pop = self._pending.popleft
            while True:
                try:
                    rows.append(Served(*pop()))
                except IndexError:
                    break
            if rows:
                self._unwritten.extend(rows)
                if self.on_served is not None:
                    try:
                        self.on_served(rows)
                    except Exception:
                        log.exception("served log: on_served hook failed")
            return rows

    def flush(self) -> int:
        """Drain and commit now; returns how many answers were written."""
        self.drain()
        with self._lock:
            rows, self._unwritten = self._unwritten, []
        conn = self._conn
        if not rows or conn is None:
            return 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO served VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.recommendation_id,
                        r.ts,
                        r.customer_id,
                        r.variant,
                        r.model_version,
                        r.method,
                        json.dumps(r.items, ensure_ascii=False, separators=(",", ":")),
                    )
                    for r in rows
                ],
            )
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.exception("served log %s: %d answers not written", self.path, len(rows))
            return 0
        self.written += len(rows)
        return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def forget(self, customer_id: str) -> int:
        """Remove the customer's served rows (queued ones too); returns how many."""
        self.flush()
        if self.path is None:
            return 0
        conn = _connect(self.path)
        try:
            conn.execute("PRAGMA secure_delete = ON")
            n = conn.execute("DELETE FROM served WHERE customer_id = ?", (customer_id,)).rowcount
        finally:
            conn.close()
        return int(n)

    def close(self) -> None:
        """Stop the writer after a last flush."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._writer.join()
        self.flush()
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> ServedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_served(
    path: str | Path, since: float | None = None, until: float | None = None
) -> Iterator[Served]:
    """Answers served in ``[since, until)`` (Unix seconds), in time order. A file without a
    ``served`` table yields nothing."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"served log {p} does not exist")
    conn = _connect(p, readonly=True)
    try:
        has = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'served'"
        ).fetchone()
        if has is None:
            return
        sql = "SELECT * FROM served WHERE ts >= ? AND ts < ? ORDER BY ts"
        args: tuple[Any, ...] = (
            -1e300 if since is None else since,
            1e300 if until is None else until,
        )
        for r in conn.execute(sql, args):
            yield Served(r[0], float(r[1]), r[2], r[3], r[4], r[5], tuple(json.loads(r[6])))
    finally:
        conn.close()
