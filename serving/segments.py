"""Customer segments as serving sees them: a small lookup protocol and a table-backed store.

The segment models (RFM, behavioural clusters, churn / high-value scores) are fitted
offline; serving only reads their output.  :class:`TableSegmentLookup` holds one row per
customer (internal ``user_id``) and is fine in production too: it loads from Parquet.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import polars as pl

from ecomrec.errors import DataError, NotFoundError

log = logging.getLogger(__name__)

COLD_START = "cold_start"
PROFILE_COLUMNS = ("recency_days", "frequency", "monetary")


@dataclass(frozen=True)
class UserSegments:
    """Segments and scores of one customer (``None`` where no model produced them)."""

    rfm: str | None = None
    behavioural: str | None = None
    churn_probability: float | None = None
    high_value_probability: float | None = None
    recency_days: float | None = None
    frequency: int | None = None
    monetary: float | None = None


@dataclass(frozen=True)
class SegmentInfo:
    """One segment, for analysts."""

    segment_id: str
    name: str
    kind: str  # "rfm" | "behavioural"
    size: int
    profile: dict[str, float] = field(default_factory=dict)
    centroid: np.ndarray | None = None  # (D,) mean user vector (behavioural segments)
    top_categories: tuple[str, ...] = ()


@runtime_checkable
class SegmentLookup(Protocol):
    """Read side of the segment store."""

    def user(self, user: int) -> UserSegments | None:
        """Segments of internal user ``user``; ``None`` when unknown."""
        ...

    def segments(self) -> list[SegmentInfo]:
        """Every segment."""
        ...

    def members(self, segment_id: str) -> np.ndarray:
        """Internal user ids in a segment (NotFoundError when the segment does not exist)."""
        ...


def _opt(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


class TableSegmentLookup:
    """Segments from a frame: ``user_id`` plus any of ``rfm_segment``, ``behavioural_segment``,
    ``churn_probability``, ``high_value_probability``, ``recency_days``, ``frequency``,
    ``monetary``.  ``centroids`` maps behavioural segment ids to their mean user vector."""

    def __init__(
        self,
        table: pl.DataFrame,
        centroids: dict[str, np.ndarray] | None = None,
        top_categories: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        if "user_id" not in table.columns:
            raise DataError("segment table has no user_id column", column="user_id")
        self.table = table
        self._rows: dict[int, UserSegments] = {}
        cols = set(table.columns)
        for row in table.iter_rows(named=True):
            freq = _opt(row.get("frequency"))
            self._rows[int(row["user_id"])] = UserSegments(
                rfm=_opt(row.get("rfm_segment")) if "rfm_segment" in cols else None,
                behavioural=_opt(row.get("behavioural_segment"))
                if "behavioural_segment" in cols
                else None,
                churn_probability=_opt(row.get("churn_probability")),
                high_value_probability=_opt(row.get("high_value_probability")),
                recency_days=_opt(row.get("recency_days")),
                frequency=None if freq is None else int(freq),
                monetary=_opt(row.get("monetary")),
            )
        self._centroids = centroids or {}
        self._top = top_categories or {}
        self._infos = self._build_infos()

    def _build_infos(self) -> dict[str, SegmentInfo]:
        out: dict[str, SegmentInfo] = {}
        for col, kind in (("rfm_segment", "rfm"), ("behavioural_segment", "behavioural")):
            if col not in self.table.columns:
                continue
            prof_cols = [c for c in PROFILE_COLUMNS if c in self.table.columns]
            agg = (
                self.table.filter(pl.col(col).is_not_null())
                .group_by(col)
                .agg(
                    pl.len().alias("size"),
                    *[pl.col(c).cast(pl.Float64).mean().alias(c) for c in prof_cols],
                )
                .sort(col)
            )
            for row in agg.iter_rows(named=True):
                sid = str(row[col])
                out[sid] = SegmentInfo(
                    segment_id=sid,
                    name=sid,
                    kind=kind,
                    size=int(row["size"]),
                    profile={f"mean_{c}": float(row[c]) for c in prof_cols if row[c] is not None},
                    centroid=self._centroids.get(sid),
                    top_categories=self._top.get(sid, ()),
                )
        return out

    @classmethod
    def load(cls, path: str | Path) -> TableSegmentLookup:
        """From ``segments.parquet`` (+ optional ``segments.json`` beside it with
        ``{"centroids": {id: [...]}, "top_categories": {id: [...]}}``)."""
        p = Path(path)
        if not p.exists():
            raise NotFoundError(f"segment table {p} does not exist")
        table = pl.read_parquet(p)
        side = p.with_suffix(".json")
        centroids: dict[str, np.ndarray] = {}
        top: dict[str, tuple[str, ...]] = {}
        if side.exists():
            meta = json.loads(side.read_text())
            centroids = {k: np.asarray(v, np.float32) for k, v in meta.get("centroids", {}).items()}
            top = {k: tuple(v) for k, v in meta.get("top_categories", {}).items()}
        return cls(table, centroids, top)

    @classmethod
    def from_marketing_export(cls, export_dir: str | Path, users: Any) -> TableSegmentLookup:
        """From an ``ecomrec segments export --raw-ids`` directory (``customers.parquet`` +
        ``segments.parquet``); ``users`` maps the raw customer ids to internal ids (IdMap)."""
        d = Path(export_dir)
        cust_path = d / "customers.parquet"
        if not cust_path.exists():
            raise NotFoundError(f"no customers.parquet in {d}")
        cust = pl.read_parquet(cust_path)
        ids = [users.get(str(c)) for c in cust["customer_id"].to_list()]
        if cust.height and all(i is None for i in ids):
            raise DataError(
                "no customer id of the export is a known user: export with --raw-ids",
                file=str(cust_path),
            )
        label = (
            pl.when(pl.col("segment_name").is_not_null())
            .then(pl.col("segment_name"))
            .otherwise(pl.lit("B") + pl.col("segment_id").cast(pl.Utf8))
        )
        table = (
            cust.with_columns(
                pl.Series("user_id", ids, dtype=pl.Int64), label.alias("behavioural_segment")
            )
            .filter(pl.col("user_id").is_not_null())
            .select(
                "user_id",
                "rfm_segment",
                "behavioural_segment",
                *[
                    c
                    for c in ("churn_probability", "high_value_probability", *PROFILE_COLUMNS)
                    if c in cust.columns
                ],
            )
        )
        centroids: dict[str, np.ndarray] = {}
        top: dict[str, tuple[str, ...]] = {}
        seg_path = d / "segments.parquet"
        if seg_path.exists():
            for row in pl.read_parquet(seg_path).iter_rows(named=True):
                name = row.get("name") or f"B{row['segment_id']}"
                if row.get("centroid") is not None:
                    centroids[name] = np.asarray(row["centroid"], np.float32)
                top[name] = tuple(row.get("top_categories") or ())
        return cls(table, centroids, top)

    def save(self, path: str | Path) -> None:
        """Write ``path`` (Parquet) and the centroids beside it (JSON)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.table.write_parquet(p)
        meta = {
            "centroids": {k: np.asarray(v).tolist() for k, v in self._centroids.items()},
            "top_categories": {k: list(v) for k, v in self._top.items()},
        }
        p.with_suffix(".json").write_text(json.dumps(meta))

    def user(self, user: int) -> UserSegments | None:
        return self._rows.get(int(user))

    def segments(self) -> list[SegmentInfo]:
        return list(self._infos.values())

    def members(self, segment_id: str) -> np.ndarray:
        info = self._infos.get(segment_id)
        if info is None:
            raise NotFoundError(f"segment_id: unknown segment {segment_id!r}")
        col = "rfm_segment" if info.kind == "rfm" else "behavioural_segment"
        return self.table.filter(pl.col(col) == segment_id)["user_id"].to_numpy().astype(np.int64)

    def info(self, segment_id: str) -> SegmentInfo:
        """One segment (NotFoundError when unknown)."""
        try:
            return self._infos[segment_id]
        except KeyError:
            raise NotFoundError(f"segment_id: unknown segment {segment_id!r}") from None


class NoSegments:
    """A lookup with no segments (every customer gets the default policy)."""

    def user(self, user: int) -> UserSegments | None:
        return None

    def segments(self) -> list[SegmentInfo]:
        return []

    def members(self, segment_id: str) -> np.ndarray:
        raise NotFoundError(f"segment_id: unknown segment {segment_id!r}")


def segment_info(lookup: SegmentLookup, segment_id: str) -> SegmentInfo:
    """One segment by id from any lookup (NotFoundError when unknown)."""
    for s in lookup.segments():
        if s.segment_id == segment_id:
            return s
    raise NotFoundError(f"segment_id: unknown segment {segment_id!r}")
