"""Replay parity (issue 26 item 5): Online Retail's last weeks sent through a real
``TrackEvents`` server into the embedded log, then ``ecomrec refresh --event-log``, give the
same refreshed dataset (fingerprint) and the same refreshed model (weights, item vectors,
shadow-evaluation numbers) as the same weeks imported from a file and refreshed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from intake.dataset import Dataset
from intake.live_import import consumed_position
from tests.lifecycle.conftest import ROOT
from tests.lifecycle.test_refresh_live_log import SETS, catalogue, cli, contract_rows

pytestmark = pytest.mark.slow

CUSTOMERS = 600  # a seeded sample of Online Retail's customers (keeps the test small)
SINCE = "2011-11-11"  # four weeks before the file's last day (2011-12-09)
BATCH = 100  # events per TrackEvents call
API_KEY = "replay-test-key"


def _slice(data_dir: Path) -> Dataset:
    from intake.loaders.online_retail import load_online_retail

    ds = load_online_retail(data_dir / "online_retail" / "online_retail_raw.parquet")
    counts = ds.events.group_by("user_id").len().filter(pl.col("len") >= 5).sort("user_id")
    rng = np.random.default_rng(26)
    keep = rng.choice(counts["user_id"].to_numpy(), CUSTOMERS, replace=False)
    ev = ds.events.filter(pl.col("user_id").is_in(keep.tolist()))
    return dataclasses.replace(ds, events=ev)


def _train_live(dataset_dir: Path, out: Path) -> Path:
    """The live model: the quick tower (no text model) on the data before the cutoff."""
    import torch

    from towers.sequences import Interactions
    from training.two_tower import TwoTowerRetriever

    torch.set_num_threads(1)
    ds = Dataset.load(dataset_dir)
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    r = TwoTowerRetriever.for_dataset(
        ds,
        ROOT / "ecomrec" / "configs" / "towers" / "quick.toml",
        out,
        {"item": {"use_text": False}, "pretrain": {"epochs": 2}, "threads": 1},
    )
    r.fit(inter, None, resume=False)
    return out


def _send_through_track_events(rows: pl.DataFrame, db: Path) -> int:
    """A shop's backend: the rows in order, in batches, through a real gRPC server."""
    import grpc

    from serving._generated.ecomrec.v1 import recommend_pb2 as pb
    from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg
    from serving.config import ServeConfig
    from serving.server import start_server
    from serving.service import RecommendServicer

    cfg = ServeConfig(port=0, event_log=str(db), api_keys=(API_KEY,), metrics_port=-1)
    servicer = RecommendServicer(None, cfg=cfg)
    handle = start_server(cfg, servicer)
    handle.set_ready(True)
    last = 0
    try:
        with grpc.insecure_channel(handle.target) as channel:
            stub = pbg.RecommendServiceStub(channel)
            for i in range(0, rows.height, BATCH):
                batch = rows.slice(i, BATCH)
                events = []
                for r in batch.iter_rows(named=True):
                    e = pb.TrackedEvent(
                        customer_id=r["customer_id"],
                        product_id=r["product_id"],
                        event_type=r["event_type"],
                        timestamp=r["timestamp"],
                        quantity=r["quantity"],
                        order_id=r["order_id"],
                    )
                    if r["price"] is not None:
                        e.price = r["price"]
                    events.append(e)
                resp = stub.TrackEvents(
                    pb.TrackEventsRequest(batch_id=f"replay-{i}", events=events),
                    metadata=(("x-api-key", API_KEY),),
                    timeout=30,
                )
                assert resp.accepted == batch.height and not resp.errors, resp.errors
                assert resp.first_position == last + 1  # in order, nothing lost
                last = resp.last_position
    finally:
        handle.stop(0.5)
    return last


def _live_record(state: Path) -> dict[str, Any]:
    return dict(json.loads((state / "deploy.json").read_text())["live"])


def _decision(record: dict[str, Any]) -> dict[str, Any]:
    state = Path(record["run"]).parents[1]
    d = json.loads((state / "reports" / record["name"] / "decision.json").read_text())
    return dict(d)


def _numbers(x: Any) -> Any:
    """``x`` without its timings (``*_seconds``): what must be equal between two runs."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items() if not str(k).endswith("_seconds")}
    return x


def test_replayed_weeks_through_track_events_refresh_like_the_file(tmp_path: Path) -> None:
    import torch

    from towers.inference import load_run

    data_dir = Path(os.environ.get("ECOMREC_DATA_DIR", ROOT.parent / "shared" / "data"))
    ds = _slice(data_dir)
    rows = contract_rows(ds)
    items = ds.items.filter(pl.col("external_id").is_in(rows["product_id"].unique().to_list()))
    cat = catalogue(dataclasses.replace(ds, items=items), tmp_path / "catalogue.parquet")
    cutoff = int(dt.datetime.fromisoformat(SINCE).replace(tzinfo=dt.UTC).timestamp())
    before = rows.filter(pl.col("timestamp") < cutoff)
    after = rows.filter(pl.col("timestamp") >= cutoff)
    assert before.height > 1000 and after.height > 200

    # the live run: trained on the history before the cutoff, imported from its folder
    history = tmp_path / "history"
    history.mkdir()
    before.write_parquet(history / "000-history.parquet")
    live_ds = tmp_path / "live-path" / "shop"
    assert cli("data", "import", "--events", str(history), "--items", str(cat),
               "--out", str(live_ds)) == 0  # fmt: skip
    run = _train_live(live_ds, tmp_path / "run")

    # file path: the whole slice as one export -> data import -> refresh
    export = tmp_path / "export"
    export.mkdir()
    rows.write_parquet(export / "000-history.parquet")
    file_ds = tmp_path / "file-path" / "shop"
    assert cli("data", "import", "--events", str(export), "--items", str(cat),
               "--out", str(file_ds)) == 0  # fmt: skip
    base = ["refresh", "--run", str(run), "--since", SINCE, "--json"]
    for s in SETS:
        base += ["--set", s]
    # (the bootstrap index passes the build check at its default 0.98: products without
    # training signal share one vector, and the check counts ties at the 10th score)
    idx_file, idx_live = tmp_path / "file-path" / "index", tmp_path / "live-path" / "index"
    assert cli(*base, "--dataset", str(file_ds), "--index", str(idx_file)) in (0, 5)

    # live path: the last weeks through TrackEvents, then refresh --event-log
    db = tmp_path / "live-path" / "events.db"
    last = _send_through_track_events(after, db)
    assert last == after.height
    assert cli(*base, "--dataset", str(live_ds), "--index", str(idx_live),
               "--event-log", str(db)) in (0, 5)  # fmt: skip

    # same events, same dataset
    fp_file = Dataset.load(file_ds).fingerprint()
    assert Dataset.load(live_ds).fingerprint() == fp_file
    assert consumed_position(live_ds) == last
    rec_file = _live_record(Path(str(idx_file) + ".refresh"))
    rec_live = _live_record(Path(str(idx_live) + ".refresh"))
    assert rec_live["live_log"]["to_position"] == last and rec_file.get("live_log") is None
    assert Dataset.load(rec_live["dataset"]).fingerprint() == fp_file
    assert rec_live["data_until"] == rec_file["data_until"]
    assert rec_live["n_events"] == rec_file["n_events"]

    # same refreshed model: every weight, the item vectors, the shadow evaluation
    sd_file = torch.load(Path(rec_file["run"]) / "model.pt", map_location="cpu", weights_only=False)
    sd_live = torch.load(Path(rec_live["run"]) / "model.pt", map_location="cpu", weights_only=False)
    w_file, w_live = sd_file["state_dict"], sd_live["state_dict"]
    assert w_file.keys() == w_live.keys()
    for k in w_file:
        assert torch.equal(w_file[k], w_live[k]), k
    v_file = load_run(rec_file["run"]).item_vectors()
    v_live = load_run(rec_live["run"]).item_vectors()
    np.testing.assert_array_equal(v_file, v_live)
    d_file, d_live = _decision(rec_file), _decision(rec_live)
    for key in ("ndcg@10", "churn_auc", "metrics", "window", "new_events", "fingerprint"):
        assert _numbers(d_live[key]) == _numbers(d_file[key]), key
    assert d_live["metrics"]["candidate"]["users"] >= 20  # a real evaluation, both ways
    assert rec_live["metrics"] == rec_file["metrics"]
