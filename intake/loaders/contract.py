"""The data contract: a shop's own events and catalogue (docs/data.md) -> :class:`Dataset`.

Every way in ends here: ``ecomrec data import``, ``--dataset FILE.csv``, the synthetic
shop. The bundled datasets (S3-Rec, Online Retail, CDNOW) have their own importers that
produce the same :class:`~intake.dataset.Dataset` (see docs/data.md for their mapping).

events     customer_id, product_id, timestamp   (required)
           event_type (view|cart|purchase|return; default purchase), quantity (default 1),
           price, order_id, session_id          (optional)
catalogue  product_id (required); title, description, category ("A > B > C"), brand,
           price, available                    (optional)

Ids are strings of any form (``"00042"`` stays ``"00042"``). Files: CSV (UTF-8), Parquet,
or a folder of (partitioned) Parquet files. Other column names are mapped with
``{canonical: source}`` (``--map customer_id=CustomerID``). Time-zone rule: a timestamp
with an offset (``Z``, ``+01:00``) is converted to UTC; one without is read in the shop's
``timezone`` (default UTC); integers are Unix seconds (milliseconds above 10^11).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ecomrec.errors import ConfigError, DataError
from intake.dataset import Dataset, IdMap, map_ids
from intake.schema import DropReport

EVENT_COLUMNS: tuple[str, ...] = (
    "customer_id",
    "product_id",
    "timestamp",
    "event_type",
    "quantity",
    "price",
    "order_id",
    "session_id",
)
EVENT_REQUIRED: tuple[str, ...] = ("customer_id", "product_id", "timestamp")
ITEM_COLUMNS: tuple[str, ...] = (
    "product_id",
    "title",
    "description",
    "category",
    "brand",
    "price",
    "available",
)
# Common names for the four event types in shop exports (lower-cased before lookup).
EVENT_SYNONYMS: dict[str, str] = {
    "view": "view",
    "pageview": "view",
    "page_view": "view",
    "detail": "view",
    "view_item": "view",
    "click": "view",
    "cart": "cart",
    "add_to_cart": "cart",
    "addtocart": "cart",
    "add-to-cart": "cart",
    "purchase": "purchase",
    "transaction": "purchase",
    "order": "purchase",
    "buy": "purchase",
    "return": "return",
    "refund": "return",
    "cancellation": "return",
}
FUTURE_TOLERANCE_S = 86400  # clocks and time zones: a day ahead of "now" is still accepted
_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$"
_OFFSET = r"(Z|[+-]\d{2}:?\d{2})$"


@dataclass(frozen=True)
class ContractOptions:
    """How to read a shop's files: column mapping, time zone, timestamp format, "now"."""

    columns: tuple[tuple[str, str], ...] = ()  # (canonical, source); "events."/"items." prefix
    timezone: str = "UTC"
    timestamp_format: str | None = None  # strftime format; None: ISO 8601 or Unix seconds
    now: int | None = None  # Unix seconds for the future-timestamp check (None: wall clock)
    name: str = "shop"
    unknown_products: str = "drop"  # events for products not in the catalogue: drop | keep

    def mapping_for(self, table: str, present: list[str]) -> dict[str, str]:
        """``{source: canonical}`` renames for one table ("events" or "items")."""
        canon = EVENT_COLUMNS if table == "events" else ITEM_COLUMNS
        out: dict[str, str] = {}
        for key, src in self.columns:
            scope, _, name = key.rpartition(".")
            if scope and scope != table:
                continue
            if name not in canon:
                continue
            if src in present:
                out[src] = name
        return out


def parse_mapping(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"customer_id=CustomerID,items.title=Description"`` -> pairs; errors name the bad part."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"--map wants CANONICAL=SOURCE pairs, got {part!r}")
        k, v = (x.strip() for x in part.split("=", 1))
        _check_key(k, "--map")
        out.append((k, v))
    return tuple(out)


def _check_key(key: str, where: str) -> None:
    scope, _, name = key.rpartition(".")
    if scope not in ("", "events", "items"):
        raise ConfigError(f"{where}: {key!r}: prefix must be 'events.' or 'items.'")
    allowed = (
        EVENT_COLUMNS
        if scope == "events"
        else ITEM_COLUMNS
        if scope == "items"
        else EVENT_COLUMNS + ITEM_COLUMNS
    )
    if name not in allowed:
        raise ConfigError(
            f"{where}: {key!r} is not a contract column; events: {list(EVENT_COLUMNS)}, "
            f"catalogue: {list(ITEM_COLUMNS)}"
        )


def options_from_toml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Fields of :class:`ContractOptions` from a TOML table (``[columns]``, ``timezone``, ...)."""
    out: dict[str, Any] = {}
    allowed = {"columns", "timezone", "timestamp_format", "unknown_products", "name"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
    cols = data.get("columns", {})
    if not isinstance(cols, dict):
        raise ConfigError(f"{source}: [columns] must be a table of canonical = 'Source'")
    pairs = []
    for k, v in cols.items():
        if isinstance(v, dict):  # [columns.events] / [columns.items] sub-tables
            for k2, v2 in v.items():
                _check_key(f"{k}.{k2}", source)
                pairs.append((f"{k}.{k2}", str(v2)))
        else:
            _check_key(k, source)
            pairs.append((k, str(v)))
    out["columns"] = tuple(pairs)
    for k in ("timezone", "timestamp_format", "unknown_products", "name"):
        if k in data:
            out[k] = str(data[k])
    return out


# ------------------------------------------------------------------------------ reading
@dataclass
class Table:
    """A read file: its frame (all columns as read), the source name and how rows are named."""

    frame: pl.DataFrame
    file: str
    csv: bool  # True: errors give file line numbers (header = line 1)
    renamed: dict[str, str] = field(default_factory=dict)  # canonical -> source column
    source_columns: list[str] = field(default_factory=list)  # the file's own header

    def where(self, row: int, column: str | None = None) -> dict[str, Any]:
        """DataError keyword arguments locating 0-based ``row`` (and the SOURCE column name)."""
        col = self.renamed.get(column, column) if column else None
        if self.csv:
            return {"file": self.file, "line": row + 2, "column": col}
        return {"file": self.file, "row": row, "column": col}


def _bad_utf8_line(path: Path) -> tuple[int, str] | None:
    """(1-based line, reason) of the first non-UTF-8 byte sequence, or None."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
    return None


def read_source(path: str | Path) -> Table:
    """Read a CSV (all columns as text), a Parquet file or a folder of Parquet files.

    Empty, header-only, 0-row and non-UTF-8 inputs are one clear DataError naming the file.
    """
    p = Path(path).expanduser()
    file = str(p)
    if not p.exists():
        raise DataError("file does not exist", file=file)
    if p.is_dir():
        parts = sorted(p.rglob("*.parquet"))
        if not parts:
            raise DataError("folder holds no .parquet files", file=file)
        try:
            df = pl.scan_parquet(
                [str(x) for x in parts], hive_partitioning=True, missing_columns="insert"
            ).collect()
        except (pl.exceptions.PolarsError, OSError) as e:
            raise DataError(f"cannot read the Parquet folder: {_first_line(e)}", file=file) from e
        csv = False
    elif p.suffix.lower() == ".parquet":
        try:
            df = pl.read_parquet(p)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise DataError(f"not a readable Parquet file: {_first_line(e)}", file=file) from e
        csv = False
    elif p.suffix.lower() in (".csv", ".tsv", ".txt"):
        if p.stat().st_size == 0:
            raise DataError("file is empty (no header, no rows)", file=file)
        try:
            df = pl.read_csv(
                p,
                separator="\t" if p.suffix.lower() == ".tsv" else ",",
                infer_schema_length=0,  # every column as text: ids keep leading zeros
            )
        except pl.exceptions.PolarsError as e:
            bad = _bad_utf8_line(p)  # only scanned on failure: big files stay fast
            if bad is not None:
                raise DataError(
                    f"not UTF-8 text ({bad[1]}); re-save the file as UTF-8",
                    file=file,
                    line=bad[0],
                ) from None
            raise DataError(f"cannot parse CSV: {_first_line(e)}", file=file) from e
        csv = True
    else:
        raise DataError(
            f"unsupported file type {p.suffix!r}: want .csv, .tsv, .parquet or a folder of "
            ".parquet files",
            file=file,
        )
    if df.height == 0:
        what = "header only, no data rows" if csv else "0 rows"
        raise DataError(f"no data ({what})", file=file)
    return Table(df, file, csv)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rename(table: Table, opts: ContractOptions, kind: str) -> Table:
    ren = opts.mapping_for(kind, table.frame.columns)
    canon = set(EVENT_COLUMNS if kind == "events" else ITEM_COLUMNS)
    # a source column already carrying a canonical name that another column is mapped onto
    clash = [c for c in ren.values() if c in table.frame.columns and c not in ren]
    df = table.frame.drop(clash) if clash else table.frame
    table.source_columns = list(table.frame.columns)
    df = df.rename(ren)
    table.frame = df.select([c for c in df.columns if c in canon])
    table.renamed = {v: k for k, v in ren.items()}
    return table


def _require(table: Table, cols: tuple[str, ...], kind: str) -> None:
    missing = [c for c in cols if c not in table.frame.columns]
    if missing:
        raise DataError(
            f"missing required {kind} column(s) {missing}; the file has "
            f"{table.source_columns}. Rename them or map them, e.g. "
            f"--map {missing[0]}=YourColumn (docs/data.md)",
            file=table.file,
            column=missing[0],
        )


# ------------------------------------------------------------------------------ parsing
def _as_text(s: pl.Series) -> pl.Series:
    out = s.cast(pl.Utf8).str.strip_chars()
    return out.replace("", None)


def _first(mask: pl.Series) -> int:
    return int(mask.arg_true()[0])


def _unix(v: pl.Series) -> pl.Series:
    """Unix seconds from numbers: above 10^11 they are milliseconds."""
    return (
        pl.DataFrame({"v": v})
        .select(pl.when(pl.col("v") > 1e11).then(pl.col("v") / 1000).otherwise(pl.col("v")))
        .to_series()
        .cast(pl.Int64)
        .alias("timestamp")
    )


def _ids(s: pl.Series) -> pl.Series:
    """Ids as text; a float column of whole numbers (``17850.0``) reads as ``17850``."""
    if s.dtype.is_float():
        whole = s.is_null() | (s == s.round(0))
        if bool(whole.all()):
            s = s.cast(pl.Int64)
    return _as_text(s)


def parse_timestamps(s: pl.Series, opts: ContractOptions, table: Table) -> pl.Series:
    """Unix seconds (Int64) from ints, datetimes or text, by the documented time-zone rule."""
    name = "timestamp"
    if s.dtype.is_integer() or s.dtype.is_float():
        return _unix(s.cast(pl.Float64))
    if isinstance(s.dtype, pl.Datetime):
        if s.dtype.time_zone is None:  # type: ignore[union-attr]
            s = s.dt.replace_time_zone(opts.timezone, ambiguous="earliest", non_existent="null")
        return s.dt.convert_time_zone("UTC").dt.epoch("s")
    if isinstance(s.dtype, pl.Date):
        return s.cast(pl.Datetime("us")).dt.replace_time_zone(opts.timezone).dt.epoch("s")
    txt = _as_text(s)
    out = pl.Series(name, [None] * len(txt), dtype=pl.Int64)
    if opts.timestamp_format:
        fmt = opts.timestamp_format
        try:
            parsed = txt.str.to_datetime(format=fmt, strict=False, time_unit="us")
        except pl.exceptions.PolarsError as e:
            raise ConfigError(f"timestamp format {fmt!r}: {_first_line(e)}") from e
        if isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is None:
            parsed = parsed.dt.replace_time_zone(
                opts.timezone, ambiguous="earliest", non_existent="null"
            )
        out = parsed.dt.convert_time_zone("UTC").dt.epoch("s")
        hint = f"does not match --timestamp-format {fmt!r}"
    else:
        is_int = txt.str.contains(r"^-?\d+(\.\d+)?$")
        is_iso = txt.str.contains(_ISO)
        has_off = txt.str.contains(_OFFSET) & is_iso
        if is_int.any():
            out = out.scatter(is_int.arg_true(), _unix(txt.filter(is_int).cast(pl.Float64)))
        if has_off.any():
            v = (
                txt.filter(has_off)
                .str.replace(r"Z$", "+00:00")
                .str.to_datetime(strict=False, time_unit="us")
            )
            out = out.scatter(has_off.arg_true(), v.dt.convert_time_zone("UTC").dt.epoch("s"))
        naive = is_iso & ~has_off
        if naive.any():
            v = txt.filter(naive).str.to_datetime(strict=False, time_unit="us")
            v = v.dt.replace_time_zone(opts.timezone, ambiguous="earliest", non_existent="null")
            out = out.scatter(naive.arg_true(), v.dt.epoch("s"))
        hint = (
            "is not ISO 8601 (2024-03-01T10:15:00[+01:00]) or Unix seconds; "
            "give --timestamp-format, e.g. '%d/%m/%Y %H:%M'"
        )
    bad = out.is_null() & txt.is_not_null()
    if bad.any():
        r = _first(bad)
        raise DataError(f"timestamp {txt[r]!r} {hint}", **table.where(r, name))
    return out


def _numbers(table: Table, col: str, dtype: pl.DataType) -> pl.Series:
    s = table.frame[col]
    if s.dtype == pl.Utf8:
        s = _as_text(s)
        cast = s.cast(pl.Float64, strict=False)
    else:
        cast = s.cast(pl.Float64, strict=False)
    bad = cast.is_null() & s.is_not_null()
    if not bad.any() and dtype.is_integer():
        frac = cast.is_not_null() & (cast != cast.round(0))
        bad = frac
    if bad.any():
        r = _first(bad)
        want = "a whole number" if dtype.is_integer() else "a number"
        raise DataError(f"{s[r]!r} is not {want}", **table.where(r, col))
    return cast.cast(dtype)


def _event_types(table: Table) -> pl.Series:
    raw = _as_text(table.frame["event_type"])
    low = raw.str.to_lowercase()
    mapped = low.replace_strict(EVENT_SYNONYMS, default=None, return_dtype=pl.Utf8)
    bad = mapped.is_null()
    if bad.any():
        r = _first(bad)
        raise DataError(
            f"event type {raw[r]!r} is not one of view, cart, purchase, return "
            f"(accepted synonyms: {sorted(set(EVENT_SYNONYMS) - set(EVENT_SYNONYMS.values()))})",
            **table.where(r, "event_type"),
        )
    return mapped


# ------------------------------------------------------------------------------ loading
def load_contract(
    events: str | Path,
    items: str | Path | None = None,
    options: ContractOptions = ContractOptions(),
) -> Dataset:
    """Validate and load a shop's events (+ catalogue); the drop report says what was dropped.

    Errors (a :class:`DataError` naming the file, the CSV line or Parquet row, and the
    column): unreadable / empty files, a missing required column, an unparsable timestamp,
    quantity or price, an unknown event type, a duplicate catalogue product_id.
    Dropped and counted: rows without customer_id or product_id, exact duplicate rows, the
    same event twice (customer, product, timestamp, type) with other fields differing,
    events for products not in the catalogue, zero/negative quantity outside returns,
    negative prices, timestamps in the future.
    """
    ev = _rename(read_source(events), options, "events")
    _require(ev, EVENT_REQUIRED, "events")
    report = DropReport(ev.file, rows_in=ev.frame.height)
    f = ev.frame
    cols: dict[str, pl.Series] = {
        "_customer": _ids(f["customer_id"]),
        "_product": _ids(f["product_id"]),
        "ts": parse_timestamps(f["timestamp"], options, ev),
        "event_type": _event_types(ev)
        if "event_type" in f.columns
        else pl.Series([EVENT_SYNONYMS["purchase"]] * f.height, dtype=pl.Utf8),
        "quantity": _numbers(ev, "quantity", pl.Int64())
        if "quantity" in f.columns
        else pl.Series([1] * f.height, dtype=pl.Int64),
        "price": _numbers(ev, "price", pl.Float64())
        if "price" in f.columns
        else pl.Series([None] * f.height, dtype=pl.Float64),
    }
    for opt in ("order_id", "session_id"):
        if opt in f.columns:
            cols[opt] = _as_text(f[opt])
    df = pl.DataFrame({k: v.alias(k) for k, v in cols.items()}).with_row_index("_row")

    def drop(mask: pl.Expr, reason: str) -> None:
        nonlocal df
        n = df.filter(mask).height
        report.drop(reason, n)
        if n:
            df = df.filter(~mask)

    drop(pl.col("_customer").is_null(), "no customer_id (guest or missing)")
    drop(pl.col("_product").is_null(), "no product_id")
    key = ["_customer", "_product", "ts", "event_type"]
    full = key + ["quantity", "price"] + [c for c in ("order_id", "session_id") if c in df.columns]
    drop(pl.struct(full).is_duplicated() & ~pl.struct(full).is_first_distinct(), "exact duplicate")
    drop(
        pl.struct(key).is_duplicated() & ~pl.struct(key).is_first_distinct(),
        "same event twice (customer, product, timestamp, type), other fields differ: first kept",
    )
    is_ret = pl.col("event_type") == "return"
    n_neg_ret = df.filter(is_ret & (pl.col("quantity") < 0)).height
    report.note("returns with negative quantity (made positive)", n_neg_ret)
    df = df.with_columns(
        pl.when(is_ret).then(pl.col("quantity").abs()).otherwise(pl.col("quantity"))
    )
    drop(~is_ret & (pl.col("quantity") <= 0), "zero or negative quantity outside a return")
    drop(is_ret & (pl.col("quantity") == 0), "return with zero quantity")
    drop(pl.col("price") < 0, "negative price")
    now = options.now if options.now is not None else int(time.time())
    drop(pl.col("ts") > now + FUTURE_TOLERANCE_S, "timestamp in the future")

    items_frame: pl.DataFrame | None = None
    if items is not None:
        items_frame = _load_catalogue(items, options)
        known = items_frame["external_id"]
        if options.unknown_products == "drop":
            drop(~pl.col("_product").is_in(known.implode()), "product not in the catalogue")
        elif options.unknown_products != "keep":
            raise ConfigError(
                f"unknown_products must be 'drop' or 'keep', got {options.unknown_products!r}"
            )
    if df.height == 0:
        raise DataError(
            f"no events left after validation ({report.rows_dropped:,} dropped: {report.dropped})",
            file=ev.file,
        )
    df = df.sort(["ts", "_row"])  # time order; file order breaks ties
    users = IdMap(sorted(df["_customer"].unique().to_list()))
    ev_products = df["_product"].unique().sort().to_list()
    if items_frame is not None:
        ext = list(dict.fromkeys(items_frame["external_id"].to_list() + ev_products))
    else:
        ext = ev_products
    item_map = IdMap(ext)
    out = map_ids(df, "_customer", "_product", users, item_map)
    keep = ["user_id", "item_id", "ts", "event_type", "quantity", "price"]
    extra_cols = [c for c in ("order_id", "session_id") if c in out.columns]
    events_out = out.select(
        [pl.col(c) for c in keep] + [pl.col("_row").cast(pl.Int64).alias("order")]
    ).with_columns(pl.col("quantity").cast(pl.Int32))
    base = item_map.to_frame("item_id")
    items_out = (
        base.join(items_frame, on="external_id", how="left") if items_frame is not None else base
    )
    ts_min, ts_max = int(df["ts"].min()), int(df["ts"].max())  # type: ignore[arg-type]
    ds = Dataset(
        name=options.name,
        events=events_out,
        items=items_out,
        users=users,
        item_ids=item_map,
        report=report,
        extra={
            "format": "contract",
            "events_file": ev.file,
            "items_file": str(items) if items is not None else None,
            "timezone": options.timezone,
            "columns": dict(options.columns),
            "time_span": [_iso(ts_min), _iso(ts_max)],
        },
    )
    if extra_cols:  # used to tell duplicates apart; not part of the canonical events frame
        ds.extra["event_columns_read"] = extra_cols
    return ds


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def read_catalogue(path: str | Path, options: ContractOptions = ContractOptions()) -> pl.DataFrame:
    """A catalogue file in the contract as canonical item rows (``external_id``, title, ...)."""
    return _load_catalogue(path, options)


def _load_catalogue(path: str | Path, options: ContractOptions) -> pl.DataFrame:
    t = _rename(read_source(path), options, "items")
    _require(t, ("product_id",), "catalogue")
    f = t.frame
    pid = _ids(f["product_id"])
    miss = pid.is_null()
    if miss.any():
        raise DataError("empty product_id", **t.where(_first(miss), "product_id"))
    dup = pid.is_duplicated()
    if dup.any():
        r = _first(dup)
        first = int((pid == pid[r]).arg_true()[0])
        raise DataError(
            f"product_id {pid[r]!r} appears twice (first at the same file's "
            f"{'line ' + str(first + 2) if t.csv else 'row ' + str(first)})",
            **t.where(int((pid == pid[r]).arg_true()[1]), "product_id"),
        )
    cols: dict[str, pl.Series] = {"external_id": pid}
    for c in ("title", "description", "category", "brand"):
        if c in f.columns:
            cols[c] = _as_text(f[c])
    if "price" in f.columns:
        cols["price"] = _numbers(t, "price", pl.Float64())
    if "available" in f.columns:
        cols["available"] = _booleans(t, "available")
    return pl.DataFrame({k: v.alias(k) for k, v in cols.items()})


_TRUE = {"1", "true", "t", "yes", "y", "in stock", "in_stock", "available"}
_FALSE = {"0", "false", "f", "no", "n", "out of stock", "out_of_stock", "unavailable"}


def _booleans(t: Table, col: str) -> pl.Series:
    s = t.frame[col]
    if s.dtype == pl.Boolean:
        return s
    txt = _as_text(s).str.to_lowercase()
    out = txt.replace_strict(
        {**{k: True for k in _TRUE}, **{k: False for k in _FALSE}},
        default=None,
        return_dtype=pl.Boolean,
    )
    bad = out.is_null() & txt.is_not_null()
    if bad.any():
        r = _first(bad)
        raise DataError(f"{s[r]!r} is not true/false (or 1/0, yes/no)", **t.where(r, col))
    return out
