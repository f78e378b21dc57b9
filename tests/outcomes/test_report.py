"""The online report on planted streams: a variant whose CTR is known to be higher is found
with an interval that excludes 0 (and holds the true gap); an A/A stream's interval holds 0;
the JSON's counts equal the planted ones; ``ecomrec report online`` writes JSON + HTML."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ecomrec.cli import main
from ecomrec.errors import ConfigError
from intake.live_log import LiveEvent, SqliteEventLog
from outcomes.report import online_report
from outcomes.served_log import ServedLog, read_served

SINCE = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
T0 = SINCE.timestamp()


def plant(
    path: Path,
    rates: dict[str, tuple[float, float, float]],
    n: int = 3000,
    days: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, int | float]]:
    """Answers for each variant (``n`` each over ``days``) and their outcomes: per answer an
    impression, a click with probability ctr, a purchase (price 10) with probability conv;
    half of the clicks carry the id, the rest are found by the window. Returns the truth."""
    rng = np.random.default_rng(seed)
    truth: dict[str, dict[str, int | float]] = {}
    events: list[LiveEvent] = []
    with ServedLog(path, flush_interval_s=60) as log:
        for v, (ctr, conv, _) in rates.items():
            t = truth.setdefault(v, {"recommendations": 0, "clicks": 0, "purchases": 0})
            for i in range(n):
                ts = T0 + (i * days * 86400) / n
                customer = f"{v}-c{i % 700}"
                items = (f"p{i % 50}", f"p{(i + 1) % 50}", f"p{(i + 2) % 50}")
                rid = f"{v}-{i}"
                log.record(rid, customer, v, f"model-{v}", "Recommend", items, ts=ts)
                t["recommendations"] += 1
                events.append(
                    LiveEvent(
                        customer, items[0], "impression", int(ts) + 1, 1, None, None, None, rid
                    )
                )
                if rng.random() < ctr:
                    t["clicks"] += 1
                    events.append(
                        LiveEvent(
                            customer,
                            items[1],
                            "click",
                            int(ts) + 2,
                            1,
                            None,
                            None,
                            None,
                            rid if i % 2 else None,
                        )
                    )
                if rng.random() < conv:
                    t["purchases"] += 1
                    events.append(
                        LiveEvent(
                            customer,
                            items[1],
                            "purchase",
                            int(ts) + 3,
                            2,
                            10.0,
                            f"o{v}{i}",
                            None,
                            rid,
                        )
                    )
    # answers from different customers' sequences must not steal each other's events:
    # every event above is attributed to exactly its own answer (ids, or the customer's
    # latest answer holding the item, which is its own one: 700 customers, 3000 answers,
    # items rotate with i, so an older answer of the same customer holds items[1] too: the
    # window picks the latest one before the event, its own)
    with SqliteEventLog(path) as elog:
        for k in range(0, len(events), 1000):
            elog.append(sorted(events[k : k + 1000], key=lambda e: e.ts))
    return truth


def _row(report: dict, variant: str) -> dict:
    return next(r for r in report["variant_totals"] if r["variant"] == variant)


def _diff(report: dict, metric: str) -> dict:
    return next(d for d in report["differences"] if d["metric"] == metric)


def test_higher_ctr_is_found_and_its_interval_excludes_zero(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    truth = plant(db, {"control": (0.08, 0.02, 0), "candidate": (0.12, 0.04, 0)})
    rep = online_report(db, SINCE, SINCE + dt.timedelta(days=3))
    assert rep["baseline"] == "control"
    for v in ("control", "candidate"):
        r = _row(rep, v)
        assert r["recommendations"] == truth[v]["recommendations"] == 3000
        assert r["impressions"] == 3000  # every answer had an impression
        assert r["clicks"] == truth[v]["clicks"]
        assert r["purchases"] == truth[v]["purchases"]
        assert r["revenue"] == pytest.approx(20.0 * truth[v]["purchases"])
        assert r["metrics"]["ctr"]["value"] == pytest.approx(truth[v]["clicks"] / 3000)
        m = r["metrics"]["ctr"]
        assert m["lo"] < m["value"] < m["hi"]
        # one row per (variant, model version) too, equal to the variant's total here
        (mv,) = [x for x in rep["variants"] if x["variant"] == v]
        assert mv["model_version"] == f"model-{v}" and mv["clicks"] == r["clicks"]
    d = _diff(rep, "ctr")
    assert d["variant"] == "candidate" and d["baseline"] == "control"
    assert d["lo"] > 0  # the planted gap is found
    assert d["lo"] < 0.04 < d["hi"]  # and the interval holds the true one
    rev = _diff(rep, "revenue_per_1000")
    assert rev["lo"] > 0
    # daily rows add up to the totals
    for v in ("control", "candidate"):
        days = [x for x in rep["daily"] if x["variant"] == v]
        assert len(days) == 3
        assert sum(x["clicks"] for x in days) == truth[v]["clicks"]
        assert sum(x["recommendations"] for x in days) == 3000
    assert rep["attribution"]["by_window"] > 0 and rep["attribution"]["by_id"] > 0
    assert rep["attribution"]["unattributed"] == 0


def test_an_a_a_stream_interval_holds_zero(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    plant(db, {"control": (0.10, 0.03, 0), "same": (0.10, 0.03, 0)}, seed=7)
    rep = online_report(db, SINCE, SINCE + dt.timedelta(days=3))
    for metric in ("ctr", "conversion", "revenue_per_1000"):
        d = _diff(rep, metric)
        assert d["lo"] < 0 < d["hi"], (metric, d)


def test_the_period_is_a_cohort_of_answers(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    truth = plant(db, {"control": (0.3, 0.0, 0)}, n=300, days=3)
    # only the first day's answers; their clicks counted, later days' not
    one = online_report(db, SINCE, SINCE + dt.timedelta(days=1))
    assert _row(one, "control")["recommendations"] == 100
    assert [x["day"] for x in one["daily"]] == ["2026-11-02"]
    full = online_report(db, SINCE, SINCE + dt.timedelta(days=3))
    assert _row(full, "control")["clicks"] == truth["control"]["clicks"]
    assert _row(one, "control")["clicks"] < truth["control"]["clicks"]


def test_no_impressions_tracked_means_per_answer_served(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with ServedLog(db) as log:
        for i in range(10):
            log.record(f"r{i}", "c", "default", "m", "Recommend", ("p1",), ts=T0 + i)
    with SqliteEventLog(db) as elog:
        elog.append([LiveEvent("c", "p1", "click", int(T0) + 20, recommendation_id="r3")])
    rep = online_report(db, SINCE, SINCE + dt.timedelta(days=1))
    r = _row(rep, "default")
    assert rep["impressions_tracked"] is False
    assert (r["recommendations"], r["impressions"], r["clicks"]) == (10, 10, 1)
    assert r["metrics"]["ctr"]["value"] == pytest.approx(0.1)
    assert rep["differences"] == []  # one variant: nothing to compare


@pytest.mark.slow
def test_cli_writes_json_and_html_and_names_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "events.db"
    plant(db, {"control": (0.1, 0.02, 0), "candidate": (0.1, 0.02, 0)}, n=200)
    out = tmp_path / "rep"
    rc = main(
        [
            "report",
            "online",
            "--event-log",
            str(db),
            "--since",
            "2026-11-02",
            "--until",
            "2026-11-05",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads((out / "online.json").read_text())
    assert {
        "since",
        "until",
        "generated_at",
        "attribution",
        "variants",
        "differences",
        "daily",
    } <= set(rep)
    assert rep["since"] == "2026-11-02T00:00:00+00:00"
    assert {"window_s", "rule"} <= set(rep["attribution"])
    html = (out / "online.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "candidate" in html
    assert rep == json.loads(
        json.dumps(online_report(db, SINCE, dt.datetime(2026, 11, 5, tzinfo=dt.UTC)))
    ) | {"generated_at": rep["generated_at"]}
    assert "candidate - control ctr" in capsys.readouterr().out
    assert (
        main(
            ["report", "online", "--event-log", str(db), "--since", "yesterday", "--out", str(out)]
        )
        == 2
    )
    assert "--since: 'yesterday' is not an ISO 8601" in capsys.readouterr().err
    assert (
        main(
            [
                "report",
                "online",
                "--event-log",
                str(tmp_path / "nope.db"),
                "--since",
                "2026-11-02",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--baseline: no recommendations of variant 'x'"):
        online_report(db, SINCE, baseline="x")


def test_served_log_writes_off_the_hot_path_and_forgets(tmp_path: Path) -> None:
    db = tmp_path / "served.db"
    with ServedLog(db, flush_interval_s=0.05) as log:
        ids = {log.ids.next() for _ in range(1000)}
        assert len(ids) == 1000 and all(len(i) <= 64 for i in ids)
        log.record("r1", "alice", "default", "m", "Recommend", ("a", "b"))
        log.record("r2", "bob", "default", "m", "Recommend", ("c",))
        assert log.flush() == 2
        assert [s.recommendation_id for s in read_served(db)] == ["r1", "r2"]
        assert log.forget("alice") == 1
    assert [s.customer_id for s in read_served(db)] == ["bob"]
    # the event log's forget removes served rows in its file too
    with ServedLog(db) as log:
        log.record("r3", "bob", "default", "m", "Recommend", ("c",))
    with SqliteEventLog(db) as elog:
        elog.forget("bob")
    assert list(read_served(db)) == []
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM served").fetchone()[0] == 0
    conn.close()
