"""Label windows: churn / spend / high value, and no leakage across the cutoff."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecomrec.errors import DataError
from segments.labels import LabelConfig, cutoff_for, high_value_flags, make_labels
from segments.rfm import customer_features

from .test_rfm import CUT, DAY, frame


def shop(seed: int = 0, n_users: int = 40) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for _ in range(int(rng.integers(1, 12))):
            t = CUT + int(rng.integers(-200, 120)) * DAY + int(rng.integers(0, DAY))
            kind = "return" if rng.random() < 0.1 else "purchase"
            rows.append(
                (
                    u,
                    int(rng.integers(1, 20)),
                    t,
                    kind,
                    int(rng.integers(1, 5)),
                    float(rng.uniform(1, 30)),
                )
            )
    rows.append((1, 1, CUT - 300 * DAY, "purchase", 1, 1.0))  # every user 1..n bought before
    for u in range(2, n_users + 1):
        rows.append((u, 1, CUT - 250 * DAY, "purchase", 1, 1.0))
    rows.append((1, 1, CUT + 200 * DAY, "purchase", 1, 1.0))  # data reaches past the window
    return frame(rows)


def test_labels_on_planted_customers() -> None:
    ev = frame(
        [
            (1, 1, CUT - 5 * DAY, "purchase", 1, 10.0),
            (1, 1, CUT + 10 * DAY, "purchase", 2, 10.0),  # active, spends 20
            (2, 1, CUT - 5 * DAY, "purchase", 1, 10.0),  # churns
            (3, 1, CUT - 5 * DAY, "purchase", 1, 10.0),
            (3, 1, CUT + 91 * DAY, "purchase", 1, 10.0),  # just after the 90-day window: churned
            (4, 1, CUT - 5 * DAY, "purchase", 1, 10.0),
            (4, 1, CUT, "purchase", 10, 10.0),  # the cutoff instant belongs to the window
            (4, 1, CUT + DAY, "return", 2, 10.0),  # 100 - 20
            (5, 1, CUT - 5 * DAY, "purchase", 1, 10.0),
            (5, 1, CUT + 95 * DAY, "purchase", 1, 1.0),
        ]
    )
    lab = make_labels(ev, np.array([1, 2, 3, 4, 5]), CUT, LabelConfig(horizon_days=90))
    d = {r["user_id"]: r for r in lab.iter_rows(named=True)}
    assert [d[u]["churn"] for u in (1, 2, 3, 4, 5)] == [0, 1, 1, 0, 1]
    assert d[1]["future_spend"] == pytest.approx(20.0)
    assert d[4]["future_spend"] == pytest.approx(80.0)
    # top 20% of 5 customers = 1 customer: the biggest spender
    assert [d[u]["high_value"] for u in (1, 2, 3, 4, 5)] == [0, 0, 0, 1, 0]


def test_window_past_the_data_is_refused() -> None:
    ev = frame([(1, 1, CUT - DAY, "purchase", 1, 1.0), (1, 1, CUT + 10 * DAY, "purchase", 1, 1.0)])
    with pytest.raises(DataError):
        make_labels(ev, np.array([1]), CUT, LabelConfig(horizon_days=90))


def test_high_value_flags_top_share_with_ties_and_zeros() -> None:
    spend = np.array([0, 0, 0, 0, 0, 0, 0, 0, 5, 5.0])
    assert high_value_flags(spend, 0.8).tolist() == [False] * 8 + [True, True]
    assert not high_value_flags(np.zeros(10), 0.8).any()  # nobody spends: nobody is high value
    s = np.arange(100, dtype=float)
    assert high_value_flags(s, 0.8).sum() == 20


def test_cutoff_for_fits_the_window_and_steps_back() -> None:
    ev = frame([(1, 1, CUT, "purchase", 1, 1.0), (1, 1, CUT + 99 * DAY + 5, "purchase", 1, 1.0)])
    c = cutoff_for(ev, 30)
    assert c % DAY == 0 and c + 30 * DAY == CUT + 100 * DAY
    assert cutoff_for(ev, 30, offset_windows=1) == c - 30 * DAY


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_post_cutoff_changes_never_change_features(seed: int, scale: float) -> None:
    ev = shop(seed)
    rng = np.random.default_rng(seed)
    after = ev["ts"] >= CUT
    # rescale prices, drop some and add new events after the cutoff
    ev2 = ev.with_columns(
        pl.when(after).then(pl.col("price") * scale).otherwise(pl.col("price")).alias("price")
    )
    keep = ~after.to_numpy() | (rng.random(ev.height) < 0.5)
    extra = frame(
        [
            (
                int(rng.integers(1, 60)),
                3,
                CUT + int(rng.integers(0, 100 * DAY)),
                "purchase",
                5,
                99.0,
            )
            for _ in range(20)
        ]
    )
    ev2 = pl.concat([ev2.filter(pl.Series(keep)), extra])
    assert customer_features(ev, CUT).equals(customer_features(ev2, CUT))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0))
def test_pre_cutoff_changes_never_change_labels(seed: int, scale: float) -> None:
    ev = shop(seed)
    users = np.arange(1, 41)
    rng = np.random.default_rng(seed)
    before = ev["ts"] < CUT
    ev2 = ev.with_columns(
        pl.when(before).then(pl.col("price") * scale).otherwise(pl.col("price")).alias("price")
    )
    keep = ~before.to_numpy() | (rng.random(ev.height) < 0.5)
    extra = frame(
        [
            (
                int(rng.integers(1, 41)),
                4,
                CUT - int(rng.integers(1, 300 * DAY)),
                "purchase",
                3,
                50.0,
            )
            for _ in range(20)
        ]
    )
    ev2 = pl.concat([ev2.filter(pl.Series(keep)), extra])
    assert make_labels(ev, users, CUT).equals(make_labels(ev2, users, CUT))
