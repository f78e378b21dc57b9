"""Customer features at a cutoff, RFM 1-5 scores and the ten named RFM segments.

Everything here reads only events with ``ts < cutoff_ts`` (the cutoff instant itself
belongs to the label window, see :mod:`segments.labels`), so nothing after the
cutoff can leak into features.

Features (one row per customer with at least one purchase before the cutoff):

=================  ====================================================================
recency_days       days from the last purchase to the cutoff
frequency          purchase occasions (distinct purchase timestamps: one invoice each)
monetary           net value: purchased value minus returned value, floored at 0
tenure_days        days from the first purchase to the cutoff
mean_basket        purchased value / frequency
return_rate        returned value / purchased value (0 when nothing was purchased)
n_items            distinct items purchased
active_days        distinct purchase days
mean_gap_days      mean days between purchase occasions (tenure when only one)
category_entropy   entropy (nats) of the purchased value over item categories
top_category       category with the most purchased value (null without categories)
=================  ====================================================================

RFM scores are quintiles of the scored population (:class:`RFMScorer`): the 20/40/60/80%
quantiles of recency, frequency and monetary are the edges; a value's score is one plus
the number of edges strictly below it (recency reversed: recent is 5). Ties therefore
share a score. The named segment depends on the R and F scores only (M is reported
beside it), by the grid in :data:`SEGMENT_GRID` documented in ``docs/segments.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from ecomrec.errors import DataError

log = logging.getLogger(__name__)

DAY = 86400.0

FEATURE_COLUMNS: tuple[str, ...] = (
    "recency_days",
    "frequency",
    "monetary",
    "tenure_days",
    "mean_basket",
    "return_rate",
    "n_items",
    "active_days",
    "mean_gap_days",
    "category_entropy",
)

SEGMENTS: tuple[str, ...] = (
    "Champions",
    "Loyal",
    "Potential Loyalists",
    "New",
    "Promising",
    "Need Attention",
    "About to Sleep",
    "At Risk",
    "Can't Lose",
    "Hibernating",
)

# SEGMENT_GRID[r - 1][f - 1] is the segment of recency score r and frequency score f.
_H, _AR, _CL = "Hibernating", "At Risk", "Can't Lose"
_AS, _NA, _L = "About to Sleep", "Need Attention", "Loyal"
_P, _PL, _N, _C = "Promising", "Potential Loyalists", "New", "Champions"
SEGMENT_GRID: tuple[tuple[str, ...], ...] = (
    #  F=1  F=2  F=3  F=4  F=5
    (_H, _H, _AR, _AR, _CL),  # R=1
    (_H, _H, _AR, _AR, _CL),  # R=2
    (_AS, _AS, _NA, _L, _L),  # R=3
    (_P, _PL, _PL, _L, _L),  # R=4
    (_N, _PL, _PL, _C, _C),  # R=5
)


def segment_of(r: int, f: int) -> str:
    """Named RFM segment for recency score ``r`` and frequency score ``f`` (both 1-5)."""
    if not (1 <= r <= 5 and 1 <= f <= 5):
        raise DataError(f"RFM scores must be 1-5, got r={r}, f={f}")
    return SEGMENT_GRID[r - 1][f - 1]


def _value(col_price: str = "price") -> pl.Expr:
    return pl.col("quantity").cast(pl.Float64).abs() * pl.col(col_price).fill_null(0.0)


def customer_features(
    events: pl.DataFrame, cutoff_ts: int, items: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One row per customer who purchased before ``cutoff_ts``: ``user_id`` + FEATURE_COLUMNS
    (+ ``top_category``). Reads only events with ``ts < cutoff_ts``."""
    ev = events.filter(pl.col("ts") < int(cutoff_ts)).with_columns(_value().alias("value"))
    buys = ev.filter(pl.col("event_type") == "purchase")
    if buys.height == 0:
        raise DataError(f"no purchases before the cutoff {cutoff_ts}")
    cutoff = float(cutoff_ts)
    base = buys.group_by("user_id").agg(
        pl.col("ts").max().alias("last_ts"),
        pl.col("ts").min().alias("first_ts"),
        pl.col("ts").n_unique().alias("frequency"),
        pl.col("value").sum().alias("purchased"),
        pl.col("item_id").n_unique().alias("n_items"),
        (pl.col("ts") // int(DAY)).n_unique().alias("active_days"),
    )
    rets = (
        ev.filter(pl.col("event_type") == "return")
        .group_by("user_id")
        .agg(pl.col("value").sum().alias("returned"))
    )
    out = (
        base.join(rets, on="user_id", how="left")
        .with_columns(pl.col("returned").fill_null(0.0))
        .with_columns(
            ((cutoff - pl.col("last_ts")) / DAY).alias("recency_days"),
            pl.col("frequency").cast(pl.Float64),
            (pl.col("purchased") - pl.col("returned")).clip(lower_bound=0.0).alias("monetary"),
            ((cutoff - pl.col("first_ts")) / DAY).alias("tenure_days"),
            (pl.col("purchased") / pl.col("frequency")).alias("mean_basket"),
            pl.when(pl.col("purchased") > 0)
            .then(pl.col("returned") / pl.col("purchased"))
            .otherwise(0.0)
            .alias("return_rate"),
            pl.col("n_items").cast(pl.Float64),
            pl.col("active_days").cast(pl.Float64),
            pl.when(pl.col("frequency") > 1)
            .then((pl.col("last_ts") - pl.col("first_ts")) / DAY / (pl.col("frequency") - 1))
            .otherwise((cutoff - pl.col("first_ts")) / DAY)
            .alias("mean_gap_days"),
        )
    )
    cat = _category_mix(buys, items)
    out = out.join(cat, on="user_id", how="left").with_columns(
        pl.col("category_entropy").fill_null(0.0)
    )
    return out.select(["user_id", *FEATURE_COLUMNS, "top_category"]).sort("user_id")


def _category_mix(buys: pl.DataFrame, items: pl.DataFrame | None) -> pl.DataFrame:
    schema = {"user_id": pl.Int32(), "category_entropy": pl.Float64(), "top_category": pl.Utf8()}
    if (
        items is None
        or "category" not in items.columns
        or items["category"].null_count() == items.height
    ):
        return pl.DataFrame(schema=schema)
    per = (
        buys.join(items.select("item_id", "category"), on="item_id", how="left")
        .filter(pl.col("category").is_not_null())
        .group_by(["user_id", "category"])
        .agg(pl.col("value").sum())
        .with_columns((pl.col("value") / pl.col("value").sum().over("user_id")).alias("share"))
    )
    return (
        per.sort(["user_id", "value", "category"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .agg(
            (-(pl.col("share") * pl.col("share").log()).fill_nan(0.0).sum()).alias(
                "category_entropy"
            ),
            pl.col("category").first().alias("top_category"),
        )
        .select(list(schema))
        .cast(schema)  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class RFMScorer:
    """Quintile edges of recency, frequency and monetary fitted on a reference population.

    Fit once (e.g. on the customers at a cutoff) and reuse to score other customers the
    same way (serving, refreshes): scores do not depend on who else is scored.
    """

    recency_edges: tuple[float, ...]
    frequency_edges: tuple[float, ...]
    monetary_edges: tuple[float, ...]

    @classmethod
    def fit(cls, features: pl.DataFrame) -> RFMScorer:
        """Edges at the 20/40/60/80% quantiles (linear interpolation) of ``features``."""
        if features.height == 0:
            raise DataError("cannot fit RFM quintiles on zero customers")
        qs = [0.2, 0.4, 0.6, 0.8]

        def edges(col: str) -> tuple[float, ...]:
            return tuple(float(v) for v in np.quantile(features[col].to_numpy(), qs))

        return cls(edges("recency_days"), edges("frequency"), edges("monetary"))

    def score(self, features: pl.DataFrame) -> pl.DataFrame:
        """``features`` plus ``r_score, f_score, m_score`` (1-5), ``rfm_code`` and ``rfm_segment``."""

        def s(col: str, e: tuple[float, ...]) -> np.ndarray:
            v = features[col].to_numpy().astype(np.float64)
            return 1 + np.searchsorted(np.asarray(e), v, side="left")

        r = 6 - s("recency_days", self.recency_edges)  # fewer days since a purchase is better
        f = s("frequency", self.frequency_edges)
        m = s("monetary", self.monetary_edges)
        seg = [SEGMENT_GRID[ri - 1][fi - 1] for ri, fi in zip(r.tolist(), f.tolist())]
        return features.with_columns(
            pl.Series("r_score", r, dtype=pl.Int8),
            pl.Series("f_score", f, dtype=pl.Int8),
            pl.Series("m_score", m, dtype=pl.Int8),
            pl.Series("rfm_code", [f"{a}{b}{c}" for a, b, c in zip(r, f, m)], dtype=pl.Utf8),
            pl.Series("rfm_segment", seg, dtype=pl.Utf8),
        )


def rfm_table(
    events: pl.DataFrame,
    cutoff_ts: int,
    items: pl.DataFrame | None = None,
    scorer: RFMScorer | None = None,
) -> tuple[pl.DataFrame, RFMScorer]:
    """Features at the cutoff scored into RFM segments (fitting the quintiles if not given)."""
    feats = customer_features(events, cutoff_ts, items)
    sc = scorer or RFMScorer.fit(feats)
    return sc.score(feats), sc
