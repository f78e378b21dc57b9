"""CDNOW (Fader & Hardie): customer id, date YYYYMMDD, number of CDs, dollar value.

The master file has 4 columns; the 1/10 sample has 5 (new id, original id, date, CDs,
value). There are no item ids: every transaction is one pseudo-item ``"CD"``;
``quantity`` = CDs and ``price`` = dollar value / CDs (so quantity x price = value).
Rows with 0 CDs or zero value are kept as they are in the source (a purchase with no
spend is still a repeat visit in BG/NBD) and counted in the report notes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from ecomrec.errors import DataError
from intake.dataset import Dataset, IdMap
from intake.schema import DropReport


def load_cdnow(path: str | Path, name: str = "cdnow") -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=str(path))
    cust: list[str] = []
    dates: list[int] = []
    cds: list[int] = []
    value: list[float] = []
    ncols: int | None = None
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if lineno == 1 and not parts[0].isdigit():  # header line
                continue
            if ncols is None:
                ncols = len(parts)
                if ncols not in (4, 5):
                    raise DataError(
                        f"expected 4 or 5 columns, got {ncols}", file=str(path), line=lineno
                    )
            if len(parts) != ncols:
                raise DataError(
                    f"expected {ncols} columns, got {len(parts)}", file=str(path), line=lineno
                )
            c, d, n, v = (parts[0], parts[-3], parts[-2], parts[-1])
            try:
                day = dt.datetime.strptime(d, "%Y%m%d").replace(tzinfo=dt.UTC)
            except ValueError:
                raise DataError(
                    f"unparsable date {d!r}", file=str(path), line=lineno, column="date"
                ) from None
            try:
                n_i, v_f = int(n), float(v)
            except ValueError:
                raise DataError(
                    f"bad number in {n!r} / {v!r}",
                    file=str(path),
                    line=lineno,
                    column="number_of_cds",
                ) from None
            cust.append(c)
            dates.append(int(day.timestamp()))
            cds.append(n_i)
            value.append(v_f)
    report = DropReport(str(path), rows_in=len(cust))
    cds_a = np.asarray(cds, np.int32)
    val_a = np.asarray(value, np.float64)
    report.note("rows with 0 CDs (kept, price missing)", int((cds_a == 0).sum()))
    report.note("rows with zero dollar value (kept)", int((val_a == 0).sum()))
    users = IdMap(sorted(set(cust), key=lambda x: (len(x), x)))
    uid = np.array([users.to_internal(c) for c in cust], np.int32)
    price = np.where(cds_a > 0, val_a / np.maximum(cds_a, 1), np.nan)
    events = pl.DataFrame(
        {
            "user_id": uid,
            "item_id": np.ones(len(uid), np.int32),
            "ts": np.asarray(dates, np.int64),
            "event_type": "purchase",
            "quantity": cds_a,
            "price": price,
            "order": np.arange(len(uid), dtype=np.int64),
        }
    ).with_columns(pl.col("price").fill_nan(None))
    items = pl.DataFrame({"item_id": [1], "external_id": ["CD"], "title": ["CD"]})
    return Dataset(
        name=name,
        events=events,
        items=items,
        users=users,
        item_ids=IdMap(["CD"]),
        report=report,
        extra={"format": "cdnow", "path": str(path)},
    )
