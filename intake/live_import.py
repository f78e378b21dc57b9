"""The loop closes: live events from an :class:`~intake.live_log.EventLog` into a dataset,
through the same data-contract code as ``ecomrec data import``.

A shop's event history is a folder of Parquet parts (``data import --events FOLDER`` reads
one: the parts in name order, missing columns null). :func:`export_live_part` writes the
log's events after a position as one more part, ``live-<first>-<last>.parquet``, in the
contract's columns (``customer_id``, ``product_id``, ``event_type``, ``timestamp`` as Unix
seconds, ``quantity``, ``price``, ``order_id``, ``session_id``); zero-padded positions keep
the parts in log order after the history (name a history part so it sorts first, e.g.
``000-history.parquet``). :func:`import_with_live` then runs
:func:`~intake.loaders.contract.load_contract` on the whole folder (the same validation,
cleaning, drop report and id maps as a file import) and records in the dataset's lineage
(``dataset.json`` ``extra.live_log``) the log position it consumed; the next call reads
after that position. Same events -> same dataset fingerprint as importing them from a file
(tests/intake/test_live_import.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ecomrec.errors import ConfigError, DataError
from intake.dataset import Dataset
from intake.live_log import EventLog, StoredEvent
from intake.loaders.contract import ContractOptions, load_contract

log = logging.getLogger(__name__)

PART_PREFIX = "live-"
LIVE_SCHEMA: dict[str, Any] = {
    "customer_id": pl.Utf8,
    "product_id": pl.Utf8,
    "event_type": pl.Utf8,
    "timestamp": pl.Int64,
    "quantity": pl.Int64,
    "price": pl.Float64,
    "order_id": pl.Utf8,
    "session_id": pl.Utf8,
}


@dataclass(frozen=True)
class LivePart:
    """One export of the log: positions ``after + 1 .. position`` (``path`` None if empty)."""

    path: Path | None
    after: int
    position: int  # the last position consumed (== after when nothing was new)
    events: int


def live_events_frame(stored: Iterable[StoredEvent]) -> tuple[pl.DataFrame, int]:
    """Stored events -> a frame in the contract's columns, and the last position seen."""
    cols: dict[str, list[Any]] = {c: [] for c in LIVE_SCHEMA}
    last = 0
    for s in stored:
        e = s.event
        cols["customer_id"].append(e.customer_id)
        cols["product_id"].append(e.product_id)
        cols["event_type"].append(e.event_type)
        cols["timestamp"].append(e.ts)
        cols["quantity"].append(e.quantity)
        cols["price"].append(e.price)
        cols["order_id"].append(e.order_id)
        cols["session_id"].append(e.session_id)
        last = max(last, s.seq)
    return pl.DataFrame(cols, schema=LIVE_SCHEMA), last


def export_live_part(
    event_log: EventLog, folder: str | Path, after: int, upto: int | None = None
) -> LivePart:
    """Write the log's events with ``after < position <= upto`` as one Parquet part.

    ``upto`` defaults to the log's position now, so a part is bounded while writers go on.
    The part is written to a temporary name and renamed: a crash leaves no half part.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    end = event_log.position() if upto is None else upto
    if end <= after:
        return LivePart(None, after, after, 0)
    stored = []
    for s in event_log.read(after=after):
        if s.seq > end:
            break
        stored.append(s)
    frame, _ = live_events_frame(stored)
    if frame.height == 0:  # everything in the range was forgotten meanwhile
        return LivePart(None, after, end, 0)
    path = folder / f"{PART_PREFIX}{after + 1:012d}-{end:012d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    frame.write_parquet(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path)
    log.info("live log: %d events (positions %d..%d) -> %s", frame.height, after + 1, end, path)
    return LivePart(path, after, end, frame.height)


def consumed_position(dataset_dir: str | Path) -> int:
    """The log position a saved dataset's lineage records (0: no live events yet)."""
    d = Path(dataset_dir)
    if not (d / "dataset.json").exists():
        return 0
    live = Dataset.load(d).extra.get("live_log")
    return int(live["position"]) if isinstance(live, dict) else 0


def import_with_live(
    event_log: EventLog,
    events: str | Path,
    out: str | Path,
    items: str | Path | None = None,
    options: ContractOptions | None = None,
    after: int | None = None,
) -> tuple[Dataset, LivePart]:
    """Append the log's new events to the history folder ``events`` and import it to ``out``.

    ``after`` defaults to the position recorded in ``out``'s lineage (0 for a new dataset).
    """
    start = consumed_position(out) if after is None else after
    ds, part = import_live(event_log, events, items, options, start)
    ds.save(out)
    return ds, part


def import_live(
    event_log: EventLog,
    events: str | Path,
    items: str | Path | None,
    options: ContractOptions | None,
    after: int,
) -> tuple[Dataset, LivePart]:
    """:func:`import_with_live` without the save: the log's events after ``after`` added to
    the history folder ``events`` as one part, the folder imported by the contract code, the
    consumed range in ``extra["live_log"]``. The caller saves the dataset when it commits
    (``ecomrec refresh --event-log`` only after the refresh has decided)."""
    ev = Path(events)
    if ev.exists() and not ev.is_dir():
        raise ConfigError(
            f"{ev}: live events are added as Parquet parts to a folder; give the history as a "
            "folder of .parquet files (e.g. 000-history.parquet)"
        )
    for stale in ev.glob(f"{PART_PREFIX}*.parquet"):
        # a part past the recorded position was written by a run that died before saving
        # the dataset: it is exported again, so it must not stay twice
        if int(stale.name[len(PART_PREFIX) :].split("-")[0]) > after:
            log.info("live log: removing %s, written but never recorded", stale)
            stale.unlink()
    part = export_live_part(event_log, ev, after)
    if not any(ev.rglob("*.parquet")):
        raise DataError("no history and no live events to import", file=str(ev))
    ds = load_contract(ev, items, options or ContractOptions())
    ds.extra["live_log"] = {
        "position": part.position,
        "after": part.after,
        "events": part.events,
        "part": part.path.name if part.path else None,
    }
    return ds, part


def recorded_options(ds: Dataset) -> ContractOptions:
    """The :class:`ContractOptions` a contract import recorded in ``ds.extra`` (what
    :func:`~intake.loaders.contract.load_contract` writes there), so that a later import of
    the same history (``ecomrec refresh --event-log``) reads it the same way."""
    x = ds.extra
    if x.get("format") != "contract":
        raise ConfigError(
            f"dataset {ds.name!r} was not imported with the data contract (`ecomrec data "
            "import --events FOLDER`), so its history cannot be re-imported with live events"
        )
    cols = x.get("columns") or {}
    not_products = x.get("not_products") or []
    return ContractOptions(
        columns=tuple((str(k), str(v)) for k, v in dict(cols).items()),  # type: ignore[call-overload]
        timezone=str(x.get("timezone") or "UTC"),
        timestamp_format=x.get("timestamp_format"),  # type: ignore[arg-type]
        name=ds.name,
        unknown_products=str(x.get("unknown_products") or "drop"),
        event_type=str(x.get("default_event_type") or "purchase"),
        returns=x.get("returns"),  # type: ignore[arg-type]
        not_products=tuple(str(p) for p in not_products),  # type: ignore[attr-defined]
        not_products_pattern=x.get("not_products_pattern"),  # type: ignore[arg-type]
        currency=x.get("currency"),  # type: ignore[arg-type]
    )
