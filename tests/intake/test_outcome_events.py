"""Outcome events in the contract (docs/outcomes.md): ``impression`` and ``click`` are
accepted by the live log and ``data import`` with an optional ``recommendation_id``; the
towers' features do not change (a click is a view, an impression is no training event); a
log written before the new column opens and reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ecomrec.errors import DataError
from intake.live_log import LiveEvent, SqliteEventLog, validate_event
from intake.live_log_nats import decode_event, encode_event
from intake.loaders.contract import ContractOptions, load_contract
from intake.schema import EVENT_TYPE_IDS, EVENT_TYPES

NOW = 1_800_000_000


def test_the_towers_event_types_are_unchanged() -> None:
    # saved checkpoints embed these ids: outcome events must not add or move one
    assert EVENT_TYPES == ("view", "cart", "purchase", "return")
    assert EVENT_TYPE_IDS == {"view": 1, "cart": 2, "purchase": 3, "return": 4}


def test_live_validation_keeps_outcome_types_and_checks_the_id() -> None:
    base = {"customer_id": "c", "product_id": "p", "timestamp": NOW - 5}
    e = validate_event({**base, "event_type": "click", "recommendation_id": "rab12-3f"}, 0, NOW)
    assert (e.event_type, e.recommendation_id) == ("click", "rab12-3f")
    assert (
        validate_event({**base, "event_type": "view_item_list"}, 0, NOW).event_type == "impression"
    )
    assert (
        validate_event(
            {**base, "event_type": "view", "recommendation_id": ""}, 0, NOW
        ).recommendation_id
        is None
    )
    for bad in ("a b", "x" * 65, "é"):
        with pytest.raises(DataError, match="field 'recommendation_id'"):
            validate_event({**base, "recommendation_id": bad}, 3, NOW)
    with pytest.raises(DataError, match=r"field 'recommendation_id'.*not text"):
        validate_event({**base, "recommendation_id": 7}, 3, NOW)


def test_log_round_trips_the_id_and_opens_an_older_log(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, customer_id TEXT NOT NULL,"
        " product_id TEXT NOT NULL, event_type TEXT NOT NULL, ts INTEGER NOT NULL, quantity"
        " INTEGER NOT NULL, price REAL, order_id TEXT, session_id TEXT);"
        "INSERT INTO events (customer_id, product_id, event_type, ts, quantity) "
        "VALUES ('c0', 'p0', 'view', 1700000000, 1);"
    )
    conn.commit()
    conn.close()
    with SqliteEventLog(old) as log:
        log.append([LiveEvent("c1", "p1", "click", NOW, recommendation_id="r1-a")])
        got = [(s.event.customer_id, s.event.recommendation_id) for s in log.read()]
    assert got == [("c0", None), ("c1", "r1-a")]


def test_nats_payload_keeps_older_writers_readable() -> None:
    plain = LiveEvent("c", "p", "view", NOW)
    assert encode_event(plain).count(b",") == 7  # the eight-field array as before
    assert decode_event(encode_event(plain)) == plain
    tagged = LiveEvent("c", "p", "click", NOW, 1, 2.5, "o", "s", "r9-x")
    assert decode_event(encode_event(tagged)) == tagged


def test_data_import_reads_clicks_as_views_and_leaves_impressions_out(tmp_path: Path) -> None:
    ev = tmp_path / "ev.csv"
    ev.write_text(
        "customer_id,product_id,timestamp,event_type,recommendation_id\n"
        "c1,p1,2024-01-01T10:00:00Z,impression,r1-1\n"
        "c1,p1,2024-01-01T10:00:05Z,click,r1-1\n"
        "c1,p2,2024-01-01T10:00:06Z,view,\n"
        "c1,p1,2024-01-01T10:01:00Z,purchase,r1-1\n"
        "c2,p2,2024-01-02T10:00:00Z,Impressions,\n"
    )
    ds = load_contract(ev, None, ContractOptions(now=NOW))
    assert ds.events.sort("ts")["event_type"].to_list() == ["view", "view", "purchase"]
    assert ds.report.dropped == {
        "impression (an outcome event: kept for attribution, not a training event)": 2
    }
    assert ds.users.external_ids == ["c1"]
    bad = tmp_path / "bad.csv"
    bad.write_text("customer_id,product_id,timestamp,event_type\nc1,p1,2024-01-01,teleport\n")
    with pytest.raises(DataError, match="impression, click"):
        load_contract(bad, None, ContractOptions(now=NOW))
