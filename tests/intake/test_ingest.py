"""Streaming ingest of a partitioned-Parquet event log: parity with the in-memory path, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecomrec.errors import DataError
from intake.event_log import EVENT_LOG_COLUMNS, EventLogConfig, write_event_log
from intake.ingest import IngestConfig, ingest_event_log, validate_event_log
from intake.schema import EVENT_TYPE_IDS
from towers.sequences import Interactions, load_sequences


@pytest.fixture(scope="module")
def event_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("log")
    write_event_log(d, EventLogConfig(rows=30_000, chunk_rows=7_000, days=30), progress=False)
    return d


def reference(log_dir: Path) -> Interactions:
    """The same log through the eager, in-memory path."""
    files = sorted(log_dir.rglob("*.parquet"))
    ev = pl.concat([pl.read_parquet(f) for f in files]).with_row_index("order")
    users = ev["customer_id"].unique().sort().to_list()
    items = ev["product_id"].unique().sort().to_list()
    umap = {c: i + 1 for i, c in enumerate(users)}
    imap = {p: i + 1 for i, p in enumerate(items)}
    canon = ev.select(
        pl.col("customer_id").replace_strict(umap, return_dtype=pl.Int32).alias("user_id"),
        pl.col("product_id").replace_strict(imap, return_dtype=pl.Int32).alias("item_id"),
        pl.col("timestamp").dt.epoch("s").alias("ts"),
        "event_type",
        pl.col("order").cast(pl.Int64),
    )
    return Interactions.from_events(canon, len(users), len(items))


def test_streaming_ingest_equals_the_in_memory_path(event_log: Path, tmp_path: Path) -> None:
    assert set(pl.read_parquet_schema(next(event_log.rglob("*.parquet")))) == set(EVENT_LOG_COLUMNS)
    assert len(list(event_log.glob("day=*"))) == 5  # one partition per chunk
    res = ingest_event_log(event_log, tmp_path, IngestConfig(buckets=4, progress=False))
    assert res.rows == 30_000
    got, ref = load_sequences(tmp_path), reference(event_log)
    assert (got.n_users, got.n_items) == (ref.n_users, ref.n_items) == (res.customers, res.products)
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.items, ref.items)
    np.testing.assert_array_equal(got.ts, ref.ts)
    np.testing.assert_array_equal(got.event_type, ref.event_type)
    # canonical events are complete and bucketed by user
    ev = pl.read_parquet(tmp_path / "events" / "bucket=3" / "*.parquet")
    assert ev.height > 0 and (ev["user_id"] % 4 == 3).all()
    assert (
        pl.scan_parquet(tmp_path / "events" / "**" / "*.parquet").select(pl.len()).collect().item()
        == 30_000
    )
    ids = pl.read_parquet(tmp_path / "customers.parquet")
    assert ids["customer_id"].is_sorted() and ids["user_id"].to_list()[:2] == [1, 2]


def test_max_len_keeps_each_users_newest_events(event_log: Path, tmp_path: Path) -> None:
    ingest_event_log(event_log, tmp_path, IngestConfig(buckets=2, max_len=3, progress=False))
    got, ref = load_sequences(tmp_path), reference(event_log)
    u = int(np.argmax(ref.lengths()))
    assert ref.lengths()[u] > 3 and got.lengths()[u] == 3
    np.testing.assert_array_equal(
        got.items[got.indptr[u] : got.indptr[u + 1]],
        ref.items[ref.indptr[u + 1] - 3 : ref.indptr[u + 1]],
    )
    assert set(np.unique(got.event_type)) <= set(EVENT_TYPE_IDS.values())


def test_a_bad_row_is_named_by_file_row_and_column(event_log: Path, tmp_path: Path) -> None:
    files = sorted(event_log.rglob("*.parquet"))
    for i, f in enumerate(files):
        df = pl.read_parquet(f)
        if i == 2:
            df = df.with_columns(
                pl.when(pl.int_range(pl.len()) == 17)
                .then(pl.lit("wishlist"))
                .otherwise(pl.col("event_type"))
                .alias("event_type")
            )
        (tmp_path / "log" / f.parent.name).mkdir(parents=True, exist_ok=True)
        df.write_parquet(tmp_path / "log" / f.parent.name / f.name)
    with pytest.raises(DataError) as e:
        validate_event_log(tmp_path / "log")
    msg = str(e.value)
    assert files[2].name in msg and "row 17" in msg and "event_type" in msg and "wishlist" in msg
    with pytest.raises(DataError):
        ingest_event_log(tmp_path / "log", tmp_path / "out", IngestConfig(progress=False))
    assert not (tmp_path / "out" / "events").exists()  # nothing written from a bad log


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    pl.DataFrame({"customer_id": ["a"], "product_id": ["b"], "quantity": [1]}).write_parquet(
        tmp_path / "x.parquet"
    )
    with pytest.raises(DataError, match="timestamp"):
        validate_event_log(tmp_path)
