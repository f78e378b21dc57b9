"""Online outcomes over a real gRPC server: every answer carries a recommendation id; a
click carrying it (TrackEvents) is counted for that model version by ``report online`` and
on /metrics; bad ids and event types are named; impressions never reach the towers and a
click is read as a view."""

from __future__ import annotations

import datetime as dt
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from intake.live_log import SqliteEventLog
from outcomes.report import online_report
from outcomes.served_log import read_served
from tests.serving.conftest import Served, make_engine, open_reader, wait_for


@pytest.fixture()
def live(parts: Any, index_dir: Path, segments: Any, tmp_path: Path) -> Iterator[Served]:
    reader = open_reader(index_dir)
    s = Served(
        make_engine(
            parts,
            reader,
            segments,
            event_log=str(tmp_path / "events.db"),
            served_log_flush_s=0.05,
            admin_keys=("admin-key",),
        ),
        metrics_port=0,
    )
    yield s
    s.close()
    reader.close()


def _track(served: Served, events: list[dict[str, Any]]) -> Any:
    pb = served.pb
    return served.call(
        "TrackEvents", pb.TrackEventsRequest(events=[pb.TrackedEvent(**e) for e in events])
    )


def _metric(served: Served, line_start: str) -> float:
    port = served.handle.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_click_carrying_the_id_is_counted_for_its_model_version(live: Served) -> None:
    pb = live.pb
    user = live.engine.users.to_external(3)
    a = live.call("Recommend", pb.RecommendRequest(user_id=user, k=5))
    b = live.call("Recommend", pb.RecommendRequest(user_id=user, k=5))
    assert (
        a.recommendation_id and b.recommendation_id and a.recommendation_id != b.recommendation_id
    )
    assert a.variant == "default" and a.model_version
    item = a.items[1].item_id
    now = int(time.time())
    resp = _track(
        live,
        [
            {
                "customer_id": user,
                "product_id": a.items[0].item_id,
                "event_type": "impression",
                "timestamp": now,
                "recommendation_id": a.recommendation_id,
            },
            {
                "customer_id": user,
                "product_id": item,
                "event_type": "click",
                "timestamp": now,
                "recommendation_id": a.recommendation_id,
            },
            {
                "customer_id": user,
                "product_id": item,
                "event_type": "purchase",
                "timestamp": now,
                "price": 12.5,
                "quantity": 2,
                "recommendation_id": a.recommendation_id,
            },
        ],
    )
    assert resp.accepted == 3 and not resp.errors
    # the served log holds both answers, with their items in rank order
    assert wait_for(lambda: len(list(read_served(live.cfg.event_log))) >= 2)
    served = {s.recommendation_id: s for s in read_served(live.cfg.event_log)}
    assert served[a.recommendation_id].items == tuple(i.item_id for i in a.items)
    assert served[a.recommendation_id].customer_id == user
    # the report counts the click for that model version (the id won over b, the later
    # answer holding the same items)
    rep = online_report(live.cfg.event_log, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    (row,) = rep["variants"]
    assert (row["variant"], row["model_version"]) == ("default", a.model_version)
    assert (row["recommendations"], row["impressions"], row["clicks"], row["purchases"]) == (
        2,
        1,
        1,
        1,
    )
    assert row["revenue"] == pytest.approx(25.0)
    assert rep["attribution"]["by_id"] == 3
    # and the live counters on /metrics
    labels = f'model_version="{a.model_version}",variant="default"'
    assert _metric(live, f'ecomrec_attributed_events_total{{event_type="click",{labels}}}') == 1
    assert _metric(live, f"ecomrec_attributed_revenue_total{{{labels}}}") == 25.0
    assert (
        _metric(live, f'ecomrec_recommendations_served_total{{method="Recommend",{labels}}}') == 2
    )


def test_every_answer_kind_carries_an_id(live: Served) -> None:
    pb = live.pb
    users = [live.engine.users.to_external(i) for i in (1, 2, 3)]
    batch = list(
        live.stub.RecommendBatch(
            pb.RecommendBatchRequest(requests=[pb.RecommendRequest(user_id=u, k=3) for u in users]),
            metadata=live.md,
            timeout=10,
        )
    )
    ids = [it.response.recommendation_id for it in batch]
    item = batch[0].response.items[0].item_id
    sim = live.call("SimilarItems", pb.SimilarItemsRequest(item_id=item, k=3))
    ids.append(sim.recommendation_id)
    assert all(ids) and len(set(ids)) == 4
    assert wait_for(lambda: len(list(read_served(live.cfg.event_log))) == 4)
    got = {s.recommendation_id: s for s in read_served(live.cfg.event_log)}
    assert [got[i].method for i in ids] == ["RecommendBatch"] * 3 + ["SimilarItems"]
    assert [got[i].customer_id for i in ids] == [*users, ""]
    # a click without an id on a batch answer's item is found by the window rule
    now = int(time.time())
    _track(
        live,
        [{"customer_id": users[0], "product_id": item, "event_type": "click", "timestamp": now}],
    )
    rep = online_report(live.cfg.event_log, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert rep["attribution"]["by_window"] == 1 and rep["variants"][0]["clicks"] == 1


def test_bad_ids_and_event_types_are_named(live: Served) -> None:
    now = int(time.time())
    item = live.engine.catalog.external_ids[1]
    resp = _track(
        live,
        [
            {
                "customer_id": "c",
                "product_id": item,
                "event_type": "click",
                "timestamp": now,
                "recommendation_id": "not an id!",
            },
            {
                "customer_id": "c",
                "product_id": item,
                "event_type": "clicked-twice",
                "timestamp": now,
            },
            {
                "customer_id": "c",
                "product_id": item,
                "event_type": "click",
                "timestamp": now,
                "recommendation_id": "r" * 65,
            },
            {"customer_id": "c", "product_id": item, "event_type": "impression", "timestamp": now},
        ],
    )
    assert resp.accepted == 1
    assert [(e.index, e.field) for e in resp.errors] == [
        (0, "recommendation_id"),
        (1, "event_type"),
        (2, "recommendation_id"),
    ]
    assert "impression, click" in next(e.message for e in resp.errors if e.field == "event_type")


def test_impressions_are_not_behaviour_and_a_click_is_a_view(live: Served) -> None:
    pb = live.pb
    now = int(time.time()) - 30
    items = [live.engine.catalog.external_ids[i] for i in (30, 31, 32)]
    _track(
        live,
        [
            {
                "customer_id": "fresh-1",
                "product_id": i,
                "event_type": "impression",
                "timestamp": now,
            }
            for i in items
        ],
    )
    with pytest.raises(grpc.RpcError) as err:  # shown is not done: still a stranger
        live.call("GetUserProfile", pb.GetUserProfileRequest(user_id="fresh-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    _track(
        live,
        [
            {"customer_id": "fresh-2", "product_id": i, "event_type": "click", "timestamp": now + k}
            for k, i in enumerate(items)
        ],
    )
    _track(
        live,
        [
            {"customer_id": "fresh-3", "product_id": i, "event_type": "view", "timestamp": now + k}
            for k, i in enumerate(items)
        ],
    )
    clicked = live.call("Recommend", pb.RecommendRequest(user_id="fresh-2", k=10))
    viewed = live.call("Recommend", pb.RecommendRequest(user_id="fresh-3", k=10))
    assert [i.item_id for i in clicked.items] == [i.item_id for i in viewed.items]
    # the log keeps the types apart (attribution needs them)
    with SqliteEventLog(live.cfg.event_log) as log:
        types = [s.event.event_type for s in log.read()]
    assert types.count("impression") == 3 and types.count("click") == 3


def test_forget_customer_removes_served_answers(live: Served) -> None:
    pb = live.pb
    user = live.engine.users.to_external(4)
    live.call("Recommend", pb.RecommendRequest(user_id=user, k=3))
    resp = live.stub.ForgetCustomer(
        pb.ForgetCustomerRequest(customer_id=user),
        metadata=(("x-api-key", "admin-key"),),
        timeout=60,
    )
    assert any("served-recommendation log" in line and " 1 " in line for line in resp.receipt)
    assert [s for s in read_served(live.cfg.event_log) if s.customer_id == user] == []
    for f in Path(live.cfg.event_log).parent.glob("events.db*"):
        assert user.encode() not in f.read_bytes(), f
