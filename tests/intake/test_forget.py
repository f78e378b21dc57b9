"""Forgetting a customer: the live log, the dataset, derived files, the stored user vectors;
then every artifact is searched for the id and its pseudonyms, and a later import cannot
bring them back."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from indexing.base import IndexConfig
from indexing.build import open_store
from indexing.users import build_user_index, user_payloads
from intake.dataset import Dataset
from intake.live_log import LiveEvent, SqliteEventLog
from intake.synthetic import SyntheticConfig, make_shop
from intake.tombstones import Tombstones
from segments.export import pseudonymise

ROOT = Path(__file__).resolve().parents[2]
KEY = "export-key-1"


def _all_bytes(*roots: Path) -> bytes:
    return b"".join(p.read_bytes() for r in roots for p in r.rglob("*") if p.is_file())


def _parquet_text(*roots: Path) -> set[str]:
    out: set[str] = set()
    for r in roots:
        for p in r.rglob("*.parquet"):
            df = pl.read_parquet(p)
            for c, t in df.schema.items():
                if t == pl.Utf8:
                    out |= set(df[c].drop_nulls().to_list())
    return out


@pytest.mark.slow  # runs the ecomrec CLI in a subprocess
def test_forget_removes_every_trace_and_stays_forgotten(tmp_path: Path) -> None:
    ds = make_shop(SyntheticConfig(n_users=60, n_items=30, seed=3))
    data = tmp_path / "shop"
    ds.save(data)
    victim = ds.users.external_ids[4]  # dense id 5
    other = ds.users.external_ids[5]
    n_victim = int((ds.events["user_id"] == 5).sum())
    assert n_victim > 0
    ts_max = int(ds.events["ts"].max())

    log_path = tmp_path / "events.db"
    with SqliteEventLog(log_path) as log:
        log.append([LiveEvent(victim, "p1", "view", ts_max + 10) for _ in range(3)])
        log.append([LiveEvent(other, "p1", "view", ts_max + 11)])

    # an analyst export (the real pseudonyms) and a raw-id list, in derived folders
    exports = tmp_path / "exports"
    (exports / "seg").mkdir(parents=True)
    ext = ds.users.external_ids[:10]
    pl.DataFrame({"customer_id": pseudonymise(ext, KEY), "score": list(range(10))}).write_parquet(
        exports / "seg" / "customers.parquet"
    )
    pl.DataFrame({"customer": ext, "segment": ["a"] * 10}).write_parquet(
        exports / "audience.parquet"
    )
    scores = exports / "seg" / "scores"
    scores.mkdir()
    (scores / "meta.json").write_text("{}")
    pl.DataFrame({"user_id": [5, 6]}).write_parquet(scores / "customers.parquet")

    # stored user vectors (`index build --users`): two versions (the older kept for rollback)
    index = tmp_path / "index"
    users = np.arange(1, 61)
    for seed in (0, 1):
        vecs = np.random.default_rng(seed).normal(size=(60, 8)).astype(np.float32)
        store = open_store(IndexConfig(location=str(index), full_scan_threshold_kb=1))
        try:
            build_user_index(
                store,
                users,
                vecs,
                user_payloads(users, [ds.users.to_external(int(u)) for u in users]),
                model_version=f"m{seed}",
            )
        finally:
            store.close()
    # the byte search below sees the collection's payloads: the id is in its files now
    assert victim.encode() in _all_bytes(index)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [
            sys.executable, "-m", "ecomrec", "customers", "forget", victim,
            "--dataset", str(data), "--event-log", str(log_path),
            "--artifacts", str(exports), "--key", KEY, "--index", str(index),
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert victim not in res.stdout  # the receipt names the tombstone, not the id
    assert f"removed {n_victim:>8,}  events in dataset" in res.stdout
    assert "removed        3  events in the live log" in res.stdout
    assert not scores.exists()
    assert "removed        1  points in user collection 'users'" in res.stdout

    # search every artifact for the id and its pseudonyms
    needles = [victim, *pseudonymise([victim], KEY)]
    blob = _all_bytes(data, exports, tmp_path)  # the log file included
    text = _parquet_text(data, exports)
    for n in needles:
        assert n.encode() not in blob, n
        assert n not in text, n
    # the others are untouched
    after = Dataset.load(data)
    assert after.events.height == ds.events.height - n_victim
    assert after.users.get(other) == 6 and after.users.get(victim) is None
    assert pl.read_parquet(exports / "audience.parquet").height == 9
    with SqliteEventLog(log_path) as log:
        assert [s.event.customer_id for s in log.read()] == [other]
    # the user vectors: one version left (the live one), without the customer's point and
    # payload; every other customer's point kept with its vector
    store = open_store(IndexConfig(location=str(index)))
    try:
        versions = store.versions("users")
        assert [m.version for m in versions] == [store.alias_target("users")]
        got_ids, got_ext = [], []
        for ids, _, payloads in store.scroll_all(versions[0].version, with_vectors=False):
            got_ids += np.asarray(ids).tolist()
            got_ext += [p["external_id"] for p in payloads]
    finally:
        store.close()
    assert sorted(got_ids) == [u for u in range(1, 61) if u != 5]
    assert victim not in got_ext and other in got_ext and len(got_ext) == 59

    # a later import into the same folder cannot bring them back; events made after the
    # request (a new consent) are kept
    at = next(iter(Tombstones.read(data).entries.values()))
    late = ds.events.head(1).with_columns(
        pl.lit(5).cast(ds.events["user_id"].dtype).alias("user_id"),
        pl.lit(at + 100).cast(ds.events["ts"].dtype).alias("ts"),
    )
    again = dataclasses.replace(ds, events=pl.concat([ds.events, late]))
    again.save(data)
    reloaded = Dataset.load(data)
    assert reloaded.users.get(victim) is None
    assert reloaded.events.filter(pl.col("user_id") == 5)["ts"].to_list() == [at + 100]
    assert victim.encode() not in _all_bytes(data)
