"""The data contract: a shop's own events and catalogue (docs/data.md) -> :class:`Dataset`.

Every way in ends here: ``ecomrec data import``, ``--dataset FILE.csv``, the synthetic
shop, and the streaming ingest (:mod:`intake.ingest`), which reads the same files with the
same functions (:func:`iter_events` parses, :func:`clean_events` drops and sums), chunk by
chunk. The bundled datasets (S3-Rec, Online Retail, CDNOW) have their own importers that
produce the same :class:`~intake.dataset.Dataset` (see docs/data.md for their mapping).

events     customer_id, product_id, timestamp   (required)
           event_type (view|cart|purchase|return; default purchase), quantity (default 1),
           price, order_id, session_id, title, category, brand   (optional)
catalogue  product_id (required); title, description, category ("A > B > C"), brand,
           price, available                    (optional)

Ids are strings exactly as written (``"00042"`` stays ``"00042"``, ``" A1"`` stays
``" A1"``; empty or blank = missing). Files: CSV (UTF-8), Parquet, or a folder of
(partitioned) Parquet files. Other column names are mapped with ``{canonical: source}``
(``--map customer_id=CustomerID``). Time-zone rule: a timestamp with an offset (``Z``,
``+01:00``) is converted to UTC; one without is read in the shop's ``timezone`` (default
UTC); integers are Unix seconds (milliseconds above 10^11). Invoice exports: ``returns``
(a rule that marks purchase rows as returns), ``not_products`` (codes that are not
products), and repeated lines of one product in one order are summed.
"""

from __future__ import annotations

import csv
import datetime as dt
import time
import zoneinfo
from collections.abc import Iterator, Mapping
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
# product attributes an events file may carry on every row (used when no catalogue is given)
EVENT_ATTRIBUTES: tuple[str, ...] = ("title", "category", "brand")
# recommendation_id (docs/outcomes.md): accepted on event rows; not a training feature
EVENT_ACCEPTED: tuple[str, ...] = EVENT_COLUMNS + EVENT_ATTRIBUTES + ("recommendation_id",)
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
# Outcome events (docs/outcomes.md). The live log keeps "click" and "impression" as types of
# their own (attribution); a data import reads a click as a view (as before) and drops an
# impression from the training events (counted).
OUTCOME_SYNONYMS: dict[str, str] = {
    "impression": "impression",
    "impressions": "impression",
    "view_item_list": "impression",
    "rec_impression": "impression",
    "click": "click",
    "rec_click": "click",
    "select_item": "click",
}
LIVE_EVENT_SYNONYMS: dict[str, str] = {**EVENT_SYNONYMS, **OUTCOME_SYNONYMS}
IMPORT_EVENT_SYNONYMS: dict[str, str] = {
    **EVENT_SYNONYMS,
    **{k: "view" if v == "click" else v for k, v in OUTCOME_SYNONYMS.items()},
}
IMPRESSION_DROP = "impression (an outcome event: kept for attribution, not a training event)"
FUTURE_TOLERANCE_S = 86400  # clocks and time zones: a day ahead of "now" is still accepted
_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$"
_OFFSET = r"(Z|[+-]\d{2}:?\d{2})$"
RULE_OPS: tuple[str, ...] = (
    "startswith",
    "endswith",
    "contains",
    "matches",
    "=",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
)
MERGED_NOTE = "repeated lines of one product in one order summed (quantity summed, revenue kept)"
# The parsed events every chunk becomes (before drops), the same on both roads.
PARSED_SCHEMA: dict[str, pl.DataType] = {
    "_row": pl.Int64(),
    "_customer": pl.Utf8(),
    "_product": pl.Utf8(),
    "ts": pl.Int64(),
    "event_type": pl.Utf8(),
    "quantity": pl.Int64(),
    "price": pl.Float64(),
    "order_id": pl.Utf8(),
    "session_id": pl.Utf8(),
    "title": pl.Utf8(),
    "category": pl.Utf8(),
    "brand": pl.Utf8(),
}


@dataclass(frozen=True)
class Rule:
    """``COLUMN OP VALUE``: a row test on one events column (canonical or source name)."""

    column: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str, where: str = "--returns") -> Rule:
        parts = text.strip().split(None, 2)
        if len(parts) != 3 or parts[1].lower() not in RULE_OPS:
            raise ConfigError(
                f"{where} {text!r}: want 'COLUMN OP VALUE' with OP one of {list(RULE_OPS)}, "
                "e.g. 'order_id startswith C' or 'quantity < 0'"
            )
        value = parts[2].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        op = parts[1].lower()
        if op in ("<", "<=", ">", ">="):
            try:
                float(value)
            except ValueError:
                raise ConfigError(f"{where} {text!r}: {op} wants a number, got {value!r}") from None
        if op == "matches":
            _check_regex(value, where)
        return cls(parts[0], op, value)

    def mask(self, s: pl.Series) -> pl.Series:
        """True where the rule holds (null cells never match)."""
        if self.op in ("<", "<=", ">", ">="):
            num = s.cast(pl.Utf8).str.strip_chars().cast(pl.Float64, strict=False)
            v = float(self.value)
            out = {"<": num < v, "<=": num <= v, ">": num > v, ">=": num >= v}[self.op]
        else:
            txt = s.cast(pl.Utf8)
            if self.op == "startswith":
                out = txt.str.starts_with(self.value)
            elif self.op == "endswith":
                out = txt.str.ends_with(self.value)
            elif self.op == "contains":
                out = txt.str.contains(self.value, literal=True)
            elif self.op == "matches":
                out = txt.str.contains(f"^(?:{self.value})$")
            elif self.op == "=":
                out = txt == self.value
            else:
                out = txt != self.value
        return out.fill_null(False)


def _check_regex(pattern: str, where: str) -> None:
    try:
        pl.Series(["x"]).str.contains(pattern)
    except pl.exceptions.PolarsError as e:
        raise ConfigError(f"{where}: bad regular expression {pattern!r}: {_first_line(e)}") from e


@dataclass(frozen=True)
class ContractOptions:
    """How to read a shop's files: column mapping, time zone, timestamp format, "now",
    and the export's own conventions (returns, non-product codes, a default event type)."""

    columns: tuple[tuple[str, str], ...] = ()  # (canonical, source); "events."/"items." prefix
    timezone: str = "UTC"
    timestamp_format: str | None = None  # strftime format; None: ISO 8601 or Unix seconds
    now: int | None = None  # Unix seconds for the future-timestamp check (None: wall clock)
    name: str = "shop"
    unknown_products: str = "drop"  # events for products not in the catalogue: drop | keep
    event_type: str = "purchase"  # type of rows without one (no column, or an empty cell)
    returns: str | None = None  # rule turning purchase rows into returns: "order_id startswith C"
    not_products: tuple[str, ...] = ()  # product ids that are not products (POST, C2, ...)
    not_products_pattern: str | None = None  # regex (whole id) for more of them: "gift_.*"
    currency: str | None = None  # the shop's currency (GBP, EUR, ...), carried into reports

    def __post_init__(self) -> None:
        if self.unknown_products not in ("drop", "keep"):
            raise ConfigError(
                f"unknown_products must be 'drop' or 'keep', got {self.unknown_products!r}"
            )
        et = EVENT_SYNONYMS.get(self.event_type.strip().lower())
        if et is None:
            raise ConfigError(
                f"event_type {self.event_type!r} is not one of view, cart, purchase, return"
            )
        object.__setattr__(self, "event_type", et)
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"unknown time zone {self.timezone!r} (want an IANA name like Europe/Berlin)"
            ) from None
        if self.returns is not None:
            Rule.parse(self.returns)
        if self.not_products_pattern is not None:
            _check_regex(self.not_products_pattern, "--not-products-pattern")

    @property
    def returns_rule(self) -> Rule | None:
        return Rule.parse(self.returns) if self.returns else None

    def not_product(self, ids: pl.Series) -> pl.Series:
        """True for ids that are not products (``not_products`` or the pattern)."""
        out = ids.is_in(list(self.not_products)) if self.not_products else ids.is_null() & False
        if self.not_products_pattern:
            out = out | ids.str.contains(f"^(?:{self.not_products_pattern})$")
        return out.fill_null(False)

    def mapping_for(self, table: str, present: list[str]) -> dict[str, str]:
        """``{source: canonical}`` renames for one table ("events" or "items")."""
        canon = EVENT_ACCEPTED if table == "events" else ITEM_COLUMNS
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

    def check_mapping(self, present: Mapping[str, tuple[str, list[str]] | None]) -> None:
        """Every mapping names a column of a given file: ``present`` = {table: (file, columns)}.

        A mapping to a column no file has, or to the catalogue when none is given, is an error.
        """
        for key, src in self.columns:
            scope, _, name = key.rpartition(".")
            targets = (
                [scope]
                if scope
                else [
                    t
                    for t, canon in (("events", EVENT_ACCEPTED), ("items", ITEM_COLUMNS))
                    if name in canon
                ]
            )
            given: list[tuple[str, list[str]]] = [
                g for t in targets if (g := present.get(t)) is not None
            ]
            if not given:
                raise ConfigError(
                    f"column mapping {key}={src} is for the catalogue, but no catalogue "
                    "(--items) was given; map it onto the events with "
                    f"{name}={src} or give --items"
                )
            if not any(src in cols for _, cols in given):
                f, cols = given[0]
                raise DataError(
                    f"column mapping {key}={src}: the file has no column {src!r}; "
                    f"its columns are {cols}",
                    file=f,
                    column=src,
                )


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


def parse_list(text: str | None) -> tuple[str, ...]:
    """``"POST,DOT,BANK CHARGES"`` -> ids exactly as written between the commas."""
    if not text:
        return ()
    return tuple(p for p in text.split(",") if p != "")


def _check_key(key: str, where: str) -> None:
    scope, _, name = key.rpartition(".")
    if scope not in ("", "events", "items"):
        raise ConfigError(f"{where}: {key!r}: prefix must be 'events.' or 'items.'")
    allowed = (
        EVENT_ACCEPTED
        if scope == "events"
        else ITEM_COLUMNS
        if scope == "items"
        else EVENT_ACCEPTED + ITEM_COLUMNS
    )
    if name not in allowed:
        raise ConfigError(
            f"{where}: {key!r} is not a contract column; events: {list(EVENT_ACCEPTED)}, "
            f"catalogue: {list(ITEM_COLUMNS)}"
        )


_TOML_KEYS = (
    "timezone",
    "timestamp_format",
    "unknown_products",
    "name",
    "event_type",
    "returns",
    "not_products_pattern",
    "currency",
)


def options_from_toml(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Fields of :class:`ContractOptions` from a TOML table (``[columns]``, ``timezone``, ...)."""
    out: dict[str, Any] = {}
    allowed = {"columns", "not_products", *_TOML_KEYS}
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
    if "not_products" in data:
        np_ = data["not_products"]
        if not isinstance(np_, list):
            raise ConfigError(f"{source}: not_products must be a list of product ids")
        out["not_products"] = tuple(str(x) for x in np_)
    for k in _TOML_KEYS:
        if k in data:
            out[k] = str(data[k])
    return out


# ------------------------------------------------------------------------------ reading
@dataclass
class Table:
    """A read file (or one chunk of it): its frame, the source name and how rows are named."""

    frame: pl.DataFrame
    file: str
    csv: bool  # True: errors give file line numbers (header = line 1)
    renamed: dict[str, str] = field(default_factory=dict)  # canonical -> source column
    source_columns: list[str] = field(default_factory=list)  # the file's own header
    row_offset: int = 0  # rows of the same file before this chunk
    source: pl.DataFrame | None = None  # the chunk with the file's own column names

    def where(self, row: int, column: str | None = None) -> dict[str, Any]:
        """DataError keyword arguments locating 0-based ``row`` (and the SOURCE column name)."""
        col = self.renamed.get(column, column) if column else None
        row += self.row_offset
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


def check_csv_shape(path: Path, separator: str) -> None:
    """Every line has the header's number of fields (one streaming pass, quotes respected).

    A truncated last line (an export cut short) or a ragged line is an error naming the
    line, never a row with made-up empty fields. Blank lines are skipped, as the reader does.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=separator)
            header = next(reader, None)
            if header is None:
                return
            n = len(header)
            for row in reader:
                if len(row) != n and row:
                    raise DataError(
                        f"{len(row)} field(s) where the header has {n}: a truncated or ragged "
                        "line (an export cut short?); fix or remove the line",
                        file=str(path),
                        line=reader.line_num,
                    )
    except UnicodeDecodeError:
        return  # the reader reports it with its line
    except csv.Error as e:
        raise DataError(f"cannot parse CSV: {e}", file=str(path)) from e


def _csv_separator(p: Path) -> str:
    return "\t" if p.suffix.lower() == ".tsv" else ","


def _source_files(p: Path) -> tuple[list[Path], bool]:
    """The files of a source path and whether they are CSV; errors for what is not readable."""
    file = str(p)
    if not p.exists():
        raise DataError("file does not exist", file=file)
    if p.is_dir():
        parts = sorted(p.rglob("*.parquet"))
        if not parts:
            raise DataError("folder holds no .parquet files", file=file)
        return parts, False
    suf = p.suffix.lower()
    if suf == ".parquet":
        return [p], False
    if suf in (".csv", ".tsv", ".txt"):
        if p.stat().st_size == 0:
            raise DataError("file is empty (no header, no rows)", file=file)
        return [p], True
    raise DataError(
        f"unsupported file type {p.suffix!r}: want .csv, .tsv, .parquet or a folder of "
        ".parquet files",
        file=file,
    )


def _hive_columns(root: Path, f: Path, have: list[str]) -> list[pl.Expr]:
    """``key=value`` folders between ``root`` and ``f`` as text columns the file lacks."""
    if root == f:
        return []
    out = []
    for part in f.relative_to(root).parts[:-1]:
        k, eq, v = part.partition("=")
        if eq and k not in have:
            out.append(pl.lit(v, pl.Utf8).alias(k))
    return out


def iter_source(path: str | Path, chunk_rows: int | None = None) -> Iterator[Table]:
    """Read a CSV (every column as text), a Parquet file or a folder of Parquet files.

    ``chunk_rows`` None: one table per file (eager); otherwise chunks of about that many
    rows, read in streaming. Empty, header-only, 0-row, ragged and non-UTF-8 inputs are one
    clear DataError naming the file (and the line).
    """
    p = Path(path).expanduser()
    files, is_csv = _source_files(p)
    rows = 0
    for f in files:
        if is_csv:
            sep = _csv_separator(f)
            check_csv_shape(f, sep)
            lf = pl.scan_csv(f, separator=sep, infer_schema=False)
        else:
            lf = pl.scan_parquet(f)
        offset = 0
        try:
            schema = lf.collect_schema()
            hive = _hive_columns(p, f, list(schema))
            if hive:
                lf = lf.with_columns(hive)
            chunks: Any = (
                [lf.collect()]
                if chunk_rows is None
                else lf.collect_batches(chunk_size=chunk_rows, engine="streaming")
            )
            for chunk in chunks:
                if chunk.height == 0:
                    continue
                yield Table(chunk, str(f if p.is_dir() else p), is_csv, row_offset=offset)
                offset += chunk.height
        except pl.exceptions.PolarsError as e:
            if is_csv:
                bad = _bad_utf8_line(f)  # only scanned on failure: big files stay fast
                if bad is not None:
                    raise DataError(
                        f"not UTF-8 text ({bad[1]}); re-save the file as UTF-8",
                        file=str(f),
                        line=bad[0],
                    ) from None
                raise DataError(f"cannot parse CSV: {_first_line(e)}", file=str(f)) from e
            what = "the Parquet folder" if p.is_dir() else "not a readable Parquet file"
            raise DataError(
                f"{'cannot read ' + what if p.is_dir() else what}: {_first_line(e)}", file=str(f)
            ) from e
        except OSError as e:
            raise DataError(f"cannot read: {_first_line(e)}", file=str(f)) from e
        rows += offset
    if rows == 0:
        what = "header only, no data rows" if is_csv else "0 rows"
        raise DataError(f"no data ({what})", file=str(p))


def read_source(path: str | Path) -> Table:
    """The whole source as one table (a folder's files concatenated, missing columns null)."""
    tables = list(iter_source(path))
    if len(tables) == 1:
        return tables[0]
    frame = pl.concat([t.frame for t in tables], how="diagonal_relaxed")
    return Table(frame, str(Path(path).expanduser()), False)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rename(table: Table, opts: ContractOptions, kind: str) -> Table:
    ren = opts.mapping_for(kind, table.frame.columns)
    canon = set(EVENT_ACCEPTED if kind == "events" else ITEM_COLUMNS)
    # a source column already carrying a canonical name that another column is mapped onto
    clash = [c for c in ren.values() if c in table.frame.columns and c not in ren]
    table.source = table.frame
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
    """Free text (titles, types, numbers): surrounding blanks trimmed, empty = missing."""
    out = s.cast(pl.Utf8).str.strip_chars()
    return out.replace("", None)


def _nulls(n: int, dtype: pl.DataType) -> pl.Series:
    return pl.select(pl.repeat(None, n, dtype=dtype)).to_series()


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
    """Ids as text, exactly as written; empty or blank = missing.

    A float column of whole numbers (``17850.0``, a spreadsheet's Parquet) reads as ``17850``.
    """
    if s.dtype.is_float():
        whole = s.is_null() | (s == s.round(0))
        if bool(whole.all()):
            s = s.cast(pl.Int64)
    txt = s.cast(pl.Utf8)
    blank = txt.str.strip_chars() == ""
    return pl.select(pl.when(blank).then(None).otherwise(txt)).to_series().alias(s.name)


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
    miss = txt.is_null()
    if miss.any():
        raise DataError("empty timestamp", **table.where(_first(miss), name))
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


def _event_types(table: Table, default: str) -> tuple[pl.Series, int]:
    """Canonical types and how many cells were empty (given ``default``)."""
    raw = _as_text(table.frame["event_type"])
    low = raw.str.to_lowercase()
    mapped = low.replace_strict(IMPORT_EVENT_SYNONYMS, default=None, return_dtype=pl.Utf8)
    bad = mapped.is_null() & raw.is_not_null()
    if bad.any():
        r = _first(bad)
        raise DataError(
            f"event type {raw[r]!r} is not one of view, cart, purchase, return, impression, "
            f"click (accepted synonyms: "
            f"{sorted(set(IMPORT_EVENT_SYNONYMS) - set(LIVE_EVENT_SYNONYMS.values()))})",
            **table.where(r, "event_type"),
        )
    empty = raw.is_null()
    return mapped.fill_null(default), int(empty.sum())


def _rule_column(table: Table, rule: Rule) -> pl.Series:
    """The column a rule names: a canonical events column or the file's own column name."""
    if rule.column in table.frame.columns:
        return table.frame[rule.column]
    if table.source is not None and rule.column in table.source.columns:
        return table.source[rule.column]
    raise DataError(
        f"--returns {rule.column} {rule.op} {rule.value!r}: the file has no column "
        f"{rule.column!r}; its columns are {table.source_columns}",
        file=table.file,
        column=rule.column,
    )


def parse_events(
    table: Table, opts: ContractOptions, report: DropReport, first_row: int = 0
) -> pl.DataFrame:
    """One events table (renamed) -> :data:`PARSED_SCHEMA` rows; bad values are DataErrors.

    ``first_row`` numbers the rows across chunks and files (the source order kept as
    ``order``). Notes (empty quantity -> 1, empty type -> default, returns by rule) go to
    ``report``. Nothing is dropped here: :func:`clean_events` does that, counted.
    """
    f = table.frame
    n = f.height
    _require(table, EVENT_REQUIRED, "events")
    if "event_type" in f.columns:
        types, n_empty = _event_types(table, opts.event_type)
        report.note(f"empty event_type -> {opts.event_type}", n_empty)
    else:
        types = pl.select(pl.repeat(opts.event_type, n, dtype=pl.Utf8)).to_series()
    if "quantity" in f.columns:
        qty = _numbers(table, "quantity", pl.Int64())
        report.note("empty quantity -> 1", int(qty.is_null().sum()))
        qty = qty.fill_null(1)
    else:
        qty = pl.select(pl.repeat(1, n, dtype=pl.Int64)).to_series()
    rule = opts.returns_rule
    if rule is not None:
        hit = rule.mask(_rule_column(table, rule)) & types.is_in(["purchase", "return"])
        report.note(
            f"purchase rows made returns by the rule '{opts.returns}'",
            int((hit & (types == "purchase")).sum()),
        )
        types = pl.select(pl.when(hit).then(pl.lit("return")).otherwise(types)).to_series()

    def text(c: str, ids: bool = False) -> pl.Series:
        if c not in f.columns:
            return _nulls(n, pl.Utf8())
        return _ids(f[c]) if ids else _as_text(f[c])

    cols: dict[str, pl.Series] = {
        "_row": pl.int_range(first_row, first_row + n, dtype=pl.Int64, eager=True),
        "_customer": _ids(f["customer_id"]),
        "_product": _ids(f["product_id"]),
        "ts": parse_timestamps(f["timestamp"], opts, table),
        "event_type": types,
        "quantity": qty,
        "price": _numbers(table, "price", pl.Float64())
        if "price" in f.columns
        else _nulls(n, pl.Float64()),
        "order_id": text("order_id", ids=True),
        "session_id": text("session_id", ids=True),
        **{a: text(a) for a in EVENT_ATTRIBUTES},
    }
    return pl.DataFrame({k: v.alias(k).cast(PARSED_SCHEMA[k]) for k, v in cols.items()})


def iter_events(
    path: str | Path,
    opts: ContractOptions,
    report: DropReport,
    chunk_rows: int | None = None,
    catalogue: tuple[str, list[str]] | None = None,
) -> Iterator[pl.DataFrame]:
    """The events source, parsed chunk by chunk (``chunk_rows`` None: one chunk per file).

    The mapping is checked against the first file's columns (and ``catalogue`` = (file,
    columns) when one is given) before any row is parsed. ``report.rows_in`` counts rows.
    """
    first_row = 0
    for i, table in enumerate(iter_source(path, chunk_rows)):
        if i == 0:
            opts.check_mapping(
                {"events": (table.file, list(table.frame.columns)), "items": catalogue}
            )
        _rename(table, opts, "events")
        parsed = parse_events(table, opts, report, first_row)
        first_row += parsed.height
        report.rows_in += parsed.height
        yield parsed


# ------------------------------------------------------------------------------ cleaning
def _reason(opts: ContractOptions, known: list[str] | None, now: int) -> pl.Expr:
    """The first drop reason of a row (null: kept), in the documented order."""
    is_ret = pl.col("event_type") == "return"
    q = pl.col("quantity")
    not_prod = pl.lit(False)
    if opts.not_products:
        not_prod = not_prod | pl.col("_product").is_in(list(opts.not_products))
    if opts.not_products_pattern:
        not_prod = not_prod | pl.col("_product").str.contains(f"^(?:{opts.not_products_pattern})$")
    chain = (
        pl.when(pl.col("event_type") == "impression")
        .then(pl.lit(IMPRESSION_DROP))
        .when(pl.col("_customer").is_null())
        .then(pl.lit("no customer_id (guest or missing)"))
        .when(pl.col("_product").is_null())
        .then(pl.lit("no product_id"))
        .when(not_prod.fill_null(False))
        .then(pl.lit("not a product (--not-products): ") + pl.col("_product"))
    )
    if known is not None and opts.unknown_products == "drop":
        chain = chain.when(~pl.col("_product").is_in(known)).then(
            pl.lit("product not in the catalogue")
        )
    return (
        chain.when(~is_ret & (q <= 0))
        .then(pl.lit("zero or negative quantity outside a return"))
        .when(is_ret & (q == 0))
        .then(pl.lit("return with zero quantity"))
        .when(pl.col("price") < 0)
        .then(pl.lit("negative price"))
        .when(pl.col("ts") > now + FUTURE_TOLERANCE_S)
        .then(pl.lit("timestamp in the future"))
        .otherwise(pl.lit(None, pl.Utf8))
        .alias("_drop")
    )


def filter_rows(
    parsed: pl.DataFrame,
    opts: ContractOptions,
    report: DropReport,
    known: list[str] | None = None,
) -> pl.DataFrame:
    """Row-level drops (counted in ``report``); returns written negative made positive."""
    now = opts.now if opts.now is not None else int(time.time())
    reason = parsed.select(_reason(opts, known, now)).to_series()
    counts = reason.drop_nulls().value_counts(sort=False, name="n")
    for why, n in counts.sort("_drop").iter_rows():
        report.drop(why, n)
    kept = parsed.filter(reason.is_null())
    is_ret = pl.col("event_type") == "return"
    report.note(
        "returns with negative quantity (made positive)",
        int(kept.select((is_ret & (pl.col("quantity") < 0)).sum()).item()),
    )
    return kept.with_columns(
        pl.when(is_ret).then(pl.col("quantity").abs()).otherwise(pl.col("quantity"))
    )


def merge_lines(kept: pl.DataFrame, report: DropReport) -> pl.DataFrame:
    """Purchases and returns: lines of one product in one order summed (quantity summed,
    revenue kept: the price becomes the quantity-weighted mean). The order is ``order_id``,
    or the timestamp when there is none. Views and carts: the same event twice is one event
    (exact duplicates, then same customer/product/timestamp/type: the first line kept).

    Every comparison is within one customer, so a log split by customer gives the same
    result part by part (the streaming ingest cleans per customer bucket)."""
    kept = kept.sort("_row")  # "first" below = first in the file
    lines = pl.col("event_type").is_in(["purchase", "return"])
    q, p = pl.col("quantity"), pl.col("price")
    orders = (
        kept.filter(lines)
        .with_columns(
            pl.when(pl.col("order_id").is_null()).then(pl.col("ts")).otherwise(None).alias("_tk")
        )
        .group_by("_customer", "_product", "event_type", "order_id", "_tk", maintain_order=True)
        .agg(
            pl.col("_row").first(),
            *[pl.col(c).first() for c in ("ts", "session_id", "title", "category", "brand")],
            q.sum(),
            (q * p).sum().alias("_rev"),
            q.filter(p.is_not_null()).sum().alias("_qp"),
            pl.len().alias("_n"),
        )
        .with_columns(
            pl.when(pl.col("_qp") > 0)
            .then(pl.col("_rev") / pl.col("_qp"))
            .otherwise(None)
            .alias("price")
        )
    )
    full = [
        "_customer",
        "_product",
        "ts",
        "event_type",
        "quantity",
        "price",
        "order_id",
        "session_id",
    ]
    key = ["_customer", "_product", "ts", "event_type"]
    rest = [c for c in PARSED_SCHEMA if c not in full]
    exact = (
        kept.filter(~lines)
        .group_by(full, maintain_order=True)
        .agg(*[pl.col(c).first() for c in rest], pl.len().alias("_n"))
    )
    other = [c for c in PARSED_SCHEMA if c not in key]
    same = exact.group_by(key, maintain_order=True).agg(
        *[pl.col(c).first() for c in other], pl.len().alias("_n")
    )

    def extra_rows(df: pl.DataFrame) -> int:
        return int(df["_n"].sum()) - df.height

    report.note(MERGED_NOTE, extra_rows(orders))
    report.drop("exact duplicate", extra_rows(exact))
    report.drop(
        "same event twice (customer, product, timestamp, type), other fields differ: first kept",
        extra_rows(same),
    )
    cols = [pl.col(c).cast(t) for c, t in PARSED_SCHEMA.items()]
    return pl.concat([orders.select(cols), same.select(cols)], how="vertical")


def clean_events(
    parsed: pl.DataFrame,
    opts: ContractOptions,
    report: DropReport,
    known: list[str] | None = None,
) -> pl.DataFrame:
    """Parsed events -> the kept ones (row drops, then repeated lines summed), counted."""
    return merge_lines(filter_rows(parsed, opts, report, known), report)


def latest_values(rows: pl.DataFrame, attrs: list[str]) -> dict[str, pl.DataFrame]:
    """Per attribute, each product's latest non-empty value with its (ts, _row).

    Latest by timestamp, then file order. Associative: the latest values of several
    parts' latest values are the latest values of the whole (how the ingest combines
    its buckets)."""
    return {
        a: rows.select("_product", "ts", "_row", a)
        .filter(pl.col(a).is_not_null())
        .sort(["ts", "_row"])
        .unique("_product", keep="last")
        for a in attrs
    }


def product_attributes(parts: dict[str, pl.DataFrame], products: pl.Series) -> pl.DataFrame:
    """``external_id`` + one column per attribute from :func:`latest_values` results."""
    out = pl.DataFrame({"external_id": products})
    for a, part in parts.items():
        out = out.join(
            part.select(pl.col("_product").alias("external_id"), a), on="external_id", how="left"
        )
    return out


# ------------------------------------------------------------------------------ loading
def load_contract(
    events: str | Path,
    items: str | Path | None = None,
    options: ContractOptions = ContractOptions(),
) -> Dataset:
    """Validate and load a shop's events (+ catalogue); the drop report says what was dropped.

    Errors (a :class:`DataError` naming the file, the CSV line or Parquet row, and the
    column): unreadable / empty / ragged files, a missing required column, a mapping to a
    column no file has, an unparsable timestamp, quantity or price, an unknown event type,
    a duplicate catalogue product_id.
    Dropped and counted: rows without customer_id or product_id, non-product codes
    (``not_products``), events for products not in the catalogue, zero/negative quantity
    outside returns, negative prices, timestamps in the future, for views and carts exact
    duplicates and the same event twice. Summed (noted): repeated lines of one product in
    one order. Without a catalogue, products take the latest title/category/brand/price
    seen on their event rows.
    """
    report = DropReport(str(Path(events).expanduser()))
    items_frame: pl.DataFrame | None = None
    cat_cols: tuple[str, list[str]] | None = None
    cat_table: Table | None = None
    if items is not None:
        cat_table = read_source(items)
        cat_cols = (cat_table.file, list(cat_table.frame.columns))
    parsed = pl.concat(list(iter_events(events, options, report, None, cat_cols)))
    if cat_table is not None:
        items_frame = _catalogue_frame(cat_table, options, report)
    known = items_frame["external_id"].to_list() if items_frame is not None else None
    kept_rows = filter_rows(parsed, options, report, known)
    df = merge_lines(kept_rows, report)
    if df.height == 0:
        raise DataError(
            f"no events left after validation ({report.rows_dropped:,} dropped: {report.dropped})",
            file=report.source,
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
    events_out = out.select(
        [pl.col(c) for c in keep] + [pl.col("_row").cast(pl.Int64).alias("order")]
    ).with_columns(pl.col("quantity").cast(pl.Int32))
    base = item_map.to_frame("item_id")
    attrs: list[str] = []
    if items_frame is not None:
        items_out = base.join(items_frame, on="external_id", how="left")
    else:
        attrs = [a for a in (*EVENT_ATTRIBUTES, "price") if parsed[a].null_count() < parsed.height]
        latest = product_attributes(latest_values(kept_rows, attrs), base["external_id"])
        items_out = base.join(latest, on="external_id", how="left") if attrs else base
    ts_min, ts_max = int(df["ts"].min()), int(df["ts"].max())  # type: ignore[arg-type]
    read = [c for c in ("order_id", "session_id") if parsed[c].null_count() < parsed.height]
    extra: dict[str, object] = {
        "format": "contract",
        "events_file": report.source,
        "items_file": str(items) if items is not None else None,
        "timezone": options.timezone,
        "columns": dict(options.columns),
        "time_span": [_iso(ts_min), _iso(ts_max)],
        "currency": options.currency,
        "returns": options.returns,
        "not_products": list(options.not_products),
        "not_products_pattern": options.not_products_pattern,
        "default_event_type": options.event_type,
    }
    if attrs:
        extra["product_attributes_from_events"] = attrs
    if read:  # order ids group lines; not part of the canonical events frame
        extra["event_columns_read"] = read
    return Dataset(
        name=options.name,
        events=events_out,
        items=items_out,
        users=users,
        item_ids=item_map,
        report=report,
        extra=extra,
    )


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def read_catalogue(path: str | Path, options: ContractOptions = ContractOptions()) -> pl.DataFrame:
    """A catalogue file in the contract as canonical item rows (``external_id``, title, ...)."""
    t = read_source(path)
    options.check_mapping({"items": (t.file, list(t.frame.columns)), "events": None})
    return _catalogue_frame(t, options, DropReport(t.file))


def _catalogue_frame(t: Table, options: ContractOptions, report: DropReport) -> pl.DataFrame:
    t = _rename(t, options, "items")
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
    out = pl.DataFrame({k: v.alias(k) for k, v in cols.items()})
    notp = options.not_product(out["external_id"])
    if notp.any():
        report.drop("catalogue rows that are not products (--not-products)", int(notp.sum()))
        out = out.filter(~notp)
    return out


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
