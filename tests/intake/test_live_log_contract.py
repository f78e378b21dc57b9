"""One contract suite for the live event log, run against both back ends: the embedded
SqliteEventLog and NatsEventLog on a real 3-node NATS JetStream cluster (Debian's
nats-server, started here on free localhost ports; a missing nats-server fails these tests,
it does not skip them). Then what only the distributed log has: a node killed with SIGKILL
while a writer appends, and forgetting a customer on every replica's disk.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ecomrec.errors import ConfigError
from intake import nats_local
from intake.live_log import EventLog, LiveEvent, SqliteEventLog, StoredEvent
from intake.live_log_nats import (
    EventLogUnavailableError,
    NatsEventLog,
    NatsLogConfig,
    customer_subject,
    customer_token,
    encode_event,
)
from intake.nats_local import LocalNatsCluster

NOW = 1_760_000_000
MakeLog = Callable[..., EventLog]


@pytest.fixture(params=["sqlite", "nats"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLog]:
    """A factory of logs that share one store (a reopen sees the same events)."""
    opened: list[EventLog] = []
    stream = f"T{uuid.uuid4().hex[:12]}"  # a fresh stream per test on the shared cluster

    def make(**kw: object) -> EventLog:
        log: EventLog
        if request.param == "sqlite":
            log = SqliteEventLog(tmp_path / "log.db", **kw)  # type: ignore[arg-type]
        else:
            c = request.getfixturevalue("cluster")
            cfg = NatsLogConfig(servers=tuple(c.urls), stream=stream, subject_prefix=stream)
            log = NatsEventLog(cfg, **kw)  # type: ignore[arg-type]
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def _ev(c: str, p: str, t: str = "view", **kw: object) -> LiveEvent:
    return LiveEvent(c, p, t, NOW, **kw)  # type: ignore[arg-type]


def test_implements_the_protocol_and_starts_empty(make_log: MakeLog) -> None:
    log = make_log()
    assert isinstance(log, EventLog)
    assert log.position() == 0
    assert list(log.read()) == []
    assert log.append([]).written == 0


def test_append_read_positions_and_idempotent_retry(make_log: MakeLog) -> None:
    log = make_log()
    a = log.append([_ev("c1", "p1"), _ev("c2", "p2", "purchase", quantity=3, price=2.5)])
    b = log.append([_ev("c1", "p3", "cart", order_id=" 007 ", session_id="s")], batch_id="x")
    again = log.append([_ev("c1", "p3", "cart", order_id=" 007 ", session_id="s")], "x")
    assert a.written == 2 and not a.replayed and 0 < a.first_seq < a.last_seq < b.first_seq
    assert again.replayed and (again.first_seq, again.last_seq) == (b.first_seq, b.last_seq)
    assert log.position() == b.last_seq
    stored = list(log.read())
    assert [s.seq for s in stored] == [a.first_seq, a.last_seq, b.first_seq]
    # every field comes back exactly as written
    assert stored[1].event == LiveEvent("c2", "p2", "purchase", NOW, 3, 2.5, None, None)
    assert stored[2].event == LiveEvent("c1", "p3", "cart", NOW, 1, None, " 007 ", "s")
    assert [s.event.product_id for s in log.read(after=a.first_seq)] == ["p2", "p3"]
    assert list(log.read(after=b.last_seq)) == []
    # a second handle on the same store: same events, the retry still recognised
    other = make_log()
    assert [s.seq for s in other.read()] == [s.seq for s in stored]
    assert other.append([_ev("c1", "p3", "cart")], batch_id="x").replayed
    assert other.position() == b.last_seq


def test_reading_in_pages_equals_one_read(make_log: MakeLog) -> None:
    log = make_log()
    for b in range(7):
        log.append([_ev(f"c{i % 3}", f"p{b}-{i}") for i in range(13)])
    whole = [(s.seq, s.event) for s in log.read()]
    assert len(whole) == 91
    paged: list[tuple[int, LiveEvent]] = []
    after = 0
    while True:
        page = list(log.read(after=after, limit=10))
        if not page:
            break
        assert len(page) <= 10
        paged.extend((s.seq, s.event) for s in page)
        after = page[-1].seq
    assert paged == whole


def test_concurrent_appends_lose_nothing_and_duplicate_nothing(make_log: MakeLog) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def hook(stored: list[StoredEvent]) -> None:
        with lock:
            seen.extend(s.seq for s in stored)

    log = make_log(on_commit=hook)
    acks: dict[tuple[int, int], tuple[int, int]] = {}

    def client(k: int) -> None:
        for b in range(10):
            a = log.append([_ev(f"c{k}", f"p{k}-{b}-{i}") for i in range(20)], f"b{k}-{b}")
            acks[(k, b)] = (a.first_seq, a.last_seq)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = list(log.read())
    assert len(stored) == 6 * 10 * 20
    assert len({s.event.product_id for s in stored}) == 6 * 10 * 20
    assert [s.seq for s in stored] == sorted(s.seq for s in stored)
    # the hook saw every acknowledged event exactly once, with the positions read gives
    assert sorted(seen) == [s.seq for s in stored]
    for (k, b), (first, last) in acks.items():
        mine = [s.seq for s in stored if s.event.product_id.startswith(f"p{k}-{b}-")]
        assert (min(mine), max(mine)) == (first, last)


AWKWARD = ["alice.smith@example.com", "a b*c>d", "ünïcødé-客户", "x" * 256, "a", "a."]


def test_forget_removes_exactly_that_customer_whatever_its_id(make_log: MakeLog) -> None:
    log = make_log()
    for i, c in enumerate(AWKWARD):
        log.append([_ev(c, f"p{i}-{j}") for j in range(i + 1)])
    assert {s.event.customer_id for s in log.read()} == set(AWKWARD)
    assert log.forget("a") == AWKWARD.index("a") + 1
    assert log.forget("a") == 0
    assert log.forget("nobody") == 0
    left = [s.event.customer_id for s in log.read()]
    assert "a" not in left and set(left) == set(AWKWARD) - {"a"}
    assert log.forget("a b*c>d") == 2
    assert {s.event.customer_id for s in log.read()} == set(AWKWARD) - {"a", "a b*c>d"}
    # new events after a forget still append and read
    log.append([_ev("a", "again")])
    assert [s.event.product_id for s in log.read() if s.event.customer_id == "a"] == ["again"]


# ------------------------------------------------------------------ NATS only


def test_subjects_are_valid_single_tokens_for_any_id() -> None:
    for c in AWKWARD:
        subject = customer_subject("events", c)
        prefix, bucket, token = subject.split(".")
        assert prefix == "events" and len(bucket) == 2
        assert token == customer_token(c) and bucket == token[:2]
        assert len(token) == 32 and int(token, 16) >= 0
    assert len({customer_token(c) for c in AWKWARD}) == len(AWKWARD)


def test_a_missing_nats_server_is_an_error_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(nats_local, "FALLBACK_PATHS", ())
    with pytest.raises(ConfigError, match="apt-get install -y nats-server"):
        LocalNatsCluster(tmp_path)


def test_an_existing_stream_with_other_replicas_is_refused(cluster: LocalNatsCluster) -> None:
    stream = f"T{uuid.uuid4().hex[:12]}"
    cfg = NatsLogConfig(servers=tuple(cluster.urls), stream=stream, subject_prefix=stream)
    NatsEventLog(cfg).close()
    with pytest.raises(ConfigError, match="replicas=3"):
        NatsEventLog(dataclasses.replace(cfg, replicas=1))


def _stream_leader(log: NatsEventLog) -> str:
    info = log._call(log._js.stream_info(log.config.stream))
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


@pytest.mark.slow
def test_kill_9_of_the_stream_leader_during_writes_loses_no_acknowledged_batch(
    tmp_path: Path,
) -> None:
    with LocalNatsCluster(tmp_path / "nats") as c:
        cfg = NatsLogConfig(
            servers=tuple(c.urls), ack_timeout_s=1.0, append_deadline_s=2.0, read_chunk=200
        )
        log = NatsEventLog(cfg)
        acked: dict[int, tuple[int, int]] = {}
        retries = 0
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            nonlocal retries
            b = 0
            try:
                while not stop.is_set():
                    batch = [_ev(f"c{b % 7}", f"b{b}-{i}") for i in range(50)]
                    while True:  # the client's retry: same batch id until acknowledged
                        try:
                            a = log.append(batch, batch_id=f"batch-{b}")
                            break
                        except EventLogUnavailableError:
                            retries += 1
                    acked[b] = (a.first_seq, a.last_seq)
                    b += 1
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        leader = _stream_leader(log)
        victim = int(leader.removeprefix("n"))
        time.sleep(random.Random(3).random() * 0.05)  # mid-batch
        n_before = len(acked)
        c.kill(victim)
        # writes go on with two nodes: a new leader is elected and more batches are acked
        deadline = time.monotonic() + 60
        while len(acked) < n_before + 40 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
        stop.set()
        t.join(timeout=120)
        log.close()
        assert not errors, errors
        assert len(acked) >= n_before + 40, "writes did not resume after the leader died"

        # read back through the surviving nodes only
        alive = tuple(u for i, u in enumerate(c.urls) if i != victim)
        with NatsEventLog(NatsLogConfig(servers=alive)) as survivor:
            assert _stream_leader(survivor) != leader
            stored = list(survivor.read())
        by_batch: dict[int, list[StoredEvent]] = {}
        for s in stored:
            by_batch.setdefault(int(s.event.product_id[1:].split("-")[0]), []).append(s)
        for b, (first, last) in acked.items():
            got = by_batch.get(b)
            assert got is not None, f"acknowledged batch {b} lost"
            # exactly once: its 50 events, no duplicate, at the acknowledged positions
            assert sorted(s.event.product_id for s in got) == sorted(
                f"b{b}-{i}" for i in range(50)
            ), b
            assert (got[0].seq, got[-1].seq) == (first, last)
        assert set(by_batch) == set(acked)  # nothing unacknowledged half-written either
        # the killed node comes back and catches up from its peers
        c.start_node(victim)
        c.wait_ready()


def test_a_follower_sees_every_writer_once_in_order_within_a_second(
    cluster: LocalNatsCluster,
) -> None:
    """Two handles (two service replicas): what one appends reaches the other's follower."""
    stream = f"F{uuid.uuid4().hex[:12]}"
    cfg = NatsLogConfig(servers=tuple(cluster.urls), stream=stream, subject_prefix=stream)
    got: list[StoredEvent] = []
    arrived: dict[int, float] = {}
    lock = threading.Lock()

    def on_events(stored: list[StoredEvent]) -> None:
        with lock:
            got.extend(stored)
            for s in stored:
                arrived[s.seq] = time.monotonic()

    with NatsEventLog(cfg) as writer, NatsEventLog(cfg) as replica:
        writer.append([_ev("old", f"o{i}") for i in range(5)])
        stop = replica.follow(after=2, on_events=on_events)  # history after position 2 first
        acked_at: dict[int, float] = {}
        for b in range(20):
            a = writer.append([_ev(f"c{b % 4}", f"p{b}-{i}") for i in range(25)])
            for seq in range(a.first_seq, a.last_seq + 1):
                acked_at[seq] = time.monotonic()
        deadline = time.monotonic() + 10
        while len(got) < 3 + 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop()
        writer.append([_ev("late", "x")])
        time.sleep(0.3)  # nothing after stop() (a check for absence)
    assert [s.seq for s in got] == list(range(3, 506))
    assert [s.event.product_id for s in got[3:]] == [
        f"p{b}-{i}" for b in range(20) for i in range(25)
    ]
    lag = sorted(arrived[q] - t for q, t in acked_at.items())
    assert lag[int(0.99 * (len(lag) - 1))] < 1.0, lag[-5:]  # p99 ack -> follower


@pytest.mark.slow
def test_a_reader_whose_node_dies_resumes_and_reads_everything_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intake.live_log_nats")
    with LocalNatsCluster(tmp_path / "nats") as c:
        cfg = NatsLogConfig(
            servers=tuple(c.urls), ack_timeout_s=1.0, append_deadline_s=30.0, read_chunk=100
        )
        with NatsEventLog(cfg) as log:
            for b in range(40):
                log.append([_ev(f"c{i % 5}", f"p{b}-{i}") for i in range(100)], f"r{b}")
            it = log.read()
            got = [next(it) for _ in range(1500)]
            # kill the node that serves this reader's consumer
            infos = log._call(log._js.consumers_info(cfg.stream))
            assert len(infos) == 1 and infos[0].cluster is not None
            host = str(infos[0].cluster.leader)
            c.kill(int(host.removeprefix("n")))
            got.extend(it)
        assert [s.seq for s in got] == list(range(1, 4001))
        assert [s.event.product_id for s in got] == [
            f"p{b}-{i}" for b in range(40) for i in range(100)
        ]
        assert "reopened" in caplog.text  # the read did lose its consumer and came back


WRITER = r"""
import sys
from intake.live_log import LiveEvent
from intake.live_log_nats import NatsEventLog, NatsLogConfig
servers, stream, start = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
log = NatsEventLog(NatsLogConfig(servers=tuple(servers), stream=stream, subject_prefix=stream))
b = start
while True:
    print(f"send {b}", flush=True)
    log.append([LiveEvent(f"c{i % 9}", f"b{b}-{i}", "view", 1_700_000_000) for i in range(1000)], f"batch-{b}")
    print(f"ack {b}", flush=True)
    b += 1
"""


@pytest.mark.slow
def test_a_writer_killed_mid_batch_then_retried_leaves_each_batch_exactly_once(
    cluster: LocalNatsCluster,
) -> None:
    """The client side of kill -9: a writer process dies while its 1000-event batch is half
    published; the retry with the same batch id completes it without a duplicate."""
    stream = f"W{uuid.uuid4().hex[:12]}"
    cfg = NatsLogConfig(servers=tuple(cluster.urls), stream=stream, subject_prefix=stream)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    rng = random.Random(11)
    acked: set[int] = set()
    torn: list[int] = []  # events of the killed batch stored before its retry
    start = 0
    with NatsEventLog(cfg) as log:
        for _ in range(5):
            pos0 = log.position()
            proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, ",".join(cluster.urls), stream, str(start)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert proc.stdout is not None
            in_flight = start
            want, seen = rng.randint(1, 3), 0
            deadline = time.monotonic() + 60
            while seen < want and time.monotonic() < deadline:
                kind, b = proc.stdout.readline().split()
                if kind == "ack":
                    acked.add(int(b))
                    seen += 1
                else:
                    in_flight = int(b)
            # kill while the next batch is being published (a batch takes tens of ms)
            while True:
                kind, b = proc.stdout.readline().split()
                if kind == "ack":
                    acked.add(int(b))
                else:
                    in_flight = int(b)
                    break
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for line in proc.stdout:
                kind, b = line.split()
                if kind == "ack":
                    acked.add(int(b))
                in_flight = max(in_flight, int(b))
            assert seen >= 1
            prefix = f"b{in_flight}-"
            torn.append(sum(s.event.product_id.startswith(prefix) for s in log.read(after=pos0)))
            # the client retries the batch that was in flight, with its id
            log.append(
                [
                    LiveEvent(f"c{i % 9}", f"b{in_flight}-{i}", "view", 1_700_000_000)
                    for i in range(1000)
                ],
                f"batch-{in_flight}",
            )
            acked.add(in_flight)
            start = in_flight + 1
        by_batch: dict[int, list[str]] = {}
        for s in log.read():
            by_batch.setdefault(int(s.event.product_id[1:].split("-")[0]), []).append(
                s.event.product_id
            )
    assert set(by_batch) == acked
    for bn, got in by_batch.items():
        assert sorted(got) == sorted(f"b{bn}-{i}" for i in range(1000)), bn
    # a kill landed after the server stored the batch but before the writer saw the ack:
    # the retry had to be deduplicated (a kill mid-write is the next test, made certain)
    assert any(n == 1000 for n in torn), torn


def test_a_half_published_batch_is_completed_once_by_its_retry(
    cluster: LocalNatsCluster,
) -> None:
    """What a writer that died mid-batch leaves (its first 400 messages stored, with their
    ids) is completed by the retry with the same batch id: 1000 events once, in order."""
    stream = f"H{uuid.uuid4().hex[:12]}"
    cfg = NatsLogConfig(servers=tuple(cluster.urls), stream=stream, subject_prefix=stream)
    batch = [_ev(f"c{i % 9}", f"p{i}") for i in range(1000)]
    with NatsEventLog(cfg) as log:
        half = [
            (customer_subject(stream, e.customer_id), encode_event(e), f"b7:{i}")
            for i, e in enumerate(batch[:400])
        ]
        log._call(log._publish_all(half))
        assert log.position() == 400
        ack = log.append(batch, batch_id="b7")
        assert not ack.replayed and (ack.first_seq, ack.last_seq) == (1, 1000)
        assert [s.event for s in log.read()] == batch
        assert log.append(batch, batch_id="b7").replayed


@pytest.mark.slow
def test_forget_erases_the_customer_from_every_node_disk(tmp_path: Path) -> None:
    with LocalNatsCluster(tmp_path / "nats") as c:
        with NatsEventLog(NatsLogConfig(servers=tuple(c.urls))) as log:
            log.append([_ev("bob", "p1", "purchase")])
            log.append([_ev("alice-secret-id", f"p{i}") for i in range(30)])
            log.append([_ev("bob", "p2")])
            assert b"alice-secret-id" in c.store_bytes()
            assert log.forget("alice-secret-id") == 30
            assert [s.event.product_id for s in log.read()] == ["p1", "p2"]
        # a restart compacts each node's Raft log (the copy a delete cannot reach)
        c.stop()
        blob = c.store_bytes()
        assert b"alice-secret-id" not in blob and b"bob" in blob
        assert customer_token("alice-secret-id").encode() not in blob
        c.start()
        with NatsEventLog(NatsLogConfig(servers=tuple(c.urls))) as log:
            assert [s.event.customer_id for s in log.read()] == ["bob", "bob"]
