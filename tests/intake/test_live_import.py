"""The loop closes: events sent through the live log and imported with import_with_live
give the same dataset (same fingerprint) as the same events imported from a file, on both
log back ends; the consumed position is recorded and the next import reads after it."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from ecomrec.errors import ConfigError
from intake.dataset import Dataset
from intake.live_import import consumed_position, export_live_part, import_with_live
from intake.live_log import EventLog, LiveEvent, SqliteEventLog
from intake.live_log_nats import NatsEventLog, NatsLogConfig
from intake.loaders.contract import load_contract

T0 = 1_700_000_000


def _events(n: int, seed: int = 5) -> list[LiveEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = rng.choice(["view", "view", "cart", "purchase", "return"])
        out.append(
            LiveEvent(
                customer_id=f"cust {rng.randint(0, 19)}",  # a space: ids kept as written
                product_id=f"P{rng.randint(0, 29):03d}",
                event_type=t,
                ts=T0 + (i // 2) * 600,  # pairs share a time: source order breaks ties
                quantity=rng.randint(1, 3) if t in ("purchase", "return") else 1,
                price=round(rng.uniform(1, 50), 2) if t != "view" else None,
                order_id=f"o{i // 3}" if t in ("purchase", "return") else None,
                session_id=f"s{i // 10}",
            )
        )
    out.append(out[0])  # an exact duplicate view: both paths must drop it the same way
    return out


def _csv(events: list[LiveEvent], path: Path) -> Path:
    """The same events as a shop's CSV export: ISO timestamps with an offset, text cells."""
    rows = {
        "customer_id": [e.customer_id for e in events],
        "product_id": [e.product_id for e in events],
        "event_type": [e.event_type for e in events],
        "timestamp": [
            dt.datetime.fromtimestamp(e.ts, dt.timezone(dt.timedelta(hours=1))).isoformat()
            for e in events
        ],
        "quantity": [e.quantity for e in events],
        "price": [e.price for e in events],
        "order_id": [e.order_id for e in events],
        "session_id": [e.session_id for e in events],
    }
    pl.DataFrame(rows).write_csv(path)
    return path


@pytest.fixture(params=["sqlite", "nats"])
def event_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    log: EventLog
    if request.param == "sqlite":
        log = SqliteEventLog(tmp_path / "log.db")
    else:
        c = request.getfixturevalue("cluster")
        stream = f"I{uuid.uuid4().hex[:12]}"
        log = NatsEventLog(
            NatsLogConfig(servers=tuple(c.urls), stream=stream, subject_prefix=stream)
        )
    yield log
    log.close()


def test_events_through_the_log_give_the_file_import_fingerprint(
    event_log: EventLog, tmp_path: Path
) -> None:
    events = _events(300)
    from_file = load_contract(_csv(events, tmp_path / "all.csv"))
    # the history (first 200 events) is a Parquet part; the rest arrive through the log
    history = tmp_path / "history"
    history.mkdir()
    hist = load_contract(_csv(events[:200], tmp_path / "h.csv"))
    assert hist.fingerprint()["id"] != from_file.fingerprint()["id"]
    pl.read_csv(tmp_path / "h.csv", infer_schema=False).write_parquet(
        history / "000-history.parquet"
    )
    out = tmp_path / "shop"
    a1 = event_log.append(events[200:260], batch_id="b1")
    ds1, part1 = import_with_live(event_log, history, out)
    assert (part1.after, part1.position, part1.events) == (0, a1.last_seq, 60)
    assert consumed_position(out) == a1.last_seq
    assert ds1.events.height < from_file.events.height
    # more events; the next import reads only after the recorded position
    a2 = event_log.append(events[260:], batch_id="b2")
    ds2, part2 = import_with_live(event_log, history, out)
    assert (part2.after, part2.position, part2.events) == (a1.last_seq, a2.last_seq, 41)
    saved = Dataset.load(out)
    lineage = saved.extra["live_log"]
    assert isinstance(lineage, dict) and lineage["position"] == a2.last_seq
    assert saved.fingerprint() == from_file.fingerprint() == ds2.fingerprint()
    assert saved.report.dropped == from_file.report.dropped  # the duplicate view, both ways
    # nothing new: the same dataset, the position unchanged
    ds3, part3 = import_with_live(event_log, history, out)
    assert part3.events == 0 and part3.path is None
    assert ds3.fingerprint()["id"] == from_file.fingerprint()["id"]


def test_a_part_written_but_never_recorded_is_not_imported_twice(tmp_path: Path) -> None:
    events = _events(120)
    from_file = load_contract(_csv(events, tmp_path / "all.csv"))
    history = tmp_path / "history"
    with SqliteEventLog(tmp_path / "log.db") as log:
        log.append(events[:80])
        # a refresh exported a part, then died before saving the dataset
        stale = export_live_part(log, history, after=0)
        assert stale.path is not None and stale.path.exists()
        log.append(events[80:])
        ds, part = import_with_live(log, history, tmp_path / "shop")
        assert not stale.path.exists() and part.events == len(events)
        assert ds.fingerprint()["id"] == from_file.fingerprint()["id"]


def test_a_history_file_instead_of_a_folder_is_refused(tmp_path: Path) -> None:
    with SqliteEventLog(tmp_path / "log.db") as log:
        f = _csv(_events(5), tmp_path / "h.csv")
        with pytest.raises(ConfigError, match=r"folder of \.parquet"):
            import_with_live(log, f, tmp_path / "shop")


def test_the_import_live_command_gives_the_file_fingerprint(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    events = _events(150)
    from_file = load_contract(_csv(events, tmp_path / "all.csv"))
    history = tmp_path / "history"
    history.mkdir()
    _csv(events[:100], tmp_path / "h.csv")
    pl.read_csv(tmp_path / "h.csv", infer_schema=False).write_parquet(
        history / "000-history.parquet"
    )
    with SqliteEventLog(tmp_path / "log.db") as log:
        ack = log.append(events[100:])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "ecomrec",
        "data",
        "import-live",
        "--log",
        str(tmp_path / "log.db"),
    ]
    cmd += ["--events", str(history), "--out", str(tmp_path / "shop"), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["position"] == ack.last_seq and out["live_events"] == 51
    assert out["fingerprint"] == from_file.fingerprint()
    missing = subprocess.run(
        [*cmd[:6], str(tmp_path / "nope.db"), *cmd[7:]], capture_output=True, text=True, env=env
    )
    assert missing.returncode != 0 and "nope.db" in missing.stderr
    assert "Traceback" not in missing.stderr
