"""Ingest an event log bigger than memory: the data contract, read in streaming.

Input: anything ``ecomrec data import --events`` accepts (docs/data.md): a CSV, a Parquet
file or a folder of (hive-partitioned) Parquet files, with the same column mapping, time-
zone rule, returns rule, non-product codes and drop report (:class:`ContractOptions`). The
files are read chunk by chunk by the contract's own reader
(:func:`intake.loaders.contract.iter_events`) and cleaned by its own
:func:`~intake.loaders.contract.clean_events`, so a file gives the same events on both
roads. Output directory::

    customers.parquet   user_id (1..n, dense, sorted by customer_id), customer_id
    products.parquet    item_id (1..n), product_id (+ title/category/brand/price seen on events)
    events/bucket=K/    canonical events (intake.schema.EVENTS_SCHEMA), users bucketed by user_id % buckets
    sequences/bucket-K.parquet  one row per user: user_id, items, ts, event_type (lists, time order)
    ingest.json         config, counts, drop report, seconds per phase

Every pass over the data is a streaming query (``collect_batches`` / ``sink_parquet`` /
``collect(engine="streaming")``): the log is parsed in chunks of ``chunk_rows`` into a
scratch folder (removed at the end), never loaded whole. The only in-memory sort is per user
bucket (``rows / buckets`` events), which is what bounds peak memory; raise ``buckets`` for
bigger logs. :func:`towers.sequences.load_sequences` turns the sequences into
:class:`towers.sequences.Interactions` when they fit in memory (training input).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from ecomrec.errors import ConfigError, DataError
from intake.loaders.contract import (
    EVENT_ATTRIBUTES,
    ContractOptions,
    filter_rows,
    iter_events,
    latest_values,
    merge_lines,
    product_attributes,
)
from intake.schema import EVENT_TYPE_IDS, DropReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestConfig:
    """How the log is split for the one in-memory step (the per-bucket sort)."""

    buckets: int = 32
    max_len: int = 0  # keep each user's newest max_len events in sequences; 0 = all
    chunk_rows: int = 500_000  # rows parsed at a time
    progress: bool = True

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.max_len < 0 or self.chunk_rows < 1:
            raise ConfigError("buckets and chunk_rows must be >= 1 and max_len >= 0")


@dataclass
class IngestResult:
    """What an ingest wrote (also saved as ``ingest.json``)."""

    rows: int  # events kept (after drops and summed lines)
    customers: int
    products: int
    buckets: int
    rows_in: int = 0  # rows read
    report: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def parse_log(
    src: str | Path,
    scratch: Path,
    options: ContractOptions | None = None,
    chunk_rows: int = 500_000,
    buckets: int = 32,
    report: DropReport | None = None,
) -> DropReport:
    """Validate and parse every row of the log (chunked) into ``scratch/c=K/`` parts, one
    folder per customer bucket (a hash of the customer id), so that everything that
    compares rows (repeated order lines, duplicate views) meets in one bucket.

    A bad value raises the contract's :class:`DataError` naming the file, the row (CSV:
    line) and the column; ``report`` gets the row count and the parse notes.
    """
    options = options or ContractOptions()
    report = report or DropReport(str(Path(src).expanduser()))
    for k, chunk in enumerate(iter_events(src, options, report, chunk_rows)):
        bucket = (pl.col("_customer").hash(seed=0) % buckets).alias("_c")
        for (b,), part in chunk.with_columns(bucket).partition_by("_c", as_dict=True).items():
            d = scratch / f"c={b}"
            d.mkdir(parents=True, exist_ok=True)
            part.drop("_c").write_parquet(d / f"part-{k:05d}.parquet", compression="lz4")
    return report


def validate_event_log(src: str | Path, options: ContractOptions | None = None) -> int:
    """Check every row (the contract's parse, chunk by chunk); returns the row count."""
    report = DropReport(str(src))
    for _ in iter_events(src, options or ContractOptions(), report, 500_000):
        pass
    return report.rows_in


def _id_map(lf: pl.LazyFrame, col: str, new: str) -> pl.DataFrame:
    ids = lf.select(pl.col(col).unique()).collect(engine="streaming").sort(col)
    return ids.with_row_index(new, offset=1).with_columns(pl.col(new).cast(pl.Int32))


def ingest_event_log(
    src: str | Path,
    out_dir: str | Path,
    cfg: IngestConfig = IngestConfig(),
    options: ContractOptions | None = None,
) -> IngestResult:
    """Parse and clean the log (the data contract), map ids, write canonical events and
    per-user sequences, all streaming. Nothing is written under ``events/`` from a bad log."""
    options = options or ContractOptions()
    out = Path(out_dir)
    sec: dict[str, float] = {}
    scratch = out / "_parsed"
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        t = time.perf_counter()
        report = parse_log(src, scratch / "rows", options, cfg.chunk_rows, cfg.buckets)
        sec["parse"] = time.perf_counter() - t

        # clean bucket by bucket: the one in-memory step here (rows / buckets events)
        t = time.perf_counter()
        (scratch / "clean").mkdir()
        attrs = [*EVENT_ATTRIBUTES, "price"]
        latest: dict[str, list[pl.DataFrame]] = {a: [] for a in attrs}
        bucket_dirs = sorted((scratch / "rows").glob("c=*"))
        for bdir in tqdm(bucket_dirs, desc="clean", disable=not cfg.progress):
            kept = filter_rows(pl.read_parquet(bdir / "*.parquet"), options, report)
            merge_lines(kept, report).write_parquet(
                scratch / "clean" / f"{bdir.name}.parquet", compression="lz4"
            )
            for a, part in latest_values(kept, attrs).items():
                latest[a].append(part)
            del kept
        lf = pl.scan_parquet(scratch / "clean" / "*.parquet")
        rows = int(lf.select(pl.len()).collect(engine="streaming").item())
        if rows == 0:
            raise DataError(
                f"no events left after validation ({report.rows_dropped:,} dropped: "
                f"{report.dropped})",
                file=report.source,
            )
        sec["clean"] = time.perf_counter() - t

        t = time.perf_counter()
        customers = _id_map(lf, "_customer", "user_id").rename({"_customer": "customer_id"})
        products = _id_map(lf, "_product", "item_id").rename({"_product": "product_id"})
        parts = {a: latest_values(pl.concat(v), [a])[a] for a, v in latest.items() if v}
        parts = {a: p for a, p in parts.items() if p.height}
        if parts:
            products = products.join(
                product_attributes(parts, products["product_id"]).rename(
                    {"external_id": "product_id"}
                ),
                on="product_id",
                how="left",
            )
        out.mkdir(parents=True, exist_ok=True)
        customers.select("user_id", "customer_id").write_parquet(out / "customers.parquet")
        products.write_parquet(out / "products.parquet")
        sec["id_maps"] = time.perf_counter() - t

        t = time.perf_counter()
        events_dir = out / "events"
        if events_dir.exists():
            for old in events_dir.rglob("*.parquet"):
                old.unlink()
        (
            lf.join(customers.lazy().rename({"customer_id": "_customer"}), on="_customer")
            .join(
                products.lazy().select("item_id", pl.col("product_id").alias("_product")),
                on="_product",
            )
            .select(
                "user_id",
                "item_id",
                "ts",
                "event_type",
                pl.col("quantity").cast(pl.Int32),
                "price",
                pl.col("_row").alias("order"),
                (pl.col("user_id") % cfg.buckets).alias("bucket"),
            )
            .sink_parquet(pl.PartitionBy(events_dir, key="bucket", include_key=False), mkdir=True)
        )
        sec["events"] = time.perf_counter() - t
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

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

    res = IngestResult(
        rows, customers.height, products.height, cfg.buckets, report.rows_in, report.to_dict(), sec
    )
    (out / "ingest.json").write_text(json.dumps({"config": asdict(cfg), **asdict(res)}, indent=2))
    log.info(
        "ingested %d rows: %d customers, %d products (%s)", rows, res.customers, res.products, sec
    )
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m intake.ingest EVENTS OUT_DIR``: ingest an event log (streaming)."""
    import argparse

    from intake.cli import add_contract_arguments, contract_options

    ap = argparse.ArgumentParser(
        prog="python -m intake.ingest",
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "log_dir",
        help="events in the data contract: a .csv/.tsv, a .parquet or a folder of .parquet files",
    )
    ap.add_argument("out_dir", help="output directory (id maps, events, sequences)")
    ap.add_argument(
        "--buckets", type=int, default=IngestConfig.buckets, help="user buckets (bounds memory)"
    )
    ap.add_argument("--max-len", type=int, default=0, help="newest events kept per user (0 = all)")
    ap.add_argument(
        "--chunk-rows", type=int, default=IngestConfig.chunk_rows, help="rows parsed at a time"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_contract_arguments(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = IngestConfig(
        buckets=a.buckets, max_len=a.max_len, chunk_rows=a.chunk_rows, progress=not a.no_progress
    )
    opts = contract_options(a, Path(a.out_dir).name)
    res = ingest_event_log(a.log_dir, a.out_dir, cfg, opts)
    print(json.dumps(asdict(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
