"""A shop's own event log and catalogue from Parquet or CSV, through a column mapping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from towers.dataset import Dataset, IdMap, map_ids
from towers.errors import DataError
from towers.schema import EVENT_TYPES, DropReport, require_columns


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column holds each canonical field (None: absent, a default is used)."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"
    event_type: str | None = None
    quantity: str | None = None
    price: str | None = None
    ts_format: str | None = None  # strftime format for string times; None: ISO or unix seconds


@dataclass(frozen=True)
class ItemColumnMapping:
    item_id: str = "item_id"
    title: str | None = "title"
    brand: str | None = "brand"
    category: str | None = "category"
    price: str | None = "price"


def read_table(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise DataError("file not found", file=str(path))
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        if path.suffix in (".csv", ".tsv", ".txt"):
            return pl.read_csv(
                path, separator="\t" if path.suffix == ".tsv" else ",", infer_schema_length=10000
            )
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot read: {e}", file=str(path)) from e
    raise DataError(
        f"unsupported file type {path.suffix!r} (want .parquet, .csv or .tsv)", file=str(path)
    )


def _first_bad_row(mask: pl.Series) -> int:
    return int(mask.arg_true()[0])


def _parse_ts(col: pl.Series, fmt: str | None, file: str, name: str) -> pl.Series:
    if col.dtype.is_integer():
        return col.cast(pl.Int64)
    if col.dtype.is_float():
        return col.cast(pl.Int64)
    if col.dtype in (pl.Datetime, pl.Date) or isinstance(col.dtype, pl.Datetime | pl.Date):
        return col.cast(pl.Datetime("us")).dt.epoch("s")
    s = col.cast(pl.Utf8)
    parsed = s.str.to_datetime(format=fmt, strict=False) if fmt else s.str.to_datetime(strict=False)
    bad = parsed.is_null() & s.is_not_null()
    if bad.any():
        r = _first_bad_row(bad)
        raise DataError(f"unparsable time {s[r]!r}", file=file, row=r, column=name)
    return parsed.cast(pl.Datetime("us")).dt.epoch("s")


def load_table(
    events_path: str | Path,
    mapping: ColumnMapping = ColumnMapping(),
    items_path: str | Path | None = None,
    item_mapping: ItemColumnMapping = ItemColumnMapping(),
    name: str = "shop",
) -> Dataset:
    """Load an event log (+ optional catalogue). Rows with a missing required value are an
    error naming the row and column (nothing is dropped silently)."""
    ep = Path(events_path)
    raw = read_table(ep)
    file = str(ep)
    required = [mapping.user_id, mapping.item_id, mapping.ts]
    optional = [c for c in (mapping.event_type, mapping.quantity, mapping.price) if c]
    require_columns(raw, required + optional, file=file)
    report = DropReport(file, rows_in=raw.height)
    for c in required:
        nulls = raw[c].is_null()
        if nulls.any():
            raise DataError("missing value", file=file, row=_first_bad_row(nulls), column=c)
    df = raw.with_row_index("order").with_columns(
        _parse_ts(raw[mapping.ts], mapping.ts_format, file, mapping.ts).alias("ts"),
        pl.col(mapping.user_id).cast(pl.Utf8).alias("_user"),
        pl.col(mapping.item_id).cast(pl.Utf8).alias("_item"),
    )
    if mapping.event_type:
        et = df[mapping.event_type].cast(pl.Utf8).str.to_lowercase()
        bad = ~et.is_in(list(EVENT_TYPES)) | et.is_null()
        if bad.any():
            r = _first_bad_row(bad)
            raise DataError(
                f"unknown event type {et[r]!r}; expected one of {EVENT_TYPES}",
                file=file,
                row=r,
                column=mapping.event_type,
            )
        df = df.with_columns(et.alias("event_type"))
    else:
        df = df.with_columns(pl.lit("purchase").alias("event_type"))
    for field, default, dtype in (("quantity", 1, pl.Int32), ("price", None, pl.Float64)):
        src = getattr(mapping, field)
        if src:
            cast = df[src].cast(dtype, strict=False)
            bad = cast.is_null() & df[src].is_not_null()
            if bad.any():
                r = _first_bad_row(bad)
                raise DataError(f"not a number: {df[src][r]!r}", file=file, row=r, column=src)
            df = df.with_columns(cast.alias(field))
        else:
            df = df.with_columns(pl.lit(default, dtype=dtype).alias(field))

    users = IdMap(sorted(df["_user"].unique().to_list()))
    items_frame: pl.DataFrame | None = None
    item_ext = sorted(df["_item"].unique().to_list())
    if items_path is not None:
        ip = Path(items_path)
        items_raw = read_table(ip)
        require_columns(items_raw, [item_mapping.item_id], file=str(ip))
        cat_ids = items_raw[item_mapping.item_id].cast(pl.Utf8)
        dup = cat_ids.is_duplicated()
        if dup.any():
            r = _first_bad_row(dup)
            raise DataError(
                f"duplicate item id {cat_ids[r]!r}",
                file=str(ip),
                row=r,
                column=item_mapping.item_id,
            )
        # catalogue items first (stable ids), then any event-only items
        item_ext = list(dict.fromkeys(sorted(cat_ids.to_list()) + item_ext))
        sel = [cat_ids.alias("external_id")]
        for f in ("title", "brand", "category", "price"):
            src = getattr(item_mapping, f)
            if src and src in items_raw.columns:
                sel.append(items_raw[src].alias(f))
        items_frame = pl.DataFrame(sel)
    item_map = IdMap(item_ext)
    events = map_ids(df, "_user", "_item", users, item_map).select(
        "user_id",
        "item_id",
        "ts",
        "event_type",
        "quantity",
        "price",
        pl.col("order").cast(pl.Int64),
    )
    base = item_map.to_frame("item_id")
    items_out = (
        base.join(items_frame, on="external_id", how="left") if items_frame is not None else base
    )
    return Dataset(
        name=name,
        events=events,
        items=items_out,
        users=users,
        item_ids=item_map,
        report=report,
        extra={"format": "table", "path": file},
    )
