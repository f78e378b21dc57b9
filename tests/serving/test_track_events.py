"""TrackEvents over a real gRPC server: per-event errors, durable acknowledgement, the next
Recommend / GetUserProfile sees the events (also for customers the dataset does not know),
idempotent retries, replay after a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from intake.live_log import SqliteEventLog
from tests.serving.conftest import Served, make_engine, open_reader


@pytest.fixture()
def live(parts: Any, index_dir: Path, segments: Any, tmp_path: Path) -> Iterator[Served]:
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader, segments, event_log=str(tmp_path / "events.db")))
    yield s
    s.close()
    reader.close()


def _items(served: Served, n: int, start: int = 0) -> list[str]:
    return [served.engine.catalog.external_ids[i] for i in range(1 + start, 1 + start + n)]


def _track(served: Served, events: list[dict[str, Any]], batch_id: str = "") -> Any:
    pb = served.pb
    return served.call(
        "TrackEvents",
        pb.TrackEventsRequest(batch_id=batch_id, events=[pb.TrackedEvent(**e) for e in events]),
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


def _ids(resp: Any) -> list[str]:
    return [i.item_id for i in resp.items]


def test_bad_events_are_named_and_good_ones_land(live: Served) -> None:
    now = int(time.time())
    items = _items(live, 3)
    resp = _track(
        live,
        [
            {"customer_id": "c-1", "product_id": items[0], "event_type": "view", "timestamp": now},
            {"customer_id": "c-1", "product_id": items[1], "event_type": "teleport"},
            {"customer_id": "", "product_id": items[1]},
            {"customer_id": "c-1", "product_id": items[2], "event_type": "add_to_cart"},
        ],
    )
    assert resp.accepted == 2
    assert [(e.index, e.field) for e in resp.errors] == [(1, "event_type"), (2, "customer_id")]
    assert "teleport" in resp.errors[0].message
    assert (resp.first_position, resp.last_position) == (1, 2)
    # durable: the log file holds exactly the accepted events
    log = SqliteEventLog(live.cfg.event_log)
    try:
        got = [(s.event.product_id, s.event.event_type) for s in log.read()]
    finally:
        log.close()
    assert got == [(items[0], "view"), (items[2], "cart")]


def test_next_recommend_of_a_new_customer_equals_sending_the_events_with_it(
    live: Served,
) -> None:
    now = int(time.time()) - 100
    items = _items(live, 4, start=20)
    events = [(items[i], "view", now + i) for i in range(4)]
    cold = _recommend(live, "brand-new-customer")
    anonymous_with_events = _recommend(live, "", list(events))
    assert _ids(cold) != _ids(anonymous_with_events)  # the events change the answer
    resp = _track(
        live,
        [
            {"customer_id": "brand-new-customer", "product_id": i, "event_type": t, "timestamp": ts}
            for i, t, ts in events
        ],
    )
    assert resp.accepted == 4
    after = _recommend(live, "brand-new-customer")
    assert _ids(after) == _ids(anonymous_with_events)
    np.testing.assert_allclose(
        [i.score for i in after.items], [i.score for i in anonymous_with_events.items], atol=1e-5
    )
    prof = live.call("GetUserProfile", live.pb.GetUserProfileRequest(user_id="brand-new-customer"))
    assert prof.n_events == 4


def test_known_customer_live_events_equal_request_events(live: Served) -> None:
    user = live.engine.users.to_external(5)
    before = live.call("GetUserProfile", live.pb.GetUserProfileRequest(user_id=user)).n_events
    now = int(time.time()) - 50
    items = _items(live, 3, start=40)
    events = [(items[i], "cart", now + i) for i in range(3)]
    expected = _recommend(live, user, list(events))
    _track(
        live,
        [
            {"customer_id": user, "product_id": i, "event_type": t, "timestamp": ts}
            for i, t, ts in events
        ],
    )
    assert _ids(_recommend(live, user)) == _ids(expected)
    # the same events sent again with the request count once
    assert _ids(_recommend(live, user, list(events))) == _ids(expected)
    after = live.call("GetUserProfile", live.pb.GetUserProfileRequest(user_id=user)).n_events
    assert after == before + 3


@pytest.mark.slow  # a second server / 50 round trips
def test_retry_with_a_batch_id_is_written_once_and_restart_replays(
    live: Served, parts: Any, index_dir: Path, segments: Any
) -> None:
    now = int(time.time()) - 10
    items = _items(live, 2, start=60)
    batch = [
        {
            "customer_id": "retry-cust",
            "product_id": items[0],
            "event_type": "view",
            "timestamp": now,
        },
        {
            "customer_id": "retry-cust",
            "product_id": items[1],
            "event_type": "view",
            "timestamp": now + 1,
        },
    ]
    first = _track(live, batch, batch_id="b-1")
    again = _track(live, batch, batch_id="b-1")
    assert not first.replayed and again.replayed
    assert (again.first_position, again.last_position) == (
        first.first_position,
        first.last_position,
    )
    answer = _ids(_recommend(live, "retry-cust"))
    path = live.cfg.event_log
    live.close()
    # a new server on the same log: the live history is replayed from it
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader, segments, event_log=path))
    try:
        assert _ids(_recommend(s, "retry-cust")) == answer
        prof = s.call("GetUserProfile", s.pb.GetUserProfileRequest(user_id="retry-cust"))
        assert prof.n_events == 2
    finally:
        s.close()
        reader.close()


def test_auth_limits_and_no_event_log(live: Served, served: Served) -> None:
    pb = live.pb
    with pytest.raises(grpc.RpcError) as e:
        live.stub.TrackEvents(pb.TrackEventsRequest(), timeout=5)  # no key
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    too_many = [{"customer_id": "c", "product_id": "p"}] * 1001
    with pytest.raises(grpc.RpcError) as e:
        _track(live, too_many)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in (e.value.details() or "")
    with pytest.raises(grpc.RpcError) as e:
        _track(served, [{"customer_id": "c", "product_id": "p"}])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow  # a second server / 50 round trips
def test_acknowledged_events_reach_the_next_request_within_a_second(live: Served) -> None:
    """p99 of acknowledgement -> the customer's next GetUserProfile counting the event."""
    items = _items(live, 1)
    lags = []
    for n in range(1, 51):
        _track(live, [{"customer_id": "lag-cust", "product_id": items[0], "event_type": "view"}])
        t = time.perf_counter()
        while (
            live.call("GetUserProfile", live.pb.GetUserProfileRequest(user_id="lag-cust")).n_events
            < n
        ):
            assert time.perf_counter() - t < 5
        lags.append(time.perf_counter() - t)
    assert float(np.percentile(lags, 99)) < 1.0


@pytest.mark.slow  # a second server / 50 round trips
def test_forget_customer_rpc_needs_an_admin_key_and_forgets(
    parts: Any, index_dir: Path, segments: Any, tmp_path: Path
) -> None:
    from intake.dataset import Dataset

    data = tmp_path / "shop"
    parts.dataset.save(data)
    reader = open_reader(index_dir)
    s = Served(
        make_engine(
            parts,
            reader,
            segments,
            event_log=str(tmp_path / "events.db"),
            admin_keys=("admin-key",),
            forget_dataset=str(data),
        )
    )
    try:
        user = s.engine.users.to_external(7)
        now = int(time.time()) - 5
        _track(s, [{"customer_id": user, "product_id": _items(s, 1)[0], "timestamp": now}])
        known = _ids(_recommend(s, user))
        stranger = _ids(_recommend(s, "never-seen-before"))
        assert known != stranger
        req = s.pb.ForgetCustomerRequest(customer_id=user)
        with pytest.raises(grpc.RpcError) as e:
            s.call("ForgetCustomer", req)  # an ordinary API key
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        resp = s.stub.ForgetCustomer(req, metadata=(("x-api-key", "admin-key"),), timeout=60)
        assert resp.complete
        assert any("events in the live log" in line for line in resp.receipt)
        assert all(user not in line for line in resp.receipt)
        # served as a stranger from now on; no profile; gone from the dataset folder
        assert _ids(_recommend(s, user)) == stranger
        with pytest.raises(grpc.RpcError) as e:
            s.call("GetUserProfile", s.pb.GetUserProfileRequest(user_id=user))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert Dataset.load(data).users.get(user) is None
        log = SqliteEventLog(s.cfg.event_log)
        try:
            assert [e.event.customer_id for e in log.read()] == []
        finally:
            log.close()
    finally:
        s.close()
        reader.close()
