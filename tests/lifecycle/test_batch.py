"""Sharded batch jobs on a local Dask cluster: parity with the single-process path, resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from ecomrec.errors import ConfigError
from intake.event_log import EventLogConfig, write_event_log
from intake.ingest import IngestConfig, ingest_event_log
from lifecycle.batch import read_output, run_job
from segments.behaviour import SegmentConfig, SegmentModel, cluster_inputs
from towers.inference import load_run
from towers.sequences import batch_for_users, load_sequences
from training.trainer import Trainer, load_run_config


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ingested event log (8 user buckets), a model trained on it, a segment model."""
    root = tmp_path_factory.mktemp("batch")
    write_event_log(
        root / "log",
        EventLogConfig(rows=8000, customers=400, products=60, n_categories=6, chunk_rows=3000),
        progress=False,
    )
    ingest_event_log(root / "log", root / "ingest", IngestConfig(buckets=8, progress=False))
    inter = load_sequences(root / "ingest")
    prods = pl.read_parquet(root / "ingest" / "products.parquet").sort("item_id")
    items = pl.DataFrame({"item_id": prods["item_id"], "external_id": prods["product_id"]})
    cfg = load_run_config(
        None,
        threads=1,
        tensorboard=False,
        progress=False,
        item={"dim": 16, "use_text": False},
        user={"hidden": 16, "n_heads": 2, "n_layers": 1, "max_len": 10},
        pretrain={"epochs": 1, "batch_size": 64},
    )
    torch.set_num_threads(1)
    Trainer(cfg, items, prods["product_id"].to_list(), root / "run").fit(inter, None)
    paths = {"root": root, "ingest": root / "ingest", "run": root / "run", "seg": root / "seg"}
    emb = reference_users(paths)
    centroids = cluster_inputs(emb[[0, 150, 300]], None, SegmentConfig(k=3))[0]
    sm = SegmentModel(SegmentConfig(k=3), centroids, np.array([7, 3, 11]), next_id=12)
    (root / "seg").mkdir()
    (root / "seg" / "segments_model.json").write_text(json.dumps(sm.to_dict()))
    return paths


@pytest.fixture(scope="module")
def client() -> Any:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as c,
    ):
        yield c


def reference_users(shop: dict[str, Path]) -> np.ndarray:
    """Every customer's vector through the in-memory path (Interactions + the encoder)."""
    tm = load_run(shop["run"])
    inter = load_sequences(shop["ingest"])
    users = np.arange(1, inter.n_users + 1)
    return np.asarray(tm.user_encoder().encode(batch_for_users(inter, users, tm.max_len)))


@pytest.mark.slow
def test_dask_jobs_equal_the_single_process_path(
    shop: dict[str, Path], client: Any, tmp_path: Path
) -> None:
    rep = run_job(
        "embed-users", tmp_path / "u", client, run_dir=shop["run"], sequences=shop["ingest"]
    )
    assert (rep.shards, rep.computed, rep.skipped, rep.workers) == (8, 8, 0, 2)
    got = read_output(tmp_path / "u").sort("user_id")
    ref = reference_users(shop)
    assert got.height == len(ref) == 400
    np.testing.assert_allclose(got["vector"].to_numpy(), ref, atol=1e-5)
    cust = pl.read_parquet(shop["ingest"] / "customers.parquet").sort("user_id")
    assert got["customer_id"].to_list() == cust["customer_id"].to_list()

    run_job(
        "assign-segments",
        tmp_path / "s",
        client,
        embeddings=tmp_path / "u",
        segments_model=shop["seg"],
    )
    seg = read_output(tmp_path / "s").join(got.select("customer_id", "user_id"), on="customer_id")
    sm = SegmentModel.from_dict(json.loads((shop["seg"] / "segments_model.json").read_text()))
    want = sm.assign(cluster_inputs(ref, None, sm.cfg)[0])
    assert seg.sort("user_id")["segment"].to_list() == want.tolist()
    assert set(want.tolist()) <= {3, 7, 11} and len(set(want.tolist())) >= 2

    local = run_job("embed-items", tmp_path / "i1", None, run_dir=shop["run"], shard_rows=16)
    dask = run_job("embed-items", tmp_path / "i2", client, run_dir=shop["run"], shard_rows=16)
    assert local.shards == dask.shards == 4  # 60 products in shards of 16
    a, b = read_output(tmp_path / "i1"), read_output(tmp_path / "i2")
    assert a["product_id"].to_list() == b["product_id"].to_list()
    np.testing.assert_allclose(a["vector"].to_numpy(), b["vector"].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(
        b["vector"].to_numpy(), load_run(shop["run"]).item_vectors()[1:], atol=1e-6
    )


@pytest.mark.slow
def test_a_killed_worker_and_a_rerun_redo_no_finished_shard(
    shop: dict[str, Path], tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    out = tmp_path / "u"
    seen: dict[str, tuple[int, int]] = {}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as lc,
        Client(lc) as c,
    ):
        result: dict[str, Any] = {}

        def job() -> None:
            result["rep"] = run_job(
                "embed-users", out, c, run_dir=shop["run"], sequences=shop["ingest"]
            )

        note = tmp_path / "killed-mid.json"

        def die_mid_shard(note: str, dask_worker: Any = None) -> list[str]:
            """In the worker: when it is computing shards whose part files do not exist yet,
            note them and SIGKILL itself (no round trip between the check and the kill)."""
            specs = [a for ts in dask_worker.state.executing for a in ts.run_spec.args]
            files = [a.out_file for a in specs if hasattr(a, "out_file")]
            if not files or any(Path(f).exists() for f in files):
                return []
            Path(note).write_text(json.dumps(files))
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-shard; its nanny restarts it
            return files  # never reached

        th = threading.Thread(target=job)
        th.start()
        deadline = time.monotonic() + 600  # the first shard waits for torch to load in a worker
        interrupted: list[Path] = []
        t_kill = 0
        # a shard can still finish between the worker's check and its death: then the next
        # busy worker is killed, until a kill interrupts one
        while not interrupted:
            assert th.is_alive(), "the job ended before a worker could be killed mid-shard"
            assert time.monotonic() < deadline, "no kill landed mid-shard"
            time.sleep(0.02)
            if not list(out.glob("part-*.parquet")):  # a shard finished before any kill
                continue
            for f in out.glob("part-*.parquet"):
                if f.name not in seen:
                    st = f.stat()
                    seen[f.name] = (st.st_ino, st.st_mtime_ns)
            t_kill = time.time_ns()
            for addr in list(c.scheduler_info()["workers"]):  # one worker at a time
                # on_error="ignore": the worker that died, or one killed by an earlier try and
                # still listed while its nanny restarts it
                c.run(die_mid_shard, str(note), workers=[addr], on_error="ignore")
                if note.exists():
                    break
            if note.exists():
                flight = json.loads(note.read_text())
                note.unlink()
                interrupted = [Path(f) for f in flight if not Path(f).exists()]
        th.join(timeout=300)
    rep = result["rep"]
    assert rep.computed == 8 and len(seen) >= 1
    for name, ident in seen.items():  # written once: never recomputed after the kill
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == ident
    for f in interrupted:  # the shard the dead worker was computing: redone after the kill
        assert f.stat().st_mtime_ns > t_kill, f
    got = read_output(out).sort("user_id")
    np.testing.assert_allclose(got["vector"].to_numpy(), reference_users(shop), atol=1e-5)

    # a crashed driver: half of the shards gone, the rerun computes only those
    for f in sorted(out.glob("part-*.parquet"))[::2]:
        f.unlink()
    (out / "part-00001.parquet.tmp-123").write_bytes(b"half")
    rep2 = run_job("embed-users", out, None, run_dir=shop["run"], sequences=shop["ingest"])
    assert (rep2.computed, rep2.skipped, rep2.computed_shards) == (4, 4, [0, 2, 4, 6])
    assert not list(out.glob("*.tmp-*"))
    again = read_output(out).sort("user_id")
    np.testing.assert_allclose(again["vector"].to_numpy(), got["vector"].to_numpy(), atol=1e-6)
    # another job into the same directory is refused, not mixed in
    with pytest.raises(ConfigError, match="another job"):
        run_job("embed-items", out, None, run_dir=shop["run"])


@pytest.mark.slow
def test_cli_runs_a_job_in_process_and_reports_it(
    shop: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecomrec.cli import main

    argv = ["batch", "embed-items", "--run", str(shop["run"]), "--out", str(tmp_path / "i")]
    assert main([*argv, "--shard-rows", "25", "--in-process"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["shards"], rep["computed"], rep["rows"]) == (3, 3, 60)
    assert read_output(tmp_path / "i").height == 60
    bad = ["batch", "assign-segments", "--embeddings", str(tmp_path / "none")]
    assert main([*bad, "--segments-model", str(shop["seg"]), "--out", str(tmp_path / "s")]) == 2
    assert "no part-*.parquet" in capsys.readouterr().err
