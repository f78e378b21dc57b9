"""The live event log on NATS JetStream: the :class:`~intake.live_log.EventLog` protocol on a
replicated stream (the scale-out back end; :class:`~intake.live_log.SqliteEventLog` is the
embedded default).

Layout (docs/events.md, "Distributed back end: NATS JetStream"):

* one stream (default ``ECOMREC_EVENTS``, file storage, ``num_replicas=3``) over the subjects
  ``<prefix>.>``;
* **one message per event** on the subject ``<prefix>.<bucket>.<customer>``: ``customer`` is
  32 hex digits of the id's SHA-256 (any id, with dots, spaces, ``*`` or ``>``, is one valid
  token, and the id itself never appears in a subject) and ``bucket`` its first two (256
  buckets, room to shard consumers later). One message per event, not per batch, so that a
  customer is a subject: ``forget`` finds that subject's messages and erases them, and
  positions are per event as in the SQLite log. Measured in docs/events.md: the batch's events are published pipelined
  and the acknowledgements awaited together;
* the payload is the event as a compact JSON array;
* **acknowledged** = every event of the batch has its JetStream publish ack, which the
  stream leader sends once a quorum of the replicas (2 of 3) has stored the message;
* **idempotent batch ids**: event ``i`` of batch ``b`` carries ``Nats-Msg-Id: b:i``; the stream
  drops a message whose id it saw within ``duplicate_window_s`` and acks it with the original
  sequence. A publish that times out (leader lost, node killed) is retried with the same id
  until ``append_deadline_s``, so a retried batch lands exactly once. A batch without an id
  gets a random one, so these internal retries are idempotent too. Unlike SQLite, a batch
  whose ``append`` raised may be partly stored until it is retried with its id: JetStream
  2.9 has no multi-message transaction;
* ``read(after)`` is by stream sequence (an ephemeral, in-memory pull consumer from
  ``after + 1``), ``position()`` the stream's last sequence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js import api

from ecomrec.errors import ConfigError
from intake.live_log import Ack, EventLogUnavailableError, LiveEvent, StoredEvent, event_row

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class NatsLogConfig:
    """Where the stream lives and how it is made (saved with nothing: the stream holds it)."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    stream: str = "ECOMREC_EVENTS"
    subject_prefix: str = "events"
    replicas: int = 3  # 3 nodes: a write is acknowledged once 2 hold it
    duplicate_window_s: float = 600.0  # how long a batch id is remembered for retries
    ack_timeout_s: float = 5.0  # one publish attempt
    append_deadline_s: float = 60.0  # retries of one append, then EventLogUnavailableError
    read_chunk: int = 500  # messages per pull request when reading

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("nats: servers is empty")
        if not self.stream.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"nats: stream {self.stream!r} must be letters, digits, _ or -")
        if not self.subject_prefix or any(c in self.subject_prefix for c in " .*>"):
            raise ConfigError(f"nats: subject_prefix {self.subject_prefix!r} is not one token")
        if not 1 <= self.replicas <= 5:
            raise ConfigError(f"nats: replicas {self.replicas} is not in 1..5")
        if self.duplicate_window_s <= 0 or self.ack_timeout_s <= 0:
            raise ConfigError("nats: duplicate_window_s and ack_timeout_s must be > 0")


def customer_token(customer_id: str) -> str:
    """A customer id as one subject token: 32 hex digits of its SHA-256 (one-way: the id
    itself is never a subject, so no stream index or consumer config spells it)."""
    return hashlib.sha256(customer_id.encode()).hexdigest()[:32]


def customer_subject(prefix: str, customer_id: str) -> str:
    token = customer_token(customer_id)
    return f"{prefix}.{token[:2]}.{token}"


def encode_event(e: LiveEvent) -> bytes:
    row = list(event_row(e))
    if row[-1] is None:  # no recommendation_id: the eight-field array of older writers
        row.pop()
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()


def decode_event(data: bytes) -> LiveEvent:
    c, p, t, ts, q, price, o, s, *rest = json.loads(data)
    return LiveEvent(c, p, t, int(ts), int(q), price, o, s, rest[0] if rest else None)


# JetStream's "no suitable peers for placement": a replicated stream cannot be placed until
# enough nodes are current, e.g. while a restarted node rejoins the cluster.
_NO_PEERS = 10005


def _retryable(e: BaseException) -> bool:
    """Timeouts, no responders and 503s come and go with leader elections, and so does a
    placement that lacks peers while a node rejoins; any other 400 does not."""
    if isinstance(e, nats.js.errors.BadRequestError):
        return getattr(e, "err_code", None) == _NO_PEERS
    if isinstance(e, nats.errors.ConnectionClosedError):
        return False
    return isinstance(e, nats.errors.Error | asyncio.TimeoutError)


async def _connect(servers: Sequence[str], name: str) -> nats.NATS:
    async def on_error(e: Exception) -> None:
        log.warning("nats %s: %s", name, e)

    async def on_disconnect() -> None:
        log.info("nats %s: disconnected, reconnecting", name)

    return await nats.connect(
        servers=list(servers),
        name=name,
        connect_timeout=2,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
    )


def wait_for_jetstream(servers: Sequence[str], deadline_s: float) -> None:
    """Block until JetStream answers through ``servers`` (a meta leader exists)."""

    async def probe() -> None:
        end = time.monotonic() + deadline_s
        last: BaseException | None = None
        while time.monotonic() < end:
            nc = None
            try:
                nc = await nats.connect(
                    servers=list(servers), connect_timeout=1, max_reconnect_attempts=1
                )
                await nc.jetstream(timeout=1).account_info()
                return
            except Exception as e:
                last = e
                await asyncio.sleep(0.1)
            finally:
                if nc is not None:
                    await nc.close()
        raise TimeoutError(f"JetStream at {list(servers)} not ready in {deadline_s}s: {last!r}")

    asyncio.run(probe())


def _failed(e: BaseException) -> asyncio.Future[api.PubAck]:
    f: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
    f.set_exception(e)
    return f


class NatsEventLog:
    """The :class:`~intake.live_log.EventLog` protocol on a JetStream stream.

    A synchronous facade: the asyncio client runs on a loop thread of its own; ``append``,
    ``read``, ``position`` and ``forget`` may be called from any thread. ``on_commit`` is
    called with each acknowledged batch's stored events before ``append`` returns (this
    process's appends only; other writers' events are seen through ``read``).
    """

    def __init__(
        self,
        config: NatsLogConfig,
        on_commit: Callable[[list[StoredEvent]], None] | None = None,
        connect_deadline_s: float = 30.0,
    ) -> None:
        self.config = config
        self._on_commit = on_commit
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-log", daemon=True)
        self._thread.start()
        try:
            self._nc: nats.NATS = self._call(self._connect_within(connect_deadline_s))
            self._js = self._nc.jetstream(timeout=config.ack_timeout_s)
            self._call(self._ensure_stream(connect_deadline_s))
        except BaseException:
            self._stop_loop()
            raise

    async def _connect_within(self, deadline_s: float) -> nats.NATS:
        """Connect (the client retries the servers) within ``deadline_s``, else
        EventLogUnavailableError naming them (a service started while NATS is down fails
        with that, and its supervisor restarts it)."""
        servers = self.config.servers
        try:
            return await asyncio.wait_for(_connect(servers, "ecomrec-event-log"), deadline_s)
        except (TimeoutError, OSError, nats.errors.Error) as e:
            raise EventLogUnavailableError(
                f"nats: no server of {list(servers)} answered within {deadline_s:g} s ({e!r})"
            ) from e

    # ---------------------------------------------------------------- plumbing
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        async def cancel_rest() -> None:  # the client's flusher and reader tasks
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self._call(cancel_rest(), timeout=10)
        except Exception as e:
            log.debug("nats: stopping the loop: %r", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _ensure_stream(self, deadline_s: float) -> None:
        cfg = self.config
        want = api.StreamConfig(
            name=cfg.stream,
            subjects=[f"{cfg.subject_prefix}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            num_replicas=cfg.replicas,
            duplicate_window=cfg.duplicate_window_s,
        )
        end = time.monotonic() + deadline_s
        while True:
            try:
                try:
                    info = await self._js.stream_info(cfg.stream)
                except nats.js.errors.NotFoundError:
                    info = await self._js.add_stream(want)
                have = info.config
                if have.num_replicas != cfg.replicas or have.subjects != want.subjects:
                    raise ConfigError(
                        f"nats: stream {cfg.stream} exists with replicas={have.num_replicas}, "
                        f"subjects={have.subjects}; expected replicas={cfg.replicas}, "
                        f"subjects={want.subjects}"
                    )
                return
            except ConfigError:
                raise
            except Exception as e:
                if not _retryable(e) or time.monotonic() > end:
                    raise EventLogUnavailableError(
                        f"nats: stream {cfg.stream} not available at {list(cfg.servers)}: {e!r}"
                    ) from e
                await asyncio.sleep(0.2)

    # ---------------------------------------------------------------- writing
    def append(self, events: Sequence[LiveEvent], batch_id: str | None = None) -> Ack:
        return self.submit(events, batch_id).result()

    def submit(
        self, events: Sequence[LiveEvent], batch_id: str | None = None
    ) -> concurrent.futures.Future[Ack]:
        """:meth:`append` without blocking: the future resolves with the acknowledgement
        (after ``on_commit`` ran), on the client's loop thread; an asyncio caller awaits it
        with ``asyncio.wrap_future`` and holds no thread meanwhile."""
        if self._closed:
            raise ConfigError(f"event log nats:{self.config.stream} is closed")
        return asyncio.run_coroutine_threadsafe(
            self._append_acked(list(events), batch_id or uuid.uuid4().hex), self._loop
        )

    async def _append_acked(self, events: list[LiveEvent], batch_id: str) -> Ack:
        if not events:
            return Ack(0, 0, 0)
        seqs, dups = await self._append(events, batch_id)
        ack = Ack(min(seqs), max(seqs), len(events), replayed=all(dups))
        if self._on_commit is not None and not ack.replayed:
            try:
                self._on_commit([StoredEvent(s, e) for s, e in zip(seqs, events, strict=True)])
            except Exception:
                log.exception("event log nats:%s: on_commit hook failed", self.config.stream)
        return ack

    async def _append(self, events: list[LiveEvent], batch_id: str) -> tuple[list[int], list[bool]]:
        cfg = self.config
        subjects = [customer_subject(cfg.subject_prefix, e.customer_id) for e in events]
        payloads = [encode_event(e) for e in events]
        seqs = [0] * len(events)
        dups = [False] * len(events)
        pending = list(range(len(events)))
        end = time.monotonic() + cfg.append_deadline_s
        wait = 0.05
        while True:
            results = await self._publish_all(
                [(subjects[i], payloads[i], f"{batch_id}:{i}") for i in pending]
            )
            retry: list[int] = []
            for i, r in zip(pending, results, strict=True):
                if isinstance(r, BaseException):
                    if not _retryable(r):
                        raise r
                    retry.append(i)
                else:
                    seqs[i], dups[i] = r.seq, bool(r.duplicate)
            if not retry:
                return seqs, dups
            if time.monotonic() > end:
                raise EventLogUnavailableError(
                    f"nats: {len(retry)} of {len(events)} events of batch {batch_id!r} not "
                    f"acknowledged in {cfg.append_deadline_s}s; retry with the same batch id"
                )
            log.info("nats: retrying %d events of batch %s", len(retry), batch_id)
            pending = retry
            await asyncio.sleep(wait)
            wait = min(1.0, wait * 2)

    async def _publish_all(self, msgs: list[tuple[str, bytes, str]]) -> list[Any]:
        """Publish pipelined (one reply subscription for all acks), wait for the acks
        together; each entry is a PubAck or the exception of that message (a timeout when
        no ack came within ``ack_timeout_s``)."""
        futs: list[asyncio.Future[api.PubAck]] = []
        try:
            for subject, payload, msg_id in msgs:
                headers = {"Nats-Msg-Id": msg_id}
                futs.append(
                    await self._js.publish_async(
                        subject, payload, stream=self.config.stream, headers=headers
                    )
                )
        except Exception as e:  # the connection broke mid-batch: the rest are retried
            futs.extend(_failed(e) for _ in range(len(msgs) - len(futs)))
        done, _ = await asyncio.wait(futs, timeout=self.config.ack_timeout_s)
        out: list[Any] = []
        for f in futs:
            if f not in done:
                f.cancel()  # frees its slot; a late ack is dropped, the retry dedupes
                out.append(nats.errors.TimeoutError())
            elif f.exception() is not None:
                out.append(f.exception())
            else:
                out.append(f.result())
        return out

    # ---------------------------------------------------------------- reading
    async def _open_reader(self, start_seq: int, subject: str | None = None) -> tuple[Any, int]:
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = await self._js.pull_subscribe(
            subject or f"{self.config.subject_prefix}.>", stream=self.config.stream, config=cfg
        )
        info = await sub.consumer_info()
        return sub, int(info.num_pending or 0)

    async def _close_reader(self, sub: Any) -> None:
        try:
            name = (await sub.consumer_info()).name
            await sub.unsubscribe()
            await self._js.delete_consumer(self.config.stream, name)
        except Exception as e:  # an ephemeral consumer expires by itself (inactive_threshold)
            log.debug("nats: closing a reader: %r", e)

    async def _fetch(self, sub: Any, n: int) -> list[tuple[int, int, bytes]]:
        try:
            msgs = await sub.fetch(n, timeout=2.0)
        except nats.errors.TimeoutError:
            return []
        return [(m.metadata.sequence.stream, m.metadata.num_pending, m.data) for m in msgs]

    def read(self, after: int = 0, limit: int | None = None) -> Iterator[StoredEvent]:
        """Events with stream sequence ``> after`` in order, until caught up (or ``limit``).

        A reader whose node dies is reopened from the last sequence it yielded.
        """
        for seq, data in self._read_raw(after, limit, None):
            yield StoredEvent(seq, decode_event(data))

    def _read_raw(
        self, after: int, limit: int | None, subject: str | None
    ) -> Iterator[tuple[int, bytes]]:
        last, yielded = after, 0
        end = time.monotonic() + self.config.append_deadline_s
        sub: Any = None
        try:
            while limit is None or yielded < limit:
                try:
                    if sub is None:
                        sub, pending = self._call(self._open_reader(last + 1, subject))
                        if pending == 0:
                            return
                    want = self.config.read_chunk
                    if limit is not None:
                        want = min(want, limit - yielded)
                    chunk = self._call(self._fetch(sub, want))
                except Exception as e:
                    if not _retryable(e) or time.monotonic() > end:
                        raise
                    log.info(
                        "nats: reader of %s reopened after %d: %r", self.config.stream, last, e
                    )
                    if sub is not None:
                        self._call(self._close_reader(sub))
                    sub = None
                    time.sleep(0.2)
                    continue
                if not chunk:  # nothing came although something was pending: reopen
                    if time.monotonic() > end:
                        raise EventLogUnavailableError(
                            f"nats: reading {self.config.stream} after {last} stalled"
                        )
                    log.info("nats: reader of %s reopened after %d", self.config.stream, last)
                    self._call(self._close_reader(sub))
                    sub = None
                    continue
                for seq, _pending, data in chunk:
                    if seq <= last:
                        continue
                    last = seq
                    yielded += 1
                    end = time.monotonic() + self.config.append_deadline_s
                    yield seq, data
                    if limit is not None and yielded >= limit:
                        return
                if chunk[-1][1] == 0:  # caught up with the stream
                    return
        finally:
            if sub is not None:
                self._call(self._close_reader(sub))

    def follow(
        self, after: int, on_events: Callable[[list[StoredEvent]], None]
    ) -> Callable[[], None]:
        """Deliver every event with position ``> after``, then each new one as any writer's
        append is acknowledged, to ``on_events`` (the live history of a service replica that
        must see the other replicas' events). Returns a function that stops it.

        An ordered push consumer (in memory, flow control, 1 s heartbeats: the client
        recreates it from the last delivered position when its node dies). ``on_events``
        runs on the client's loop thread: keep it quick (hand work to a queue).
        """

        async def start() -> Any:
            async def deliver(msg: Any) -> None:
                try:
                    seq = msg.metadata.sequence.stream
                    on_events([StoredEvent(seq, decode_event(msg.data))])
                except Exception:
                    log.exception("nats: follower of %s: on_events failed", self.config.stream)

            cfg = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
            )
            return await self._js.subscribe(
                f"{self.config.subject_prefix}.>",
                cb=deliver,
                stream=self.config.stream,
                config=cfg,
                ordered_consumer=True,
                idle_heartbeat=1.0,
            )

        return self._stopper(self._call(start()), "a follower")

    # ------------------------------------------------ forget, told to every replica
    @property
    def forget_subject(self) -> str:
        """Core NATS subject (outside the stream: nothing stores it) on which a forget is
        announced to every service replica."""
        return f"{self.config.subject_prefix}-forget"

    def announce_forget(self, customer_id: str) -> None:
        """Tell every replica listening (:meth:`on_forget`) to drop the customer from its
        memory. The message carries :func:`customer_token` (never the id) and is not stored:
        a replica disconnected at that moment does not hear it (its live history still
        never gets the erased events back: they are gone from the stream)."""
        token = customer_token(customer_id).encode()

        async def pub() -> None:
            await self._nc.publish(self.forget_subject, token)
            await self._nc.flush(timeout=max(1, round(self.config.ack_timeout_s)))

        self._call(pub())

    def on_forget(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(customer_token)`` for each forget announced by any replica
        (this one included), on the client's loop thread; returns a function that stops."""

        async def start() -> Any:
            async def deliver(msg: Any) -> None:
                try:
                    callback(msg.data.decode())
                except Exception:
                    log.exception("nats: forget listener failed")

            sub = await self._nc.subscribe(self.forget_subject, cb=deliver)
            await self._nc.flush(timeout=max(1, round(self.config.ack_timeout_s)))
            return sub

        return self._stopper(self._call(start()), "the forget listener")

    def _stopper(self, sub: Any, what: str) -> Callable[[], None]:
        """A function that unsubscribes ``sub`` (a no-op once the log is closed)."""

        def stop() -> None:
            if not self._closed:
                try:
                    self._call(sub.unsubscribe(), timeout=10)
                except Exception as e:
                    log.debug("nats: stopping %s: %r", what, e)

        return stop

    def position(self) -> int:
        info = self._call(self._js.stream_info(self.config.stream))
        return int(info.state.last_seq)

    def forget(self, customer_id: str) -> int:
        """Erase every event of the customer on every replica; returns how many went.

        The customer's messages are found by "next message on this subject" reads (plain
        reads: no consumer whose config would name the subject in the cluster's metadata
        log) and each is deleted with JetStream's secure erase: its bytes are overwritten
        on each replica, not only marked deleted (a subject purge only marks them). The
        call returns once every replica has applied the erases (or after
        ``append_deadline_s``, logged). Each node's Raft log keeps the original append
        until the node compacts it: at its next snapshot, at the latest when it restarts
        (docs/events.md: a rolling restart after a forget removes every copy).
        """
        subject = customer_subject(self.config.subject_prefix, customer_id)
        stream = self.config.stream

        async def erase() -> int:
            n, seq = 0, 1
            while True:
                try:
                    msg = await self._js.get_msg(stream, seq=seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    break
                assert msg.seq is not None
                seq = msg.seq + 1
                if msg.data is None or decode_event(msg.data).customer_id != customer_id:
                    continue  # a hash collision: another customer's event stays
                try:
                    await self._js.delete_msg(stream, msg.seq)
                    n += 1
                except nats.js.errors.NotFoundError:
                    pass  # erased meanwhile by another forget
            end = time.monotonic() + self.config.append_deadline_s
            while time.monotonic() < end:  # every replica has applied the erases
                info = await self._js.stream_info(stream)
                peers = (info.cluster.replicas if info.cluster else None) or []
                if all(p.current and not p.lag for p in peers):
                    return n
                await asyncio.sleep(0.05)
            log.warning("nats: forget: a replica of %s has not caught up yet", stream)
            return n

        return self._call(erase())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._nc.drain(), timeout=10)
        except Exception as e:
            log.warning("nats: closing: %r", e)
        self._stop_loop()

    def __enter__(self) -> NatsEventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
