"""Churn warnings in real time: a planted shop through the watcher, idempotence, the command."""

from __future__ import annotations

import itertools
import json

import numpy as np
import polars as pl
import pytest

from intake.dataset import Dataset, IdMap
from intake.live_log import LiveEvent, SqliteEventLog, StoredEvent
from intake.schema import DropReport
from segments.alerts import (
    AlertConfig,
    AlertModel,
    ChurnWarning,
    DeliveryError,
    JsonlSink,
    Watcher,
    read_warnings,
    reasons_for,
)
from segments.churn import ChurnConfig

DAY = 86400
T0 = 1_600_000_000 - 1_600_000_000 % DAY
CUT_DAY = 300  # the model's cutoff: the dataset holds the days before it
H = 60  # churn horizon of the test


def _shop(seed: int = 0) -> list[tuple[str, str, int, float]]:
    """(customer, product, ts, price) purchases over 400 days.

    r*: regular weekly-ish buyers throughout; h*: regulars who stopped at a day in
    [60, 250] (what the model learns churn from); s*: planted, regular until day 310 then
    stop; f*: weekly until day 250, then one purchase every 24 days (frequency halves).
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, int, float]] = []

    def buyer(name: str, start: float, stop: float, gap: tuple[int, int], late_gap=None):
        t = start
        while t < stop:
            rows.append((name, f"p{int(rng.integers(1, 40))}", T0 + int(t * DAY), 10.0))
            g = late_gap if late_gap is not None and t >= 250 else rng.integers(*gap)
            t += float(g) + float(rng.uniform(0, 0.5))

    for i in range(150):
        buyer(f"r{i}", rng.uniform(0, 20), 400, (5, 8))
    for i in range(120):
        buyer(f"h{i}", rng.uniform(0, 20), rng.uniform(60, 250), (5, 8))
    for i in range(20):
        buyer(f"s{i}", rng.uniform(0, 20), 310, (5, 8))
    for i in range(5):
        buyer(f"f{i}", rng.uniform(0, 6), 400, (6, 8), late_gap=24)
    rows.sort(key=lambda r: r[2])
    return rows


def _dataset(rows: list[tuple[str, str, int, float]]) -> Dataset:
    users = IdMap(sorted({r[0] for r in rows}))
    items = IdMap(sorted({r[1] for r in rows}))
    ev = pl.DataFrame(
        {
            "user_id": [users.to_internal(r[0]) for r in rows],
            "item_id": [items.to_internal(r[1]) for r in rows],
            "ts": [r[2] for r in rows],
            "event_type": ["purchase"] * len(rows),
            "quantity": [1] * len(rows),
            "price": [r[3] for r in rows],
            "order": list(range(len(rows))),
        }
    )
    cat = pl.DataFrame(
        {"item_id": list(range(1, len(items) + 1)), "external_id": items.external_ids}
    )
    return Dataset("planted", ev, cat, users, items, DropReport("planted"))


def _live(rows: list[tuple[str, str, int, float]]) -> list[LiveEvent]:
    return [LiveEvent(c, p, "purchase", ts, 1, price) for c, p, ts, price in rows]


@pytest.fixture(scope="module")
def planted():
    rows = _shop()
    cut = T0 + CUT_DAY * DAY
    ds = _dataset([r for r in rows if r[2] < cut])
    live = [r for r in rows if r[2] >= cut]
    model = AlertModel.fit(ds.events, ds.items, cut, ChurnConfig(horizon_days=H), AlertConfig())
    return ds, live, model


def _run_days(w: Watcher, live, first_day: int, last_day: int, seq0: int = 0):
    """Feed the live purchases day by day as stored log events, tick at each day's end."""
    stored = [StoredEvent(seq0 + i + 1, e) for i, e in enumerate(_live(live))]
    out = []
    for day in range(first_day, last_day):
        end = T0 + (day + 1) * DAY
        w.ingest(s for s in stored if s.event.ts < end)
        out += w.tick(end)
    return out, stored


@pytest.mark.slow  # fits the model on the planted shop (seconds)
def test_planted_stoppers_warned_with_recency_regulars_not(planted, tmp_path):
    ds, live, model = planted
    sink = tmp_path / "churn.jsonl"
    w = Watcher(model, ds, AlertConfig(), [JsonlSink(sink)])
    got, _ = _run_days(w, live, CUT_DAY, 370)
    warned: dict[str, ChurnWarning] = {}
    for x in got:
        warned.setdefault(x.customer_id, x)  # the first warning of each
    stoppers = {f"s{i}" for i in range(20)}
    assert stoppers <= set(warned), sorted(stoppers - set(warned))
    assert not [c for c in warned if c.startswith("r")], sorted(warned)
    for c in stoppers:
        x = warned[c]
        assert x.risk >= 0.7
        assert "recency" in [r.kind for r in x.reasons]
        # warned after they stopped (day 310) and within 5 weeks of it
        assert T0 + 310 * DAY < x.ts <= T0 + 345 * DAY
    # the halving customers: warned, and the drop is named
    for c in (f"f{i}" for i in range(5)):
        assert c in warned, c
        assert "frequency_drop" in [r.kind for r in warned[c].reasons], warned[c]
    # once per crossing: a customer who never bought again is warned once; the halving
    # ones buy every 24 days (re-armed each time), so again only after the 30-day cool-down
    back = read_warnings(sink)
    assert len(back) == len(got)
    assert {b["customer_id"] for b in back} == set(warned)
    times: dict[str, list[int]] = {}
    for x in got:
        times.setdefault(x.customer_id, []).append(x.ts)
    for c, ts in times.items():
        if not c.startswith("f"):
            assert len(ts) == 1, (c, ts)
        assert all(b - a >= 30 * DAY for a, b in itertools.pairwise(ts)), (c, ts)
    assert max(len(ts) for c, ts in times.items() if c.startswith("f")) >= 2


def test_reasons_planted_rows():
    cfg = AlertConfig()
    row = {
        "recency_days": 30.0,
        "frequency": 20,
        "mean_gap_days": 7.0,
        "recent_purchases": 1.0,
        "tenure_days": 200.0,
        "rfm_segment": "At Risk",
    }
    kinds = {r.kind: r.text for r in reasons_for(row, "Champions", cfg)}
    assert kinds["recency"] == "no purchase for 30 days (usual gap 7)"
    # 19 purchases over 144 days before the last 8 weeks = 7.4 expected in 8 weeks; 1 seen
    assert kinds["frequency_drop"] == "1 purchase(s) in the last 8 weeks vs 7.4 per 8 weeks before"
    assert kinds["segment_move"] == "RFM segment Champions -> At Risk"
    steady = {**row, "recency_days": 3.0, "recent_purchases": 8.0, "rfm_segment": "Champions"}
    assert [r.text for r in reasons_for(steady, "Champions", cfg)] == [
        "no purchase for 3 days (usual gap 7); risky purchase pattern"  # the fallback
    ]
    # a move UP the segments (a lapsed customer bought once) is no reason to warn
    back = {**steady, "rfm_segment": "Potential Loyalists"}
    assert [r.kind for r in reasons_for(back, "Hibernating", cfg)] == ["recency"]


@pytest.mark.slow  # fits the model on the planted shop (seconds)
def test_idempotent_replay_and_restore(planted, tmp_path):
    ds, live, model = planted
    sink = tmp_path / "churn.jsonl"
    w = Watcher(model, ds, AlertConfig(), [JsonlSink(sink)])
    got, stored = _run_days(w, live, CUT_DAY, 340)
    assert got
    n = len(read_warnings(sink))
    end = T0 + 340 * DAY
    seen = [s for s in stored if s.event.ts < end]
    # the same events again, same clock: nothing new
    assert w.ingest(seen) == 0
    assert w.tick(end) == []
    # a new watcher from the saved state, reading the log from the start, the same
    w2 = Watcher(model, ds, AlertConfig(), [JsonlSink(sink)])
    w2.restore(w.state_dict())
    w2.ingest(seen)
    assert w2.tick(end) == []
    # and one without the state but told what the sink holds (a crash before the state write)
    w3 = Watcher(model, ds, AlertConfig(), [JsonlSink(sink)])
    w3.note_published(read_warnings(sink))
    w3.ingest(seen)
    assert w3.tick(end) == []
    assert len(read_warnings(sink)) == n


class _FlakySink:
    """A second sink that fails its first ``fails`` calls (a webhook down), then records."""

    def __init__(self, fails: int) -> None:
        self.fails = fails
        self.got: list[ChurnWarning] = []

    def publish(self, warnings: list[ChurnWarning]) -> None:
        if self.fails > 0:
            self.fails -= 1
            raise DeliveryError("down")
        self.got.extend(warnings)


@pytest.mark.slow  # fits the model on the planted shop (seconds)
def test_failed_delivery_kept_and_retried_through_the_state(planted, tmp_path):
    ds, live, model = planted
    sink = tmp_path / "churn.jsonl"
    flaky = _FlakySink(fails=1000)
    w = Watcher(model, ds, AlertConfig(), [JsonlSink(sink), flaky])
    _, stored = _run_days(w, live, CUT_DAY, 330)
    assert read_warnings(sink) and not flaky.got  # the record has them, the webhook not
    assert len(w.outbox) == len(read_warnings(sink))
    # a new process from the saved state (outbox included), the webhook back up
    back = _FlakySink(fails=0)
    w2 = Watcher(model, ds, AlertConfig(), [JsonlSink(sink), back])
    w2.restore(json.loads(json.dumps(w.state_dict())))
    end = T0 + 330 * DAY
    w2.ingest(s for s in stored if s.event.ts < end)
    assert w2.tick(end) == []  # nothing new ...
    assert not w2.outbox  # ... but the outbox was delivered, once, in order
    assert [x.to_dict() for x in back.got] == [x.to_dict() for x in w.outbox]
    assert sorted(x["customer_id"] for x in read_warnings(sink)) == sorted(
        x.customer_id for x in back.got
    )


@pytest.mark.slow  # fits the model on the planted shop (seconds)
def test_watch_once_command_over_sqlite_log(planted, tmp_path, capsys):
    from ecomrec.cli import main

    ds, live, _ = planted
    ds.save(tmp_path / "shop")
    log_path = tmp_path / "events.db"
    sink = tmp_path / "out" / "churn.jsonl"
    model = tmp_path / "alert_model.pkl"
    lv = _live([r for r in live if r[2] < T0 + 330 * DAY])
    with SqliteEventLog(log_path) as el:
        for i in range(0, len(lv), 500):
            el.append(lv[i : i + 500])
    argv = [
        "churn",
        "watch",
        "--event-log",
        str(log_path),
        "--dataset",
        str(tmp_path / "shop"),
        "--model",
        str(model),
        "--sink",
        str(sink),
        "--clock",
        "events",
        "--set",
        f"churn.horizon_days={H}",
        "--once",
    ]
    assert main(argv) == 0
    first = read_warnings(sink)
    assert model.is_file()
    assert {w["customer_id"] for w in first} >= {f"s{i}" for i in range(20)}
    assert not [w for w in first if w["customer_id"].startswith("r")]
    assert "warning(s)" in capsys.readouterr().out
    # cron runs it again with nothing new: nothing new published
    assert main(argv) == 0
    assert read_warnings(sink) == first


@pytest.mark.slow  # a real `ecomrec churn watch` process following the log (seconds)
def test_watch_follows_the_log_until_sigterm(planted, tmp_path):
    """The command as a process: events appended while it runs are read, the stoppers are
    warned, SIGTERM ends it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ds, live, _ = planted
    ds.save(tmp_path / "shop")
    log_path = tmp_path / "events.db"
    sink = tmp_path / "churn.jsonl"
    SqliteEventLog(log_path).close()  # an empty log: the watcher starts before any event
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "ecomrec", "churn", "watch", "--event-log", str(log_path)]
    cmd += ["--dataset", str(tmp_path / "shop"), "--sink", str(sink), "--clock", "events"]
    cmd += ["--set", f"churn.horizon_days={H}", "--poll-s", "0.2"]
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the model is fitted and the state read
        assert line.startswith("churn watch: following from log position 0"), line
        lv = _live([r for r in live if r[2] < T0 + 330 * DAY])
        with SqliteEventLog(log_path) as el:
            for i in range(0, len(lv), 200):
                el.append(lv[i : i + 200])
        want = {f"s{i}" for i in range(20)}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if want <= {w["customer_id"] for w in read_warnings(sink)}:
                break
            time.sleep(0.2)
        got = read_warnings(sink)
        assert want <= {w["customer_id"] for w in got}
        assert not [w for w in got if w["customer_id"].startswith("r")]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "warning(s) published this run" in out
    state = json.loads((tmp_path / "churn.jsonl.state.json").read_text())
    assert state["position"] == len(lv)


@pytest.mark.slow  # a real 3-node NATS JetStream cluster + the planted model
def test_same_warnings_over_nats_and_sqlite(planted, tmp_path):
    """Parity of the two log back ends: the same events appended to SqliteEventLog and to
    NatsEventLog (Debian's nats-server x3; a missing binary fails) give the same warnings
    round by round through ``Watcher.poll``."""
    from intake.live_log_nats import NatsEventLog, NatsLogConfig
    from intake.nats_local import LocalNatsCluster

    ds, live, model = planted
    lv = _live([r for r in live if r[2] < T0 + 336 * DAY])
    with LocalNatsCluster(tmp_path / "nats") as c:
        nats = NatsEventLog(NatsLogConfig(servers=tuple(c.urls), stream="CHURN_T"))
        sql = SqliteEventLog(tmp_path / "events.db")
        try:
            ws = {
                "sqlite": Watcher(model, ds, AlertConfig(), [JsonlSink(tmp_path / "a.jsonl")]),
                "nats": Watcher(model, ds, AlertConfig(), [JsonlSink(tmp_path / "b.jsonl")]),
            }
            rounds = {"sqlite": [], "nats": []}
            for day in range(CUT_DAY, 336, 3):  # a round every 3 days
                end = T0 + (day + 3) * DAY
                batch = [e for e in lv if T0 + day * DAY <= e.ts < end]
                for el in (sql, nats):
                    for i in range(0, len(batch), 200):
                        el.append(batch[i : i + 200])
                for name, el in (("sqlite", sql), ("nats", nats)):
                    got = ws[name].poll(el, end)
                    rounds[name].append([w.to_dict() for w in got])
        finally:
            nats.close()
            sql.close()
    assert rounds["nats"] == rounds["sqlite"]
    assert sum(len(r) for r in rounds["sqlite"]) >= 20  # the stoppers, at least
    assert ws["nats"].position == ws["sqlite"].position == len(lv)
