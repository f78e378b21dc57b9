"""The live event log: what a shop's backend sends as it happens, kept durably.

Events arrive in batches (``TrackEvents``), are validated one by one against the data
contract (docs/data.md: the same event types and synonyms, quantities, prices and time rule
as ``ecomrec data import``), and the good ones are appended to an :class:`EventLog`. An
append returns only once its events are durable: that is the acknowledgement.

The embedded default is :class:`SqliteEventLog`: one SQLite database in WAL mode with
``synchronous=FULL`` (a commit is on disk when it returns; a torn write is rolled back by
SQLite's journal on the next open, so a ``kill -9`` at any moment leaves whole batches or
nothing). One writer thread commits every batch waiting at that moment in one transaction
(group commit), so concurrent callers share an fsync. A batch may carry a client-chosen
``batch_id``: a retried batch with an id the log already holds is acknowledged again
without writing its events twice.

Positions (``seq``) are the log's own increasing integers; ``read(after=...)`` replays from a
position, which is what ``ecomrec refresh`` records in its lineage.
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ecomrec.errors import ConfigError, DataError, EcomrecError
from intake.loaders.contract import FUTURE_TOLERANCE_S, LIVE_EVENT_SYNONYMS
from intake.schema import LIVE_EVENT_TYPES

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256  # customer, product, order and session ids
MAX_BATCH = 1000  # events in one append
MAX_RECOMMENDATION_ID_CHARS = 64
RECOMMENDATION_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
)


class EventLogUnavailableError(EcomrecError):
    """The distributed event log did not acknowledge in time (no quorum, no leader): the
    caller keeps the batch and retries it with the same batch id."""


@dataclass(frozen=True)
class LiveEvent:
    """One event in the contract's shape (ids as the shop writes them, Unix seconds)."""

    customer_id: str
    product_id: str
    event_type: str  # view | cart | purchase | return | impression | click (canonical)
    ts: int
    quantity: int = 1
    price: float | None = None
    order_id: str | None = None
    session_id: str | None = None
    # the answer that showed the product (docs/outcomes.md): attribution, not a feature
    recommendation_id: str | None = None


@dataclass(frozen=True)
class EventProblem:
    """Why one event of a batch was refused: its index in the batch and the field."""

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"event {self.index}, field {self.field!r}: {self.message}"


@dataclass(frozen=True)
class StoredEvent:
    """An event as the log holds it, with its position."""

    seq: int
    event: LiveEvent


@dataclass(frozen=True)
class Ack:
    """What an append acknowledges: the positions of the events now durable."""

    first_seq: int  # 0 when nothing was written
    last_seq: int
    written: int
    replayed: bool = False  # a batch_id the log already held: nothing written again


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_event(raw: Mapping[str, Any], index: int, now: float | None = None) -> LiveEvent:
    """One raw event (a mapping of contract fields) -> :class:`LiveEvent`.

    Raises DataError naming the event's index and field. Rules (docs/data.md): customer and
    product ids are non-empty text kept exactly as written; ``event_type`` is one of the
    contract's types or synonyms (default purchase); ``timestamp`` is Unix seconds (> 0,
    at most a day ahead of now); ``quantity`` a whole number >= 1 (default 1; a return's
    quantity is positive); ``price`` a finite number >= 0 or absent; ``recommendation_id``
    (optional) at most 64 letters, digits, ``-`` or ``_`` (what Recommend answers).
    """

    def bad(field: str, message: str) -> DataError:
        return DataError(str(EventProblem(index, field, message)))

    def text(field: str, required: bool) -> str | None:
        v = raw.get(field)
        if v is None or v == "":
            if required:
                raise bad(field, "missing")
            return None
        if not isinstance(v, str):
            raise bad(field, f"{_short(v)} is not text")
        if len(v) > MAX_ID_CHARS:
            raise bad(field, f"longer than {MAX_ID_CHARS} characters")
        return v

    unknown = set(raw) - {
        "customer_id",
        "product_id",
        "event_type",
        "timestamp",
        "quantity",
        "price",
        "order_id",
        "session_id",
        "recommendation_id",
    }
    if unknown:
        raise bad(sorted(unknown)[0], "not a field of the event contract")
    customer = text("customer_id", True)
    product = text("product_id", True)
    et_raw = raw.get("event_type") or "purchase"
    if not isinstance(et_raw, str):
        raise bad("event_type", f"{_short(et_raw)} is not text")
    et = LIVE_EVENT_SYNONYMS.get(et_raw.lower())
    if et is None:
        raise bad("event_type", f"{_short(et_raw)} is not one of {', '.join(LIVE_EVENT_TYPES)}")
    ts_raw = raw.get("timestamp")
    if ts_raw is None or isinstance(ts_raw, bool) or not isinstance(ts_raw, int | float):
        raise bad("timestamp", f"{_short(ts_raw)} is not Unix seconds")
    if not math.isfinite(ts_raw) or ts_raw <= 0:
        raise bad("timestamp", f"{_short(ts_raw)} is not a positive Unix time")
    ts = int(ts_raw)
    limit = (time.time() if now is None else now) + FUTURE_TOLERANCE_S
    if ts > limit:
        raise bad("timestamp", f"{ts} is more than a day in the future")
    q_raw = raw.get("quantity")
    if q_raw is None:
        qty = 1
    elif isinstance(q_raw, bool) or not isinstance(q_raw, int | float) or q_raw != int(q_raw):
        raise bad("quantity", f"{_short(q_raw)} is not a whole number")
    else:
        qty = int(q_raw)
    if qty < 1:
        raise bad("quantity", f"{qty} is not >= 1 (a return has a positive quantity)")
    p_raw = raw.get("price")
    price: float | None = None
    if p_raw is not None:
        if isinstance(p_raw, bool) or not isinstance(p_raw, int | float):
            raise bad("price", f"{_short(p_raw)} is not a number")
        if not math.isfinite(p_raw) or p_raw < 0:
            raise bad("price", f"{_short(p_raw)} is not a finite number >= 0")
        price = float(p_raw)
    rec = raw.get("recommendation_id")
    if rec is not None and rec != "":
        if not isinstance(rec, str):
            raise bad("recommendation_id", f"{_short(rec)} is not text")
        if len(rec) > MAX_RECOMMENDATION_ID_CHARS or not set(rec) <= RECOMMENDATION_ID_CHARS:
            raise bad(
                "recommendation_id",
                f"{_short(rec)} is not a recommendation id (at most "
                f"{MAX_RECOMMENDATION_ID_CHARS} letters, digits, '-' or '_')",
            )
    else:
        rec = None
    assert customer is not None and product is not None
    return LiveEvent(
        customer_id=customer,
        product_id=product,
        event_type=et,
        ts=ts,
        quantity=qty,
        price=price,
        order_id=text("order_id", False),
        session_id=text("session_id", False),
        recommendation_id=rec,
    )


def validate_batch(
    batch: Sequence[Mapping[str, Any]], now: float | None = None
) -> tuple[list[LiveEvent], list[EventProblem]]:
    """Good events (in batch order) and one problem per refused event.

    The policy of ``TrackEvents``: the good events of a batch land, each bad one is
    reported by its index and field.
    """
    if len(batch) > MAX_BATCH:
        raise DataError(f"a batch holds at most {MAX_BATCH} events, got {len(batch)}")
    good: list[LiveEvent] = []
    problems: list[EventProblem] = []
    for i, raw in enumerate(batch):
        try:
            good.append(validate_event(raw, i, now))
        except DataError as e:
            field = str(e).split("field ", 1)[-1].split(":", 1)[0].strip("'")
            problems.append(EventProblem(i, field, str(e).split(": ", 1)[-1]))
    return good, problems


@runtime_checkable
class EventLog(Protocol):
    """An append-only, durable log of live events (embedded SQLite, or a distributed one)."""

    def append(self, events: Sequence[LiveEvent], batch_id: str | None = None) -> Ack:
        """Write ``events``; returns once they are durable (the acknowledgement)."""
        ...

    def read(self, after: int = 0, limit: int | None = None) -> Iterator[StoredEvent]:
        """Events with ``seq > after`` in log order."""
        ...

    def position(self) -> int:
        """The last durable position (0 when empty)."""
        ...

    def forget(self, customer_id: str) -> int:
        """Remove every event of ``customer_id``; returns how many were removed."""
        ...

    def close(self) -> None:
        """Stop accepting appends and release the log's resources."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    ts INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    price REAL,
    order_id TEXT,
    session_id TEXT,
    recommendation_id TEXT
);
CREATE INDEX IF NOT EXISTS events_customer ON events(customer_id);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    written INTEGER NOT NULL
);
"""
_INSERT = (
    "INSERT INTO events (customer_id, product_id, event_type, ts, quantity, price, order_id, "
    "session_id, recommendation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def event_row(e: LiveEvent) -> tuple[Any, ...]:
    """The event's fields in contract order (``customer_id ... session_id``, then
    ``recommendation_id``): one row of the SQLite log, one JSON array of the NATS log."""
    return (
        e.customer_id,
        e.product_id,
        e.event_type,
        e.ts,
        e.quantity,
        e.price,
        e.order_id,
        e.session_id,
        e.recommendation_id,
    )


_Job = tuple[Sequence[LiveEvent], str | None, Future[Ack]]


class SqliteEventLog:
    """The embedded event log: SQLite (WAL, synchronous=FULL) with one group-commit writer.

    ``on_commit`` (optional) is called on the writer thread with each committed batch's
    stored events before its append returns, so a reader fed by it (the service's live
    history) holds every acknowledged event.
    """

    def __init__(
        self,
        path: str | Path,
        on_commit: Callable[[list[StoredEvent]], None] | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ConfigError(f"event log {self.path} is a folder; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._on_commit = on_commit
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # appends vs close
        self._conn = self._connect()
        self._conn.executescript(_SCHEMA)
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(events)")}
        if "recommendation_id" not in cols:  # a log written before outcome attribution
            self._conn.execute("ALTER TABLE events ADD COLUMN recommendation_id TEXT")
        self._writer = threading.Thread(target=self._run, name="event-log-writer", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    # ---------------------------------------------------------------- writing
    def append(self, events: Sequence[LiveEvent], batch_id: str | None = None) -> Ack:
        return self.submit(events, batch_id).result()

    def submit(self, events: Sequence[LiveEvent], batch_id: str | None = None) -> Future[Ack]:
        """Queue an append for the writer; the future resolves once the events are durable
        (an asyncio caller awaits it with ``asyncio.wrap_future`` and blocks no thread)."""
        fut: Future[Ack] = Future()
        with self._lock:
            if self._closed:
                raise ConfigError(f"event log {self.path} is closed")
            self._jobs.put((events, batch_id, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while True:  # every batch waiting now goes into the same transaction
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                jobs.append(nxt)
            self._commit(jobs)

    def _commit(self, jobs: list[_Job]) -> None:
        conn = self._conn
        acks: list[Ack] = []
        stored: list[StoredEvent] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            seen: dict[str, Ack] = {}
            for events, batch_id, _ in jobs:
                if batch_id is not None:
                    prev = seen.get(batch_id) or self._known_batch(batch_id)
                    if prev is not None:
                        acks.append(Ack(prev.first_seq, prev.last_seq, prev.written, replayed=True))
                        continue
                first = last = 0
                if events:
                    conn.executemany(_INSERT, [event_row(e) for e in events])
                    # one writer holds the write lock for the transaction: the AUTOINCREMENT
                    # positions of one executemany are contiguous, ending at the last rowid
                    last = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
                    first = last - len(events) + 1
                    stored += [StoredEvent(first + i, e) for i, e in enumerate(events)]
                ack = Ack(first, last, len(events))
                if batch_id is not None:
                    conn.execute(
                        "INSERT INTO batches VALUES (?, ?, ?, ?)",
                        (batch_id, first, last, len(events)),
                    )
                    seen[batch_id] = ack
                acks.append(ack)
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, _, fut in jobs:
                fut.set_exception(e)
            log.exception("event log %s: commit failed", self.path)
            return
        if self._on_commit is not None and stored:
            try:
                self._on_commit(stored)
            except Exception:
                log.exception("event log %s: on_commit hook failed", self.path)
        for (_, _, fut), ack in zip(jobs, acks, strict=True):
            fut.set_result(ack)

    def _known_batch(self, batch_id: str) -> Ack | None:
        row = self._conn.execute(
            "SELECT first_seq, last_seq, written FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        return None if row is None else Ack(int(row[0]), int(row[1]), int(row[2]))

    # ---------------------------------------------------------------- reading
    def read(self, after: int = 0, limit: int | None = None) -> Iterator[StoredEvent]:
        conn = self._connect()  # a reader of its own: WAL readers never block the writer
        try:
            sql = (
                "SELECT seq, customer_id, product_id, event_type, ts, quantity, price, "
                "order_id, session_id, recommendation_id FROM events WHERE seq > ? ORDER BY seq"
            )
            args: tuple[Any, ...] = (after,)
            if limit is not None:
                sql += " LIMIT ?"
                args = (after, limit)
            for r in conn.execute(sql, args):
                yield StoredEvent(
                    int(r[0]), LiveEvent(r[1], r[2], r[3], int(r[4]), int(r[5]), *r[6:])
                )
        finally:
            conn.close()

    def position(self) -> int:
        conn = self._connect()
        try:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
            return int(row[0])
        finally:
            conn.close()

    def forget(self, customer_id: str) -> int:
        """Delete every event of the customer, durably, with the freed bytes overwritten.

        ``secure_delete`` zeroes the deleted cells and freed pages, and the WAL (which still
        holds the original inserts) is folded into the file and truncated, so no copy of the
        id stays in the log's files. Appends go on meanwhile: only SQLite's write lock is
        held, for the delete alone (no VACUUM: its time grows with the whole log).
        """
        if self._closed:
            raise ConfigError(f"event log {self.path} is closed")
        conn = self._connect()
        try:
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN IMMEDIATE")
            n = conn.execute("DELETE FROM events WHERE customer_id = ?", (customer_id,)).rowcount
            # other tables of the file that name customers (the served-recommendation log,
            # outcomes/served_log.py, lives here by default): their rows go too
            for (table,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'events'"
            ).fetchall():
                cols = {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}
                if "customer_id" in cols:
                    conn.execute(f'DELETE FROM "{table}" WHERE customer_id = ?', (customer_id,))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return int(n)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._writer.join()
        self._conn.close()

    def __enter__(self) -> SqliteEventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
