"""Canonical frames every loader produces and every later stage consumes.

Ids are dense integers with 0 reserved for padding: users ``1..n_users``,
items ``1..n_items``.  The external ids (ASINs, StockCodes, reviewer ids) live in
:class:`IdMap`s saved next to the data.

events  ``user_id:Int32, item_id:Int32, ts:Int64 (unix seconds), event_type:Utf8,
        quantity:Int32, price:Float64 (nullable), order:Int64 (source row order)``
items   ``item_id:Int32, external_id:Utf8, title, brand, category: Utf8 (nullable),
        price:Float64 (nullable)``
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import polars as pl

from ecomrec.errors import DataError

PAD_ID = 0


class EventType(StrEnum):
    """Kinds of customer behaviour; ``purchase`` is the default for review/transaction logs."""

    VIEW = "view"
    CART = "cart"
    PURCHASE = "purchase"
    RETURN = "return"


EVENT_TYPES: tuple[str, ...] = tuple(e.value for e in EventType)
# Feature id of each event type; 0 is padding.
EVENT_TYPE_IDS: dict[str, int] = {e: i + 1 for i, e in enumerate(EVENT_TYPES)}
# Outcome events (docs/outcomes.md): what the shop showed (an impression) and what the
# customer clicked. The live log keeps them for attribution and online metrics; the towers'
# features stay the four types above (saved checkpoints keep their shape): a click is read as
# a view (what it was before it had a type of its own), an impression is not a behaviour.
OUTCOME_EVENT_TYPES: tuple[str, ...] = ("impression", "click")
LIVE_EVENT_TYPES: tuple[str, ...] = EVENT_TYPES + OUTCOME_EVENT_TYPES
FEATURE_EVENT_TYPE: dict[str, str | None] = {
    **{e: e for e in EVENT_TYPES},
    "click": "view",
    "impression": None,
}

EVENTS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int32(),
    "item_id": pl.Int32(),
    "ts": pl.Int64(),
    "event_type": pl.Utf8(),
    "quantity": pl.Int32(),
    "price": pl.Float64(),
    "order": pl.Int64(),
}

ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int32(),
    "external_id": pl.Utf8(),
    "title": pl.Utf8(),
    "brand": pl.Utf8(),
    "category": pl.Utf8(),
    "price": pl.Float64(),
}


def require_columns(df: pl.DataFrame, columns: Iterable[str], *, file: str) -> None:
    """Raise a DataError naming the file and the first missing column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"missing required column(s) {missing}; found {df.columns}",
            file=file,
            column=missing[0],
        )


def validate_events(df: pl.DataFrame, *, source: str = "events") -> pl.DataFrame:
    """Check and cast an events frame to :data:`EVENTS_SCHEMA` (ids >= 1, known event types)."""
    require_columns(df, EVENTS_SCHEMA, file=source)
    try:
        out = df.select([pl.col(c).cast(t, strict=True) for c, t in EVENTS_SCHEMA.items()])
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot cast to the events schema: {e}", file=source) from e
    for col in ("user_id", "item_id", "ts", "event_type", "quantity", "order"):
        nulls = out[col].null_count()
        if nulls:
            row = int(out.with_row_index().filter(pl.col(col).is_null())["index"][0])
            raise DataError(f"{nulls} null value(s)", file=source, row=row, column=col)
    for col in ("user_id", "item_id"):
        bad = out.with_row_index().filter(pl.col(col) < 1)
        if bad.height:
            raise DataError(
                f"ids must be >= 1 (0 is padding), got {bad[col][0]}",
                file=source,
                row=int(bad["index"][0]),
                column=col,
            )
    bad = out.with_row_index().filter(~pl.col("event_type").is_in(list(EVENT_TYPES)))
    if bad.height:
        raise DataError(
            f"unknown event type {bad['event_type'][0]!r}; expected one of {EVENT_TYPES}",
            file=source,
            row=int(bad["index"][0]),
            column="event_type",
        )
    return out


def validate_items(df: pl.DataFrame, *, source: str = "items") -> pl.DataFrame:
    """Check and cast an items frame to :data:`ITEMS_SCHEMA`; optional text columns may be absent."""
    require_columns(df, ["item_id", "external_id"], file=source)
    cols = []
    for c, t in ITEMS_SCHEMA.items():
        cols.append(pl.col(c).cast(t) if c in df.columns else pl.lit(None, dtype=t).alias(c))
    extra = [c for c in df.columns if c not in ITEMS_SCHEMA]
    out = df.select(cols + [pl.col(c) for c in extra])
    dup = out.filter(pl.col("item_id").is_duplicated())
    if dup.height:
        raise DataError(f"duplicate item_id {dup['item_id'][0]}", file=source, column="item_id")
    return out.sort("item_id")


@dataclass
class DropReport:
    """Counts of input rows a loader dropped or changed, per reason; nothing is dropped silently."""

    source: str
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def note(self, what: str, n: int) -> None:
        if n:
            self.notes[what] = self.notes.get(what, 0) + int(n)

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "rows_in": self.rows_in,
            "rows_dropped": self.rows_dropped,
            "dropped": dict(self.dropped),
            "notes": dict(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.rows_in:,} rows in, {self.rows_dropped:,} dropped"]
        lines += [f"  dropped {n:>9,}  {r}" for r, n in sorted(self.dropped.items())]
        lines += [f"  note    {n:>9,}  {r}" for r, n in sorted(self.notes.items())]
        return "\n".join(lines)
