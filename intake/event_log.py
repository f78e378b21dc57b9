"""A generated shop event log of any size, written chunk by chunk as partitioned Parquet.

The raw event-log contract (string ids, one row per event):
``customer_id, product_id, timestamp, event_type (view|cart|purchase|return), quantity,
price, order_id, session_id``. The log is a directory of ``day=YYYY-MM-DD/part-N.parquet``
files (hive partitioning), the layout a warehouse export or a streaming sink writes.

The generator never holds more than one chunk: chunk ``k`` covers the ``k``-th slice of
the time range, so a customer's events are spread over many files, as in a real log.
Products have a power-law popularity and a fixed price; each customer prefers one of
``n_categories`` categories (``p_taste`` of their events).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ecomrec.errors import ConfigError
from intake.loaders.contract import EVENT_COLUMNS

# the shop data contract's event columns (docs/data.md), in file order
EVENT_LOG_COLUMNS = EVENT_COLUMNS

_TYPES = np.array(["view", "cart", "purchase", "return"])
_TYPE_P = np.array([0.70, 0.15, 0.12, 0.03])


@dataclass(frozen=True)
class EventLogConfig:
    """Size and shape of a generated event log."""

    rows: int = 1_000_000
    customers: int = 0  # 0 = rows / 50
    products: int = 0  # 0 = rows / 500 (at least 100)
    n_categories: int = 50
    p_taste: float = 0.8
    chunk_rows: int = 2_000_000
    days: int = 365
    start: str = "2025-01-01"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.chunk_rows < 1:
            raise ConfigError("rows and chunk_rows must be >= 1")

    @property
    def n_customers(self) -> int:
        return self.customers or max(10, self.rows // 50)

    @property
    def n_products(self) -> int:
        return self.products or max(100, self.rows // 500)


def _chunk(cfg: EventLogConfig, k: int, n: int, t0: int, t1: int) -> pl.DataFrame:
    rng = np.random.default_rng([cfg.seed, k])
    nc, npr, ncat = cfg.n_customers, cfg.n_products, cfg.n_categories
    cust = rng.integers(0, nc, n)
    # power-law popularity inside each category; customers mostly buy their category
    fav = (cust * 2654435761) % ncat
    cat = np.where(rng.random(n) < cfg.p_taste, fav, rng.integers(0, ncat, n))
    per_cat = max(1, npr // ncat)
    rank = np.minimum((per_cat * rng.random(n) ** 3).astype(np.int64), per_cat - 1)
    prod = np.minimum(cat + ncat * rank, npr - 1)
    ts = np.sort(rng.integers(t0, t1, n))
    etype = rng.choice(len(_TYPES), n, p=_TYPE_P)
    price = np.round(2.0 + (prod * 7919 % 9000) / 100.0, 2)
    frame = pl.DataFrame(
        {
            "c": cust,
            "p": prod,
            "ts": ts,
            "e": etype.astype(np.int8),
            "quantity": rng.integers(1, 4, n).astype(np.int32),
            "price": price,
        }
    )
    return frame.select(
        pl.format("C{}", pl.col("c").cast(pl.Utf8).str.zfill(9)).alias("customer_id"),
        pl.format("P{}", pl.col("p").cast(pl.Utf8).str.zfill(8)).alias("product_id"),
        pl.from_epoch(pl.col("ts"), time_unit="s").alias("timestamp"),
        pl.col("e")
        .replace_strict(dict(enumerate(_TYPES.tolist())), return_dtype=pl.Utf8)
        .alias("event_type"),
        "quantity",
        "price",
        pl.when(pl.col("e") == 2)
        .then(pl.format("O{}-{}", pl.lit(k), pl.int_range(pl.len())))
        .otherwise(None)
        .alias("order_id"),
        pl.format("S{}-{}", pl.col("c"), pl.col("ts") // 1800).alias("session_id"),
    )


def write_event_log(out_dir: str | Path, cfg: EventLogConfig, progress: bool = True) -> list[Path]:
    """Write the log under ``out_dir`` (one file per chunk, partitioned by day); returns the files."""
    out = Path(out_dir)
    t_start = int(dt.datetime.fromisoformat(cfg.start).replace(tzinfo=dt.UTC).timestamp())
    span = cfg.days * 86400
    n_chunks = math.ceil(cfg.rows / cfg.chunk_rows)
    files = []
    for k in tqdm(range(n_chunks), desc="event log", disable=not progress):
        n = min(cfg.chunk_rows, cfg.rows - k * cfg.chunk_rows)
        t0 = t_start + span * k // n_chunks
        t1 = max(t0 + 1, t_start + span * (k + 1) // n_chunks)
        day = dt.datetime.fromtimestamp(t0, dt.UTC).date().isoformat()
        path = out / f"day={day}" / f"part-{k:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        _chunk(cfg, k, n, t0, t1).write_parquet(path, row_group_size=256_000)
        files.append(path)
    return files
