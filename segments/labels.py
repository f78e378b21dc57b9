"""Labels from the window after a cutoff: churn, future spend (CLV) and high value.

The label window of a cutoff ``c`` and horizon ``H`` days is ``[c, c + H * 86400)``;
features (:mod:`segments.rfm`) read only ``ts < c``. Labels are computed for an
explicit list of customers (normally those with a purchase before the cutoff), and
read nothing before the cutoff, so editing pre-cutoff history never changes a label
and editing post-cutoff events never changes a feature.

- ``churn``: 1 when the customer makes no purchase in the window;
- ``future_spend``: purchased minus returned value in the window, floored at 0;
- ``future_orders``: purchase occasions in the window;
- ``high_value``: 1 for the top ``1 - high_value_quantile`` (default 20%) of the
  population by ``future_spend``: spend >= the spend of the customer ranked
  ``ceil(0.2 n)``-th, and > 0 (ties at the boundary are all included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from ecomrec.errors import DataError

DAY = 86400


@dataclass(frozen=True)
class LabelConfig:
    """Label window definition."""

    horizon_days: int = 90
    high_value_quantile: float = 0.8
    require_full_window: bool = True

    def __post_init__(self) -> None:
        if self.horizon_days <= 0:
            raise ValueError(f"horizon_days must be > 0, got {self.horizon_days}")
        if not 0.0 < self.high_value_quantile < 1.0:
            raise ValueError("high_value_quantile must be in (0, 1)")


def make_labels(
    events: pl.DataFrame,
    users: np.ndarray | pl.Series,
    cutoff_ts: int,
    cfg: LabelConfig = LabelConfig(),
    *,
    data_end_ts: int | None = None,
) -> pl.DataFrame:
    """``user_id, churn, future_spend, future_orders, high_value`` for ``users``.

    ``data_end_ts`` (default: the last event's ts) must reach the end of the window when
    ``cfg.require_full_window``: a window cut short by the end of the data would call
    active customers churned.
    """
    start = int(cutoff_ts)
    end = start + cfg.horizon_days * DAY
    if cfg.require_full_window:
        last = int(data_end_ts) if data_end_ts is not None else int(events["ts"].max())  # type: ignore[arg-type]
        # the data must reach the last day of the window
        if last < end - DAY:
            raise DataError(
                f"the label window [{start}, {end}) ends after the data ({last}); "
                "choose an earlier cutoff or a shorter horizon"
            )
    users_s = pl.Series("user_id", np.asarray(users), dtype=pl.Int32).unique().sort()
    win = events.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).with_columns(
        (pl.col("quantity").cast(pl.Float64).abs() * pl.col("price").fill_null(0.0)).alias("value")
    )
    agg = win.group_by("user_id").agg(
        pl.col("value").filter(pl.col("event_type") == "purchase").sum().alias("bought"),
        pl.col("value").filter(pl.col("event_type") == "return").sum().alias("returned"),
        pl.col("ts").filter(pl.col("event_type") == "purchase").n_unique().alias("future_orders"),
    )
    out = (
        users_s.to_frame()
        .join(agg, on="user_id", how="left")
        .with_columns(
            pl.col("future_orders").fill_null(0).cast(pl.Int64),
            (pl.col("bought").fill_null(0.0) - pl.col("returned").fill_null(0.0))
            .clip(lower_bound=0.0)
            .alias("future_spend"),
        )
        .with_columns((pl.col("future_orders") == 0).cast(pl.Int8).alias("churn"))
    )
    spend = out["future_spend"].to_numpy()
    hv = high_value_flags(spend, cfg.high_value_quantile)
    return out.with_columns(pl.Series("high_value", hv.astype(np.int8))).select(
        ["user_id", "churn", "future_spend", "future_orders", "high_value"]
    )


def high_value_flags(spend: np.ndarray, quantile: float = 0.8) -> np.ndarray:
    """(n,) bool: the top ``1 - quantile`` share by spend (boundary ties included, spend > 0)."""
    n = len(spend)
    if n == 0:
        return np.zeros(0, dtype=bool)
    k = max(1, math.ceil((1.0 - quantile) * n))
    thr = np.sort(spend)[::-1][k - 1]
    return np.asarray((spend >= thr) & (spend > 0))


def cutoff_for(events: pl.DataFrame, horizon_days: int, *, offset_windows: int = 0) -> int:
    """The latest day-aligned cutoff whose label window fits in the data, moved
    ``offset_windows`` horizons earlier (1 gives the training cutoff before a test one)."""
    last_day = int(events["ts"].max()) // DAY  # type: ignore[arg-type]
    cut_day = last_day + 1 - horizon_days * (1 + offset_windows)
    return cut_day * DAY
