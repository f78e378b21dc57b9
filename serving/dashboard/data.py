"""What the dashboard shows, read from files into plain dicts (no web types here).

- the online report JSON of ``ecomrec report online`` (:func:`load_report`);
- segment snapshots (:func:`load_snapshot`) and the movement between two of them
  (:func:`movement`);
- the churn warnings (:func:`load_warnings`, through ``segments.alerts.read_warnings``).

Files are re-read when their modification time or size changes (:class:`FileCache`), so
a new report or snapshot shows up without a restart. Bad files raise ``DataError`` naming
the file and the field; the pages show that message instead of numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from ecomrec.errors import DataError, NotFoundError

T = TypeVar("T")

#: The metrics of each variant in the report, in display order, with their labels.
METRICS: tuple[tuple[str, str], ...] = (
    ("ctr", "CTR"),
    ("add_to_cart_rate", "add-to-cart"),
    ("conversion", "conversion"),
    ("revenue_per_1000", "revenue per 1,000 recs"),
)
#: Metrics shown as percentages (the others as amounts).
RATE_METRICS = frozenset({"ctr", "add_to_cart_rate", "conversion"})
COUNTS: tuple[str, ...] = (
    "recommendations",
    "impressions",
    "clicks",
    "carts",
    "purchases",
)


# --------------------------------------------------------------------------- file cache
class FileCache:
    """``load(path)`` results kept until the file's (mtime, size) changes; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], tuple[tuple[int, int], Any]] = {}

    def get(self, kind: str, path: Path, stamp_of: Path, load: Callable[[Path], T]) -> T:
        try:
            st = stamp_of.stat()
        except FileNotFoundError:
            return load(path)  # the loader says what is missing and what to run
        stamp = (st.st_mtime_ns, st.st_size)
        key = (kind, str(path))
        with self._lock:
            hit = self._items.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]  # type: ignore[no-any-return]
        value = load(path)
        with self._lock:
            self._items[key] = (stamp, value)
        return value


# --------------------------------------------------------------------------- online report
def report_file(path: str | Path) -> Path:
    """The report JSON: ``path`` itself or ``path/online.json`` for a folder."""
    p = Path(path)
    return p / "online.json" if p.is_dir() else p


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str, file: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"online report: {where}.{key} is missing", file=str(file))
    v = obj[key]
    if kind is float:
        kind = (int, float)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise DataError(
            f"online report: {where}.{key} must be {getattr(kind, '__name__', kind)}, got {v!r}",
            file=str(file),
        )
    return v


def parse_report(raw: Any, file: Path) -> dict[str, Any]:
    """Check the fields the pages show (docs/dashboard.md; ``variant_totals``, per variant
    over its model versions, is optional); returns ``raw`` unchanged."""
    if not isinstance(raw, dict):
        raise DataError("online report: the top level must be an object", file=str(file))
    tables = ["variants"] + (["variant_totals"] if "variant_totals" in raw else [])
    for name in tables:
        for i, v in enumerate(_need(raw, name, list, "report", file)):
            where = f"{name}[{i}]"
            _need(v, "variant", str, where, file)
            for c in COUNTS:
                _need(v, c, int, where, file)
            _need(v, "revenue", float, where, file)
            metrics = _need(v, "metrics", dict, where, file)
            for m, _ in METRICS:
                iv = _need(metrics, m, dict, f"{where}.metrics", file)
                for b in ("value", "lo", "hi"):
                    _need(iv, b, float, f"{where}.metrics.{m}", file)
    for i, d in enumerate(_need(raw, "differences", list, "report", file)):
        where = f"differences[{i}]"
        for k in ("variant", "baseline", "metric"):
            _need(d, k, str, where, file)
        for b in ("value", "lo", "hi"):
            _need(d, b, float, where, file)
    for i, d in enumerate(raw.get("daily") or []):
        where = f"daily[{i}]"
        _need(d, "day", str, where, file)
        _need(d, "variant", str, where, file)
        for c in ("impressions", "clicks", "carts", "purchases"):
            _need(d, c, int, where, file)
        _need(d, "revenue", float, where, file)
    return raw


def load_report(path: str | Path) -> dict[str, Any]:
    """The online report (``ecomrec report online``'s ``online.json``), checked."""
    f = report_file(path)
    if not f.is_file():
        raise NotFoundError(f"online report {f} does not exist (run `ecomrec report online`)")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"online report is not JSON: {e}", file=str(f)) from None
    return parse_report(raw, f)


def daily_series(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per variant, the ``daily`` rows sorted by day with ``ctr`` = clicks / impressions."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(report.get("daily") or [], key=lambda r: (r["variant"], r["day"])):
        imp = row["impressions"]
        out.setdefault(row["variant"], []).append(
            {**row, "ctr": (row["clicks"] / imp) if imp else None}
        )
    return out


# --------------------------------------------------------------------------- segments
@dataclass
class Snapshot:
    """One segment snapshot: a table of customers with their segments."""

    path: Path
    table: pl.DataFrame  # key column + rfm_segment / segment_name (those present)
    key: str  # "customer_id" (export: raw or salted ids) or "user_id" (internal, scores)
    as_of: int | None = None  # unix seconds of "now" when the scores were made
    dataset_fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


#: The segment columns a snapshot may hold, with their page labels.
SEGMENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rfm_segment", "RFM segment"),
    ("segment_name", "behavioural segment"),
)


def _customers_file(path: Path) -> Path:
    for cand in (path / "customers.parquet", path / "scores" / "customers.parquet"):
        if cand.is_file():
            return cand
    raise NotFoundError(
        f"no customers.parquet in {path} or {path / 'scores'} (an `ecomrec segments export` "
        "or `segments report` folder)"
    )


def snapshot_stamp(path: str | Path) -> Path:
    """The file whose change means a new snapshot."""
    return _customers_file(Path(path))


def load_snapshot(path: str | Path) -> Snapshot:
    """A snapshot from an export folder (``customer_id``), a report folder or its
    ``scores/`` folder (internal ``user_id``)."""
    p = Path(path)
    f = _customers_file(p)
    try:
        cols = pl.read_parquet_schema(f)
    except Exception as e:  # polars raises several types for a damaged file
        raise DataError(f"cannot read the segment table: {e}", file=str(f)) from None
    key = "customer_id" if "customer_id" in cols else "user_id" if "user_id" in cols else None
    if key is None:
        raise DataError("segment table has neither customer_id nor user_id", file=str(f))
    seg_cols = [c for c, _ in SEGMENT_COLUMNS if c in cols]
    if not seg_cols:
        raise DataError("segment table has no rfm_segment or segment_name column", file=str(f))
    extra = [c for c in ("churn_probability",) if c in cols]
    table = pl.read_parquet(f, columns=[key, *seg_cols, *extra]).with_columns(
        pl.col(key).cast(pl.Utf8)
    )
    meta: dict[str, Any] = {}
    for m in (f.parent / "meta.json", p / "scores" / "meta.json"):
        if m.is_file():
            meta = json.loads(m.read_text())
            break
    as_of = meta.get("now_ts")
    manifest = f.parent / "manifest.json"  # an export's (its as_of is ISO 8601 text)
    if as_of is None and manifest.is_file():
        text = json.loads(manifest.read_text()).get("as_of")
        if isinstance(text, str):
            as_of = dt.datetime.fromisoformat(text).timestamp()
    return Snapshot(
        p,
        table,
        key,
        int(as_of) if as_of is not None else None,
        meta.get("dataset_fingerprint"),
        meta,
    )


def segment_sizes(snap: Snapshot, column: str) -> dict[str, int]:
    """Customers per segment of ``column``, largest first (nulls as "(none)")."""
    counts = (
        snap.table.select(pl.col(column).fill_null("(none)").cast(pl.Utf8).alias("s"))
        .group_by("s")
        .len()
        .sort(["len", "s"], descending=[True, False])
    )
    return {str(s): int(n) for s, n in counts.iter_rows()}


def comparable(cur: Snapshot, prev: Snapshot) -> str | None:
    """Why the customers of two snapshots cannot be matched (None = they can)."""
    if cur.key != prev.key:
        return (
            f"one snapshot has {cur.key}, the other {prev.key}: compare two exports "
            "(`ecomrec segments export`) or two score folders of the same dataset"
        )
    if cur.key == "user_id" and cur.dataset_fingerprint != prev.dataset_fingerprint:
        return (
            "the score folders were made from different datasets, whose internal user ids "
            "do not match: compare two `ecomrec segments export` folders (same --salt, or "
            "--raw-ids) instead"
        )
    return None


def movement(cur: Snapshot, prev: Snapshot, column: str) -> dict[str, Any]:
    """Segment sizes now and before, and who moved where.

    Returns ``{"rows": [{"segment", "previous", "current", "change"}], "matrix": {from:
    {to: n}}, "segments": [...], "stayed", "moved", "new", "gone", "matched", "reason"}``
    ("new": customers only in the current snapshot, "gone": only in the previous one;
    ``matrix``, ``stayed``, ``moved`` cover the customers in both). When the customers
    cannot be matched (:func:`comparable`) only the sizes are given and ``reason`` says why.
    """
    now = segment_sizes(cur, column) if column in cur.table.columns else {}
    before = segment_sizes(prev, column) if column in prev.table.columns else {}
    names = list(now) + [s for s in before if s not in now]
    rows = [
        {
            "segment": s,
            "previous": before.get(s, 0),
            "current": now.get(s, 0),
            "change": now.get(s, 0) - before.get(s, 0),
        }
        for s in names
    ]
    out: dict[str, Any] = {"rows": rows, "segments": names, "matrix": {}, "reason": None}
    why = comparable(cur, prev)
    if why is None and not (column in cur.table.columns and column in prev.table.columns):
        why = f"{column} is not in both snapshots"
    if why is not None:
        out["reason"] = why
        return out
    key = cur.key
    a = prev.table.select(pl.col(key), pl.col(column).fill_null("(none)").alias("before"))
    b = cur.table.select(pl.col(key), pl.col(column).fill_null("(none)").alias("now"))
    both = a.join(b, on=key, how="inner")
    pairs = both.group_by(["before", "now"]).len()
    matrix: dict[str, dict[str, int]] = {}
    for f, t, n in pairs.iter_rows():
        matrix.setdefault(str(f), {})[str(t)] = int(n)
    stayed = int(both.filter(pl.col("before") == pl.col("now")).height)
    out.update(
        matrix=matrix,
        matched=both.height,
        stayed=stayed,
        moved=both.height - stayed,
        new=cur.table.height - both.height,
        gone=prev.table.height - both.height,
    )
    return out


# --------------------------------------------------------------------------- warnings
def load_warnings(path: str | Path, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` churn warnings (``segments.alerts.read_warnings``)."""
    from segments.alerts import read_warnings

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(
            f"churn warnings file {p} does not exist (none written yet, or a wrong path)"
        )
    return list(read_warnings(p))[:limit]
