"""TrackEvents on the NATS JetStream back end (``event_backend = "nats"``), over real
nats-server nodes (a 3-node cluster on localhost) and two real gRPC servers (two service
replicas, each with its own client of the stream): what one replica acknowledges reaches
the other's next Recommend / GetUserProfile within a second; a NATS node killed under
TrackEvents load loses no acknowledged event (and no replica's live history counts one
twice); ForgetCustomer on one replica erases the stream and reaches the other."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from intake.live_log_nats import NatsEventLog, NatsLogConfig
from intake.nats_local import LocalNatsCluster
from tests.serving.conftest import Served, make_engine, open_reader

pytestmark = pytest.mark.slow  # a NATS cluster and two servers per test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNatsCluster]:
    with LocalNatsCluster(tmp_path_factory.mktemp("nats")) as c:
        yield c


def _replicas(
    parts: Any, index_dir: Path, segments: Any, urls: list[str], n: int = 2, **cfg: Any
) -> tuple[list[Served], list[Any]]:
    """``n`` servers on one fresh stream (its own name: tests do not share events)."""
    stream = f"S{uuid.uuid4().hex[:10]}"
    servers, readers = [], []
    for _ in range(n):
        reader = open_reader(index_dir)
        readers.append(reader)
        servers.append(
            Served(
                make_engine(
                    parts,
                    reader,
                    segments,
                    event_backend="nats",
                    nats_servers=tuple(urls),
                    nats_stream=stream,
                    nats_subject_prefix=stream.lower(),
                    **cfg,
                )
            )
        )
    return servers, readers


def _close(servers: list[Served], readers: list[Any]) -> None:
    for s in servers:
        s.close()
    for r in readers:
        r.close()


def _stream_log(s: Served, servers: tuple[str, ...] | None = None) -> NatsEventLog:
    cfg = s.cfg
    return NatsEventLog(
        NatsLogConfig(
            servers=servers or cfg.nats_servers,
            stream=cfg.nats_stream,
            subject_prefix=cfg.nats_subject_prefix,
        )
    )


def _items(served: Served, n: int, start: int = 0) -> list[str]:
    return [served.engine.catalog.external_ids[i] for i in range(1 + start, 1 + start + n)]


def _track(served: Served, events: list[dict[str, Any]], batch_id: str = "", **kw: Any) -> Any:
    pb = served.pb
    return served.call(
        "TrackEvents",
        pb.TrackEventsRequest(batch_id=batch_id, events=[pb.TrackedEvent(**e) for e in events]),
        **kw,
    )


def _recommend(served: Served, user: str, recent: list[tuple[str, str, int]] = ()) -> Any:  # type: ignore[assignment]
    pb = served.pb
    return served.call(
        "Recommend",
        pb.RecommendRequest(
            user_id=user,
            k=10,
            recent_events=[pb.Event(item_id=i, event_type=t, ts=ts) for i, t, ts in recent],
        ),
    )


def _n_events(served: Served, user: str) -> int:
    return int(
        served.call("GetUserProfile", served.pb.GetUserProfileRequest(user_id=user)).n_events
    )


def _seen(served: Served, user: str) -> int:
    """Live events counted for ``user``; 0 while the replica knows none (NOT_FOUND)."""
    try:
        return _n_events(served, user)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return 0


def _ids(resp: Any) -> list[str]:
    return [i.item_id for i in resp.items]


def test_an_event_tracked_on_one_replica_reaches_the_other_within_a_second(
    cluster: LocalNatsCluster, parts: Any, index_dir: Path, segments: Any
) -> None:
    (a, b), readers = _replicas(parts, index_dir, segments, cluster.urls)
    try:
        # a customer the dataset does not know: recommendations from the live events alone
        now = int(time.time()) - 100
        items = _items(a, 4, start=20)
        events = [(items[i], "view", now + i) for i in range(4)]
        anonymous_with_events = _ids(_recommend(b, "", list(events)))
        assert _ids(_recommend(b, "nats-new")) != anonymous_with_events
        resp = _track(
            a,
            [
                {"customer_id": "nats-new", "product_id": i, "event_type": t, "timestamp": ts}
                for i, t, ts in events
            ],
        )
        assert resp.accepted == 4 and resp.last_position >= resp.first_position > 0
        assert _n_events(a, "nats-new") == 4  # the replica that acknowledged: the first read
        end = time.monotonic() + 5
        while _seen(b, "nats-new") < 4:
            assert time.monotonic() < end, "replica B never saw replica A's events"
            time.sleep(0.002)
        assert _ids(_recommend(b, "nats-new")) == anonymous_with_events
        assert _ids(_recommend(a, "nats-new")) == anonymous_with_events

        # acknowledgement on A -> B's next GetUserProfile counting it, 50 times, both ways
        lags: dict[str, list[float]] = {"A->B": [], "B->A": []}
        for n in range(1, 51):
            for name, src, dst in (("A->B", a, b), ("B->A", b, a)):
                user = f"lag-{name}"
                _track(src, [{"customer_id": user, "product_id": items[0], "event_type": "view"}])
                t = time.perf_counter()
                while _seen(dst, user) < n:
                    assert time.perf_counter() - t < 5
                lags[name].append(time.perf_counter() - t)
        for name, got in lags.items():
            assert float(np.percentile(got, 99)) < 1.0, (name, max(got))
            assert _n_events(a, f"lag-{name}") == _n_events(b, f"lag-{name}") == 50
    finally:
        _close([a, b], readers)


def _stream_leader(log: NatsEventLog) -> str:
    info = log._call(log._js.stream_info(log.config.stream))
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


def test_a_nats_node_killed_during_track_events_loses_no_acknowledged_event(
    tmp_path: Path, parts: Any, index_dir: Path, segments: Any
) -> None:
    with LocalNatsCluster(tmp_path / "nats") as c:
        servers, readers = _replicas(
            parts,
            index_dir,
            segments,
            c.urls,
            nats_ack_timeout_s=1.0,
            nats_append_deadline_s=3.0,
            live_events_per_customer=100_000,
        )
        a, b = servers
        try:
            product = _items(a, 1)[0]
            acked: dict[str, tuple[int, int]] = {}
            lock = threading.Lock()
            stop = threading.Event()
            retries = [0]
            errors: list[BaseException] = []

            def client(k: int) -> None:
                n = 0
                try:
                    while not stop.is_set():
                        bid = f"w{k}-{n}"
                        batch = [
                            {
                                "customer_id": f"kill-c{(n + i) % 5}",
                                "product_id": product,
                                "event_type": "view",
                                "order_id": f"{bid}-{i}",
                            }
                            for i in range(50)
                        ]
                        while True:  # the shop's retry: the same batch id until acknowledged
                            try:
                                r = _track(a, batch, batch_id=bid, timeout=30)
                                break
                            except grpc.RpcError as e:
                                assert e.code() in (
                                    grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED,
                                ), e
                                retries[0] += 1
                        assert r.accepted == 50 and not r.errors
                        with lock:
                            acked[bid] = (r.first_position, r.last_position)
                        n += 1
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while len(acked) < 20 and time.monotonic() < deadline and not errors:
                time.sleep(0.01)
            with _stream_log(a) as probe:
                leader = _stream_leader(probe)
            victim = int(leader.removeprefix("n"))
            n_before = len(acked)
            c.kill(victim)  # the stream leader, while three clients write
            deadline = time.monotonic() + 90
            while len(acked) < n_before + 40 and time.monotonic() < deadline and not errors:
                time.sleep(0.01)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            assert not errors, errors
            assert len(acked) >= n_before + 40, "TrackEvents did not resume after the node died"

            # read back through the surviving nodes only: every acknowledged batch, once
            alive = tuple(u for i, u in enumerate(c.urls) if i != victim)
            with _stream_log(a, alive) as survivor:
                assert _stream_leader(survivor) != leader
                stored = list(survivor.read())
            by_batch: dict[str, list[Any]] = {}
            for s in stored:
                assert s.event.order_id is not None
                by_batch.setdefault(s.event.order_id.rsplit("-", 1)[0], []).append(s)
            for bid, (first, last) in acked.items():
                got = by_batch.get(bid)
                assert got is not None, f"acknowledged batch {bid} lost"
                assert sorted(s.event.order_id for s in got) == sorted(
                    f"{bid}-{i}" for i in range(50)
                ), bid
                assert (got[0].seq, got[-1].seq) == (first, last)
            # both replicas' live histories hold each stored event exactly once
            per_customer: dict[str, int] = {}
            for s in stored:
                per_customer[s.event.customer_id] = per_customer.get(s.event.customer_id, 0) + 1
            for served in (a, b):
                end = time.monotonic() + 10
                while {u: _seen(served, u) for u in per_customer} != per_customer:
                    assert time.monotonic() < end, (
                        {u: _seen(served, u) for u in per_customer},
                        per_customer,
                    )
                    time.sleep(0.05)
        finally:
            _close(servers, readers)


def test_forget_on_one_nats_replica_erases_the_stream_and_reaches_the_other(
    cluster: LocalNatsCluster, parts: Any, index_dir: Path, segments: Any, tmp_path: Path
) -> None:
    from indexing.base import IndexConfig
    from indexing.build import open_store
    from indexing.users import build_user_index, user_payloads

    data = tmp_path / "shop"
    parts.dataset.save(data)
    users_at = tmp_path / "user-index"  # stored user vectors of the first 40 customers
    uids = np.arange(1, 41)
    ext = [parts.dataset.users.to_external(int(u)) for u in uids]
    store = open_store(IndexConfig(location=str(users_at), full_scan_threshold_kb=1))
    try:
        vecs = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
        build_user_index(store, uids, vecs, user_payloads(uids, ext), model_version="m")
    finally:
        store.close()
    (a, b), readers = _replicas(
        parts,
        index_dir,
        segments,
        cluster.urls,
        admin_keys=("admin-key",),
        forget_dataset=str(data),
        forget_user_index=str(users_at),
    )
    try:
        user = a.engine.users.to_external(7)
        other = a.engine.users.to_external(8)
        before_b = _n_events(b, user)
        now = int(time.time()) - 5
        product = _items(a, 1)[0]
        _track(
            a, [{"customer_id": u, "product_id": product, "timestamp": now} for u in (user, other)]
        )
        end = time.monotonic() + 5
        while _n_events(b, user) < before_b + 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        stranger = _ids(_recommend(b, "never-seen-before"))
        assert _ids(_recommend(b, user)) != stranger
        resp = a.stub.ForgetCustomer(
            a.pb.ForgetCustomerRequest(customer_id=user),
            metadata=(("x-api-key", "admin-key"),),
            timeout=60,
        )
        assert resp.complete
        assert any("removed        1  events in the live log" in line for line in resp.receipt)
        assert any("removed        1  points in user collection" in x for x in resp.receipt)
        store = open_store(IndexConfig(location=str(users_at)))
        try:
            (live,) = store.versions("users")
            left = [
                p["external_id"]
                for _, _, pays in store.scroll_all(live.version, with_vectors=False)
                for p in pays
            ]
        finally:
            store.close()
        assert sorted(left) == sorted(e for e in ext if e != user)
        # the stream holds the other customer's event only
        with _stream_log(a) as log:
            assert [s.event.customer_id for s in log.read()] == [other]
        # replica B heard it: no profile, served as a stranger
        end = time.monotonic() + 5
        while True:
            try:
                _n_events(b, user)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                break
            assert time.monotonic() < end, "replica B still knows the forgotten customer"
            time.sleep(0.02)
        assert _ids(_recommend(b, user)) == stranger
        end = time.monotonic() + 5
        while _n_events(b, other) != _n_events(a, other):  # nobody else touched
            assert time.monotonic() < end
            time.sleep(0.02)
        assert _n_events(a, other) >= 1
    finally:
        _close([a, b], readers)


def test_the_nats_back_end_needs_servers() -> None:
    from ecomrec.errors import ConfigError
    from serving.config import ServeConfig

    with pytest.raises(ConfigError, match="nats_servers"):
        ServeConfig(event_backend="nats")


def test_a_service_whose_nats_is_down_fails_to_start_naming_the_servers() -> None:
    from intake.live_log import EventLogUnavailableError
    from serving.config import ServeConfig
    from serving.events import EventIntake

    cfg = ServeConfig(
        event_backend="nats", nats_servers=("nats://127.0.0.1:1",), nats_append_deadline_s=1.0
    )
    t = time.monotonic()
    with pytest.raises(EventLogUnavailableError, match=r"127\.0\.0\.1:1"):
        EventIntake.from_config(cfg)
    assert time.monotonic() - t < 10
