"""Ingest an event log bigger than memory: polars lazy/streaming, bounded peak memory.

Input: a directory of Parquet files (hive-partitioned or not) in the raw event-log
contract (:data:`intake.event_log.EVENT_LOG_COLUMNS`: string ``customer_id`` /
``product_id``, ``timestamp`` as datetime, date, ISO string or unix seconds,
``event_type`` in view|cart|purchase|return, ``quantity``, ``price``, ``order_id``,
``session_id``). Output directory::

    customers.parquet   user_id (1..n, dense, sorted by customer_id), customer_id
    products.parquet    item_id (1..n), product_id
    events/bucket=K/    canonical events (intake.schema.EVENTS_SCHEMA), users bucketed by user_id % buckets
    sequences/bucket-K.parquet  one row per user: user_id, items, ts, event_type (lists, time order)
    ingest.json         config, counts, seconds per phase

Every pass is a streaming query (``collect(engine="streaming")`` / ``sink_parquet``): the
log is read in morsels, never loaded whole. The only in-memory sort is per user bucket
(``rows / buckets`` events), which is what bounds peak memory; raise ``buckets`` for
bigger logs. :func:`towers.sequences.load_sequences` turns the sequences into
:class:`towers.sequences.Interactions` when they fit in memory (training input).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from ecomrec.errors import ConfigError, DataError
from intake.schema import EVENT_TYPE_IDS, EVENT_TYPES

log = logging.getLogger(__name__)

REQUIRED = ("customer_id", "product_id", "timestamp", "event_type", "quantity", "price")


@dataclass(frozen=True)
class IngestConfig:
    """How the log is split for the one in-memory step (the per-bucket sort)."""

    buckets: int = 32
    max_len: int = 0  # keep each user's newest max_len events in sequences; 0 = all
    progress: bool = True

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.max_len < 0:
            raise ConfigError("buckets must be >= 1 and max_len >= 0")


@dataclass
class IngestResult:
    """What an ingest wrote (also saved as ``ingest.json``)."""

    rows: int
    customers: int
    products: int
    buckets: int
    seconds: dict[str, float] = field(default_factory=dict)


def _files(src: Path) -> list[Path]:
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files:
        raise DataError("no .parquet files in the event log directory", file=str(src))
    return files


def _timestamp_seconds(dtype: pl.DataType, source: str) -> pl.Expr:
    c = pl.col("timestamp")
    if isinstance(dtype, pl.Datetime):
        return c.dt.epoch("s")
    if isinstance(dtype, pl.Date):
        return c.cast(pl.Datetime("ms")).dt.epoch("s")
    if dtype.is_integer():
        return c.cast(pl.Int64)
    if dtype == pl.Utf8:
        return c.str.to_datetime(strict=False).dt.epoch("s")
    raise DataError(f"timestamp has type {dtype}", file=source, column="timestamp")


def scan_event_log(src: str | Path) -> pl.LazyFrame:
    """The log as a lazy frame with the contract's columns typed: ``ts`` = unix seconds.

    Raises :class:`DataError` naming the file and column when a required column is missing.
    """
    files = _files(Path(src))
    for f in (files[0], files[-1]):  # cheap schema check at both ends of the log
        schema = pl.read_parquet_schema(f)
        missing = [c for c in REQUIRED if c not in schema]
        if missing:
            raise DataError(
                f"missing required column(s) {missing}; found {list(schema)}",
                file=str(f),
                column=missing[0],
            )
    lf = pl.scan_parquet(files, hive_partitioning=False, missing_columns="insert")
    schema = lf.collect_schema()
    opt = [
        pl.col(c).cast(pl.Utf8) if c in schema else pl.lit(None, pl.Utf8).alias(c)
        for c in ("order_id", "session_id")
    ]
    return lf.select(
        pl.col("customer_id").cast(pl.Utf8),
        pl.col("product_id").cast(pl.Utf8),
        _timestamp_seconds(schema["timestamp"], str(files[0])).alias("ts"),
        pl.col("event_type").cast(pl.Utf8).str.to_lowercase(),
        pl.col("quantity").cast(pl.Int32, strict=False),
        pl.col("price").cast(pl.Float64, strict=False),
        *opt,
    )


def _violations() -> dict[str, pl.Expr]:
    def blank(c: str) -> pl.Expr:
        return pl.col(c).is_null() | (pl.col(c).str.len_bytes() == 0)

    return {
        "customer_id": blank("customer_id"),
        "product_id": blank("product_id"),
        "timestamp": pl.col("ts").is_null(),
        "event_type": ~pl.col("event_type").is_in(list(EVENT_TYPES)).fill_null(False),
        "quantity": pl.col("quantity").is_null() | (pl.col("quantity") <= 0),
        "price": (pl.col("price") < 0).fill_null(False),
    }


def validate_event_log(src: str | Path) -> int:
    """Check every row in one streaming pass; returns the row count.

    On a bad row raises :class:`DataError` with the file, the row inside that file and
    the column (found by a second pass over the files, one at a time).
    """
    checks = _violations()
    counts = (
        scan_event_log(src)
        .select(pl.len().alias("_rows"), *[e.sum().alias(c) for c, e in checks.items()])
        .collect(engine="streaming")
        .row(0, named=True)
    )
    bad = [c for c in checks if counts[c]]
    if not bad:
        return int(counts["_rows"])
    col = bad[0]
    for f in _files(Path(src)):
        rows = (
            scan_event_log(f)
            .with_row_index("_row")
            .filter(checks[col])
            .select("_row", "customer_id", "product_id", "event_type", "quantity", "price")
            .head(1)
            .collect()
        )
        if rows.height:
            r = rows.row(0, named=True)
            raise DataError(
                f"{counts[col]} bad value(s) in the log, first: {r}",
                file=str(f),
                row=int(r["_row"]),
                column=col,
            )
    raise DataError(f"{counts[col]} bad value(s)", file=str(src), column=col)  # pragma: no cover


def _id_map(lf: pl.LazyFrame, col: str, new: str) -> pl.DataFrame:
    ids = lf.select(pl.col(col).unique()).collect(engine="streaming").sort(col)
    return ids.with_row_index(new, offset=1).with_columns(pl.col(new).cast(pl.Int32))


def ingest_event_log(
    src: str | Path, out_dir: str | Path, cfg: IngestConfig = IngestConfig()
) -> IngestResult:
    """Validate the log, map ids, write canonical events and per-user sequences (streaming)."""
    out = Path(out_dir)
    sec: dict[str, float] = {}
    t = time.perf_counter()
    rows = validate_event_log(src)  # before anything is written
    sec["validate"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    lf = scan_event_log(src)
    customers = _id_map(lf, "customer_id", "user_id")
    products = _id_map(lf, "product_id", "item_id")
    customers.select("user_id", "customer_id").write_parquet(out / "customers.parquet")
    products.select("item_id", "product_id").write_parquet(out / "products.parquet")
    sec["id_maps"] = time.perf_counter() - t

    t = time.perf_counter()
    events_dir = out / "events"
    if events_dir.exists():
        for old in events_dir.rglob("*.parquet"):
            old.unlink()
    (
        lf.with_row_index("order")
        .join(customers.lazy(), on="customer_id")
        .join(products.lazy(), on="product_id")
        .select(
            "user_id",
            "item_id",
            "ts",
            "event_type",
            "quantity",
            "price",
            pl.col("order").cast(pl.Int64),
            (pl.col("user_id") % cfg.buckets).alias("bucket"),
        )
        .sink_parquet(pl.PartitionBy(events_dir, key="bucket", include_key=False), mkdir=True)
    )
    sec["events"] = time.perf_counter() - t

    t = time.perf_counter()
    seq_dir = out / "sequences"
    seq_dir.mkdir(exist_ok=True)
    for old in seq_dir.glob("*.parquet"):
        old.unlink()
    bucket_dirs = sorted(events_dir.glob("bucket=*"))
    for bdir in tqdm(bucket_dirs, desc="sequences", disable=not cfg.progress):
        k = int(bdir.name.split("=", 1)[1])
        ev = pl.read_parquet(
            bdir / "*.parquet", columns=["user_id", "item_id", "ts", "event_type", "order"]
        )
        ev = ev.sort(["user_id", "ts", "order"])
        agg = [
            pl.col("item_id").alias("items"),
            pl.col("ts"),
            pl.col("event_type").replace_strict(EVENT_TYPE_IDS, return_dtype=pl.Int8),
        ]
        seq = ev.group_by("user_id", maintain_order=True).agg(
            [a.tail(cfg.max_len) for a in agg] if cfg.max_len else agg
        )
        seq.write_parquet(seq_dir / f"bucket-{k:04d}.parquet")
        del ev, seq
    sec["sequences"] = time.perf_counter() - t

    res = IngestResult(rows, customers.height, products.height, cfg.buckets, sec)
    (out / "ingest.json").write_text(json.dumps({"config": asdict(cfg), **asdict(res)}, indent=2))
    log.info(
        "ingested %d rows: %d customers, %d products (%s)", rows, res.customers, res.products, sec
    )
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m intake.ingest LOG_DIR OUT_DIR``: ingest a Parquet event log (streaming)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m intake.ingest",
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("log_dir", help="directory of Parquet files in the event-log contract")
    ap.add_argument("out_dir", help="output directory (id maps, events, sequences)")
    ap.add_argument(
        "--buckets", type=int, default=IngestConfig.buckets, help="user buckets (bounds memory)"
    )
    ap.add_argument("--max-len", type=int, default=0, help="newest events kept per user (0 = all)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = IngestConfig(buckets=a.buckets, max_len=a.max_len, progress=not a.no_progress)
    res = ingest_event_log(a.log_dir, a.out_dir, cfg)
    print(json.dumps(asdict(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
