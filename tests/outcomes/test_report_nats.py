"""The online report of a replicated deployment: events in a real 3-node NATS JetStream
cluster (``event_backend = "nats"``) and one served log per replica give the same report
as the same answers and events in one embedded SQLite log."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from ecomrec.cli import main
from ecomrec.errors import ConfigError
from intake.live_log import SqliteEventLog
from intake.live_log_nats import NatsEventLog, NatsLogConfig
from intake.nats_local import LocalNatsCluster
from outcomes.report import online_report
from outcomes.served_log import ServedLog, read_served
from tests.outcomes.test_report import SINCE, plant

UNTIL = SINCE + dt.timedelta(days=3)
SAME = ("variants", "variant_totals", "differences", "daily", "attribution", "baseline")


def _split_served(db: Path, files: list[Path]) -> int:
    """The answers of ``db`` dealt round-robin into ``files`` (one per replica)."""
    logs = [ServedLog(f, flush_interval_s=60) for f in files]
    n = 0
    for s in read_served(db):
        logs[n % len(logs)].record(
            s.recommendation_id, s.customer_id, s.variant, s.model_version, s.method, s.items,
            ts=s.ts,
        )  # fmt: skip
        n += 1
    for lg in logs:
        lg.close()
    return n


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in SAME:
        assert a[key] == b[key], key


def test_replicas_served_logs_and_the_nats_log_give_the_sqlite_report(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    truth = plant(db, {"control": (0.08, 0.02, 0), "candidate": (0.12, 0.04, 0)}, n=1500)
    want = online_report(db, SINCE, UNTIL)
    assert {r["variant"]: r["clicks"] for r in want["variant_totals"]} == {
        v: t["clicks"] for v, t in truth.items()
    }
    replicas = [tmp_path / "replica-0.db", tmp_path / "replica-1.db"]
    assert _split_served(db, replicas) == 3000

    with LocalNatsCluster(tmp_path / "nats") as cluster:
        spec = ",".join(cluster.urls)
        log = NatsEventLog(NatsLogConfig(servers=tuple(cluster.urls), stream="REPORT"))
        try:
            with SqliteEventLog(db) as src:
                events = [s.event for s in src.read()]
            for k in range(0, len(events), 1000):
                log.append(events[k : k + 1000])
        finally:
            log.close()

        got = online_report(spec, SINCE, UNTIL, served_log=replicas, stream="REPORT")
        _same(got, want)
        assert got["served_log"] == [str(p) for p in replicas]
        # one replica's log alone: half the answers, and still every count its own
        half = online_report(spec, SINCE, UNTIL, served_log=replicas[:1], stream="REPORT")
        assert sum(r["recommendations"] for r in half["variant_totals"]) == 1500

        # a NATS log without served logs, or the same replica twice: named errors
        with pytest.raises(ConfigError, match="--served-log"):
            online_report(spec, SINCE, UNTIL, stream="REPORT")
        with pytest.raises(ConfigError, match="more than one file"):
            online_report(spec, SINCE, UNTIL, served_log=[replicas[0]] * 2, stream="REPORT")

        # the command: repeated --served-log, --stream
        out = tmp_path / "report"
        argv = ["report", "online", "--event-log", spec, "--stream", "REPORT"]
        argv += ["--served-log", str(replicas[0]), "--served-log", str(replicas[1])]
        argv += ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "--out", str(out)]
        assert main(argv) == 0
    _same(json.loads((out / "online.json").read_text()), want)
