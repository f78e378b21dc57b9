"""The loop closes (issue 26 item 5): ``ecomrec refresh --event-log`` reads the live log
after the position its dataset consumed, imports it through the contract code, records the
positions in the lineage, consumes each event once, and leaves the position unchanged when
it fails. The replay parity on Online Retail is in test_refresh_replay.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from intake.dataset import Dataset
from intake.live_import import LIVE_SCHEMA, consumed_position
from intake.live_log import LiveEvent, SqliteEventLog
from intake.loaders.contract import ContractOptions, load_contract
from tests.lifecycle.conftest import Shop

SETS = [
    "refresh.eval_days=60.0",
    "refresh.export_onnx=false",
    "refresh.index_queries=100",
    "refresh.tolerance=1.0",
    "refresh.churn_tolerance=1.0",
    "index.hnsw_m=16",
    "index.hnsw_ef_construct=64",
    "index.keep_versions=5",
]


def contract_rows(ds: Dataset) -> pl.DataFrame:
    """A dataset's events back in the shop's contract columns (ids as written), in source
    order: what the shop's export or its backend would send."""
    ev = ds.events.sort("order")
    users = np.array(ds.users.external_ids, dtype=object)
    items = np.array(ds.item_ids.external_ids, dtype=object)
    cust = users[ev["user_id"].to_numpy() - 1]
    ts = ev["ts"].to_numpy()
    frame = {
        "customer_id": list(cust),
        "product_id": list(items[ev["item_id"].to_numpy() - 1]),
        "event_type": ev["event_type"].to_list(),
        "timestamp": ts.tolist(),
        "quantity": ev["quantity"].cast(pl.Int64).to_list(),
        "price": ev["price"].to_list(),
        # one order per customer and second (the export's invoice)
        "order_id": [f"{c}-{t}" for c, t in zip(cust, ts)],
        "session_id": [None] * ev.height,
    }
    return pl.DataFrame(frame, schema=LIVE_SCHEMA)


def catalogue(ds: Dataset, path: Path) -> Path:
    ds.items.select(
        pl.col("external_id").alias("product_id"), "title", "brand", "category", "price"
    ).write_parquet(path)
    return path


def live_events(rows: pl.DataFrame) -> list[LiveEvent]:
    return [
        LiveEvent(
            customer_id=r["customer_id"],
            product_id=r["product_id"],
            event_type=r["event_type"],
            ts=r["timestamp"],
            quantity=r["quantity"],
            price=r["price"],
            order_id=r["order_id"],
            session_id=r["session_id"],
        )
        for r in rows.iter_rows(named=True)
    ]


def file_import(rows: pl.DataFrame, items: Path, folder: Path, name: str) -> Dataset:
    """The file path: the same rows as one export, imported by the contract code."""
    folder.mkdir(parents=True)
    rows.write_parquet(folder / "000-export.parquet")
    return load_contract(folder, items, ContractOptions(name=name))


def cli(*argv: str) -> int:
    from ecomrec.cli import main

    return main(list(argv))


def _append(log: SqliteEventLog, events: Sequence[LiveEvent], batch: int = 50) -> int:
    last = 0
    for i in range(0, len(events), batch):
        last = log.append(events[i : i + batch], batch_id=f"b{events[i].ts}-{i}").last_seq
    return last


def _refresh_args(run: Path, shop_dir: Path, index: Path, db: Path, since: str) -> list[str]:
    args = ["refresh", "--run", str(run), "--dataset", str(shop_dir), "--index", str(index)]
    args += ["--since", since, "--event-log", str(db), "--json"]
    for s in SETS:
        args += ["--set", s]
    return args


def _decision(state: Path) -> dict[str, Any]:
    last = sorted((state / "reports").iterdir())[-1]
    return dict(json.loads((last / "decision.json").read_text()))


@pytest.mark.slow
def test_refresh_reads_the_log_once_records_positions_and_keeps_them_on_failure(
    shop: Shop, live_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = contract_rows(shop.full)
    items = catalogue(shop.full, tmp_path / "catalogue.parquet")
    hist_rows = rows.filter(pl.col("timestamp") < shop.t1)
    mid_rows = rows.filter((pl.col("timestamp") >= shop.t1) & (pl.col("timestamp") < shop.t2))
    late_rows = rows.filter(pl.col("timestamp") >= shop.t2)
    assert hist_rows.height and mid_rows.height and late_rows.height
    # the shop's history folder, imported once by hand (the dataset the live run knows)
    history = tmp_path / "history"
    history.mkdir()
    hist_rows.write_parquet(history / "000-history.parquet")
    shop_dir = tmp_path / "shop"
    assert cli("data", "import", "--events", str(history), "--items", str(items),
               "--out", str(shop_dir)) == 0  # fmt: skip
    assert consumed_position(shop_dir) == 0
    db = tmp_path / "events.db"
    index, state = tmp_path / "index", tmp_path / "index.refresh"
    args = _refresh_args(live_run, shop_dir, index, db, shop.since)

    # 1. the weeks after the live run's data arrive through the log -> promoted
    with SqliteEventLog(db) as log:
        n1 = _append(log, live_events(mid_rows))
    assert cli(*args) in (0, 5)
    want1 = file_import(rows.filter(pl.col("timestamp") < shop.t2), items, tmp_path / "f1", "shop")
    got1 = Dataset.load(shop_dir)
    assert got1.fingerprint() == want1.fingerprint()
    live = json.loads((state / "deploy.json").read_text())["live"]
    lineage1 = {"from_position": 0, "to_position": n1, "events": mid_rows.height}
    assert {k: live["live_log"][k] for k in lineage1} == lineage1
    assert live["live_log"]["log"] == {"path": str(db.resolve())}
    manifest = json.loads((Path(live["run"]) / "manifest.json").read_text())
    assert manifest["lineage"]["live_log"] == live["live_log"]
    assert consumed_position(shop_dir) == n1
    assert Dataset.load(live["dataset"]).fingerprint() == want1.fingerprint()

    # 2. more events; a refresh that fails (in training) changes nothing
    with SqliteEventLog(db) as log:
        n2 = _append(log, live_events(late_rows))
    deploy_before = (state / "deploy.json").read_bytes()
    import lifecycle.refresh as refresh_mod

    class Boom(RuntimeError):
        pass

    def fail(*a: Any, **k: Any) -> Any:
        raise Boom("training failed")

    with monkeypatch.context() as m:
        m.setattr(refresh_mod.Trainer, "fit", fail)
        with pytest.raises(Boom):
            cli(*args)
    assert consumed_position(shop_dir) == n1
    assert Dataset.load(shop_dir).fingerprint() == want1.fingerprint()
    assert (state / "deploy.json").read_bytes() == deploy_before
    assert (history / f"live-{n1 + 1:012d}-{n2:012d}.parquet").exists()  # written, not recorded

    # 3. the candidate is not promoted: the events are still consumed once, and recorded
    assert cli(*args, "--set", "refresh.min_eval_users=1000000") == 3
    dec = _decision(state)
    assert dec["decision"] == "not-promoted"
    lineage2 = {"from_position": n1, "to_position": n2, "events": late_rows.height}
    assert {k: dec["live_log"][k] for k in lineage2} == lineage2
    assert (state / "deploy.json").read_bytes() == deploy_before  # live kept
    assert consumed_position(shop_dir) == n2
    want2 = file_import(rows, items, tmp_path / "f2", "shop")
    assert Dataset.load(shop_dir).fingerprint() == want2.fingerprint()
    parts = sorted(p.name for p in history.glob("live-*.parquet"))
    assert parts == [f"live-{1:012d}-{n1:012d}.parquet", f"live-{n1 + 1:012d}-{n2:012d}.parquet"]

    # 4. nothing new in the log: exit 4 without training, the position unchanged
    assert cli(*args) == 4
    dec = _decision(state)
    assert dec["decision"] == "no-new-data" and dec["live_log"]["from_position"] == n2
    assert consumed_position(shop_dir) == n2
    assert Dataset.load(shop_dir).fingerprint() == want2.fingerprint()


def test_refresh_event_log_errors_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from intake.live_import import import_with_live

    history = tmp_path / "history"
    history.mkdir()
    rows = pl.DataFrame(
        {
            "customer_id": ["c1", "c2"],
            "product_id": ["p1", "p2"],
            "event_type": ["purchase", "view"],
            "timestamp": [1_700_000_000, 1_700_000_100],
            "quantity": [1, 1],
            "price": [2.0, None],
            "order_id": ["o1", None],
            "session_id": [None, None],
        },
        schema=LIVE_SCHEMA,
    )
    rows.write_parquet(history / "000-history.parquet")
    shop_dir = tmp_path / "shop"
    with SqliteEventLog(tmp_path / "a.db") as log:
        log.append(live_events(rows))
        import_with_live(log, history, shop_dir)
    assert consumed_position(shop_dir) == 2
    base = ["refresh", "--run", str(tmp_path / "run"), "--index", str(tmp_path / "index")]
    # a missing log file
    assert cli(*base, "--dataset", str(shop_dir), "--event-log", str(tmp_path / "nope.db")) == 2
    err = capsys.readouterr().err
    assert "nope.db" in err and "Traceback" not in err
    # a dataset that is not a saved dataset folder
    assert cli(*base, "--dataset", str(history), "--event-log", str(tmp_path / "a.db")) == 2
    assert "data import" in capsys.readouterr().err
    # another (empty) log than the one the dataset consumed: refused, nothing read
    SqliteEventLog(tmp_path / "b.db").close()
    assert cli(*base, "--dataset", str(shop_dir), "--event-log", str(tmp_path / "b.db")) == 2
    err = capsys.readouterr().err
    assert "position 0" in err and "up to 2" in err
    assert consumed_position(shop_dir) == 2
    # --log-after: only for a dataset that never read the log, and it is where reading starts
    log_args = ["--dataset", str(shop_dir), "--event-log", str(tmp_path / "a.db")]
    assert cli(*base, *log_args, "--log-after", "1") == 2
    assert "already records the log position it consumed (2)" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert cli("data", "import", "--events", str(history), "--out", str(fresh)) == 0
    capsys.readouterr()
    assert cli(*base, "--dataset", str(fresh), "--event-log", str(tmp_path / "a.db"),
               "--log-after", "3") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "position 2" in err and "up to 3" in err  # the log (2 events) is behind it
    assert consumed_position(fresh) == 0


@pytest.mark.slow
def test_refresh_reads_the_nats_log(shop: Shop, live_run: Path, tmp_path: Path) -> None:
    """The same loop on the distributed back end: ``--event-log nats://...`` (a real 3-node
    JetStream cluster), positions are stream sequences."""
    from intake.live_log_nats import NatsEventLog, NatsLogConfig
    from intake.nats_local import LocalNatsCluster

    rows = contract_rows(shop.full).filter(pl.col("timestamp") < shop.t2)
    items = catalogue(shop.full, tmp_path / "catalogue.parquet")
    history = tmp_path / "history"
    history.mkdir()
    rows.filter(pl.col("timestamp") < shop.t1).write_parquet(history / "000-history.parquet")
    mid = rows.filter(pl.col("timestamp") >= shop.t1)
    shop_dir = tmp_path / "shop"
    assert cli("data", "import", "--events", str(history), "--items", str(items),
               "--out", str(shop_dir)) == 0  # fmt: skip
    stream = "REFRESH_LOOP"
    with LocalNatsCluster(tmp_path / "nats") as c:
        nats = NatsEventLog(NatsLogConfig(servers=tuple(c.urls), stream=stream))
        try:
            last = 0
            events = live_events(mid)
            for i in range(0, len(events), 50):
                last = nats.append(events[i : i + 50], batch_id=f"b{i}").last_seq
        finally:
            nats.close()
        index, state = tmp_path / "index", tmp_path / "index.refresh"
        args = _refresh_args(live_run, shop_dir, index, tmp_path / "unused.db", shop.since)
        args[args.index("--event-log") + 1] = ",".join(c.urls)
        args += ["--set", f"refresh.event_log_stream={stream!r}".replace("'", '"')]
        assert cli(*args) in (0, 5)
        live = json.loads((state / "deploy.json").read_text())["live"]
        assert live["live_log"]["log"] == {"stream": stream, "servers": list(c.urls)}
        assert (live["live_log"]["from_position"], live["live_log"]["to_position"]) == (0, last)
        assert live["live_log"]["events"] == mid.height
        want = file_import(rows, items, tmp_path / "f", "shop")
        assert Dataset.load(shop_dir).fingerprint() == want.fingerprint()
        assert consumed_position(shop_dir) == last
        assert cli(*args) == 4  # nothing new in the stream
