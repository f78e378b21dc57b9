"""S3-Rec sequential format: ``<Name>.txt`` (+ ``_time.txt``, ``_p5_datamaps.json``, ``_items.csv``).

``<Name>.txt`` has one line per user, ``user_id item_id item_id ...`` with 1-based ids in
time order; ids are kept as they are so results compare with published numbers.
Works for any category in this format given its path prefix.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import polars as pl

from ecomrec.errors import DataError
from intake.dataset import Dataset, IdMap
from intake.schema import DropReport


def _read_lines(path: Path, what: str) -> list[list[int]]:
    rows: list[list[int]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                    file=str(path),
                    line=lineno,
                ) from None
            parts = line.split()
            if not parts:
                continue
            try:
                rows.append([int(p) for p in parts])
            except ValueError:
                bad = next(i for i, p in enumerate(parts) if not p.lstrip("-").isdigit())
                raise DataError(
                    f"non-integer {what} {parts[bad]!r}",
                    file=str(path),
                    line=lineno,
                    column="user_id" if bad == 0 else f"{what}[{bad}]",
                ) from None
    return rows


def load_s3rec(prefix: str | Path, name: str | None = None) -> Dataset:
    """Load ``<prefix>.txt`` and whatever side files exist next to it."""
    prefix = Path(str(prefix).removesuffix(".txt"))
    seq_path = prefix.with_name(prefix.name + ".txt")
    if not seq_path.exists():
        raise DataError("sequence file not found", file=str(seq_path))
    name = name or prefix.name.lower()
    report = DropReport(str(seq_path))
    seqs = _read_lines(seq_path, "item_id")
    report.rows_in = sum(len(s) - 1 for s in seqs)
    if not seqs:
        raise DataError("file is empty (no user sequences)", file=str(seq_path))

    for lineno, s in enumerate(seqs, start=1):
        if len(s) < 2:
            raise DataError("user has no items", file=str(seq_path), line=lineno, column="item_id")
        if min(s[1:]) < 1:
            raise DataError(
                "item ids must be >= 1", file=str(seq_path), line=lineno, column="item_id"
            )
    user_ids = np.array([s[0] for s in seqs], dtype=np.int64)
    if len(np.unique(user_ids)) != len(user_ids):
        dup = int(user_ids[np.flatnonzero(np.diff(np.sort(user_ids)) == 0)[0]])
        raise DataError(f"duplicate user id {dup}", file=str(seq_path), column="user_id")

    time_path = prefix.with_name(prefix.name + "_time.txt")
    has_time = time_path.exists()
    if has_time:
        tseqs = _read_lines(time_path, "ts")
        if len(tseqs) != len(seqs):
            raise DataError(
                f"time file has {len(tseqs)} lines, sequence file {len(seqs)}",
                file=str(time_path),
            )
        for lineno, (s, t) in enumerate(zip(seqs, tseqs), start=1):
            if t[0] != s[0]:
                raise DataError(
                    f"user id {t[0]} does not match {s[0]} in {seq_path.name}",
                    file=str(time_path),
                    line=lineno,
                    column="user_id",
                )
            if len(t) != len(s):
                raise DataError(
                    f"{len(t) - 1} timestamps for {len(s) - 1} items (misaligned time file)",
                    file=str(time_path),
                    line=lineno,
                    column="ts",
                )
        ts = np.concatenate([np.asarray(t[1:], dtype=np.int64) for t in tseqs])
    else:
        # No time file: one synthetic day per position keeps the order usable.
        ts = np.concatenate([np.arange(len(s) - 1, dtype=np.int64) * 86400 for s in seqs])
        report.note("no time file: synthetic timestamps (1 day per position)", len(ts))

    lens = np.array([len(s) - 1 for s in seqs])
    items = np.concatenate([np.asarray(s[1:], dtype=np.int32) for s in seqs])
    events = pl.DataFrame(
        {
            "user_id": np.repeat(user_ids, lens).astype(np.int32),
            "item_id": items,
            "ts": ts,
            "event_type": "purchase",
            "quantity": np.ones(len(items), np.int32),
            "price": pl.Series([None] * len(items), dtype=pl.Float64),
            "order": np.arange(len(items), dtype=np.int64),
        }
    )
    n_users = int(user_ids.max())
    n_items = int(items.max())

    maps_path = prefix.with_name(prefix.name + "_p5_datamaps.json")
    user_ext = [str(i) for i in range(1, n_users + 1)]
    item_ext = [str(i) for i in range(1, n_items + 1)]
    if maps_path.exists():
        maps = json.loads(maps_path.read_text())
        try:
            id2user, id2item = maps["id2user"], maps["id2item"]
        except KeyError as e:
            raise DataError(f"missing key {e}", file=str(maps_path)) from e
        user_ext = [id2user.get(str(i), f"user-{i}") for i in range(1, n_users + 1)]
        item_ext = [id2item.get(str(i), f"item-{i}") for i in range(1, n_items + 1)]
        if len(id2item) > n_items:  # catalogue items never interacted with
            n_items = max(int(k) for k in id2item)
            item_ext = [id2item.get(str(i), f"item-{i}") for i in range(1, n_items + 1)]

    items_frame = pl.DataFrame(
        {"item_id": np.arange(1, n_items + 1, dtype=np.int32), "external_id": item_ext}
    )
    csv_path = prefix.with_name(prefix.name + "_items.csv")
    if csv_path.exists():
        items_frame = _join_item_text(items_frame, csv_path, report)

    return Dataset(
        name=name,
        events=events,
        items=items_frame,
        users=IdMap(user_ext),
        item_ids=IdMap(item_ext),
        report=report,
        extra={"format": "s3rec", "prefix": str(prefix), "has_time": has_time},
    )


def _unescape(s: pl.Expr) -> pl.Expr:
    return s.map_elements(
        lambda x: html.unescape(x) if x is not None else None, return_dtype=pl.Utf8
    )


def _join_item_text(items: pl.DataFrame, path: Path, report: DropReport) -> pl.DataFrame:
    try:
        text = pl.read_csv(path, schema_overrides={"item_id": pl.Int32}, infer_schema_length=0)
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot parse item CSV: {e}", file=str(path)) from e
    if "item_id" not in text.columns:
        raise DataError("missing column", file=str(path), column="item_id")
    text = text.with_columns(pl.col("item_id").cast(pl.Int32, strict=False))
    bad = text.with_row_index().filter(pl.col("item_id").is_null())
    if bad.height:
        raise DataError(
            "item_id is not an integer",
            file=str(path),
            row=int(bad["index"][0]) + 2,
            column="item_id",
        )
    cols = {"title": "title", "brand": "brand", "categories": "category"}  # + raw "categories"
    sel = [pl.col("item_id")]
    for src, dst in cols.items():
        if src in text.columns:
            sel.append(_unescape(pl.col(src)).alias(dst))
    if "categories" in text.columns:
        sel.append(_unescape(pl.col("categories")).alias("categories"))
    text = text.select(sel)
    if "brand" in text.columns:
        n_unknown = text.filter(pl.col("brand") == "Unknown").height
        report.note("brand 'Unknown' treated as missing", n_unknown)
        text = text.with_columns(
            pl.when(pl.col("brand") == "Unknown")
            .then(None)
            .otherwise(pl.col("brand"))
            .alias("brand")
        )
    if "category" in text.columns:
        # several category paths are joined by ' | '; keep the first path's leaf-most path whole
        text = text.with_columns(pl.col("category").str.split(" | ").list.first().alias("category"))
    return items.join(text, on="item_id", how="left")
