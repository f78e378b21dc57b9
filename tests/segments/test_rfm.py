"""RFM features, quintile scores and the named-segment rules on planted customers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ecomrec.errors import DataError
from segments.rfm import SEGMENT_GRID, SEGMENTS, RFMScorer, customer_features, rfm_table, segment_of

DAY = 86400
CUT = 1_700_000_000 - 1_700_000_000 % DAY  # day-aligned cutoff


def frame(rows: list[tuple[int, int, int, str, int, float]]) -> pl.DataFrame:
    """Events from (user, item, ts, event_type, quantity, price) tuples."""
    u, i, t, e, q, p = zip(*rows)
    return pl.DataFrame(
        {
            "user_id": np.asarray(u, np.int32),
            "item_id": np.asarray(i, np.int32),
            "ts": np.asarray(t, np.int64),
            "event_type": list(e),
            "quantity": np.asarray(q, np.int32),
            "price": np.asarray(p, np.float64),
            "order": np.arange(len(u), dtype=np.int64),
        }
    )


def population() -> tuple[pl.DataFrame, dict[str, int]]:
    """100 filler customers spread over recency/frequency plus planted ones."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, 101):
        n = int(rng.integers(1, 8))
        last = int(rng.integers(5, 300))
        for j in range(n):
            rows.append((u, 1 + j, CUT - (last + 20 * j) * DAY, "purchase", 1, 10.0))
    planted = {
        "champion": 101,
        "hibernating": 102,
        "cant_lose": 103,
        "new": 104,
        "about_to_sleep": 105,
    }
    for j in range(30):  # frequent, bought yesterday
        rows.append((101, 2, CUT - (1 + 5 * j) * DAY, "purchase", 2, 50.0))
    rows.append((102, 3, CUT - 700 * DAY, "purchase", 1, 5.0))  # once, long ago
    for j in range(30):  # frequent, but long gone
        rows.append((103, 4, CUT - (500 + 5 * j) * DAY, "purchase", 2, 50.0))
    rows.append((104, 5, CUT - 1 * DAY, "purchase", 1, 5.0))  # one purchase, yesterday
    rows.append((105, 6, CUT - 150 * DAY, "purchase", 1, 5.0))  # once, middling recency
    return frame(rows), planted


def test_grid_covers_every_score_pair_and_all_ten_segments() -> None:
    names = {segment_of(r, f) for r in range(1, 6) for f in range(1, 6)}
    assert names == set(SEGMENTS)
    assert len(SEGMENTS) == 10
    assert len(SEGMENT_GRID) == 5 and all(len(row) == 5 for row in SEGMENT_GRID)
    with pytest.raises(DataError):
        segment_of(0, 3)


def test_planted_customers_land_in_expected_segments() -> None:
    ev, planted = population()
    tab, _ = rfm_table(ev, CUT)
    seg = dict(zip(tab["user_id"].to_list(), tab["rfm_segment"].to_list()))
    assert seg[planted["champion"]] == "Champions"
    assert seg[planted["hibernating"]] == "Hibernating"
    assert seg[planted["cant_lose"]] == "Can't Lose"
    assert seg[planted["new"]] == "New"
    assert seg[planted["about_to_sleep"]] == "About to Sleep"
    r = dict(zip(tab["user_id"].to_list(), tab["r_score"].to_list()))
    f = dict(zip(tab["user_id"].to_list(), tab["f_score"].to_list()))
    assert (r[101], f[101]) == (5, 5)
    assert (r[102], f[102]) == (1, 1)


def test_feature_values_on_a_hand_computed_customer() -> None:
    ev = frame(
        [
            (1, 1, CUT - 10 * DAY, "purchase", 2, 10.0),  # 20
            (1, 2, CUT - 10 * DAY, "purchase", 1, 30.0),  # same invoice: 30
            (1, 1, CUT - 4 * DAY, "purchase", 1, 10.0),  # 10
            (1, 1, CUT - 3 * DAY, "return", 1, 10.0),  # -10
            (1, 9, CUT + 1 * DAY, "purchase", 100, 100.0),  # after the cutoff: ignored
        ]
    )
    f = customer_features(ev, CUT).row(0, named=True)
    assert f["frequency"] == 2  # two distinct purchase timestamps
    assert f["recency_days"] == pytest.approx(4.0)
    assert f["tenure_days"] == pytest.approx(10.0)
    assert f["monetary"] == pytest.approx(50.0)  # 60 bought - 10 returned
    assert f["mean_basket"] == pytest.approx(30.0)
    assert f["return_rate"] == pytest.approx(10.0 / 60.0)
    assert f["n_items"] == 2
    assert f["mean_gap_days"] == pytest.approx(6.0)


def test_category_mix_entropy_and_top_category() -> None:
    ev = frame([(1, 1, CUT - DAY, "purchase", 1, 30.0), (1, 2, CUT - 2 * DAY, "purchase", 1, 10.0)])
    items = pl.DataFrame(
        {"item_id": [1, 2], "category": ["Candle", "Mug"]},
        schema={"item_id": pl.Int32, "category": pl.Utf8},
    )
    f = customer_features(ev, CUT, items).row(0, named=True)
    assert f["top_category"] == "Candle"
    p = np.array([0.75, 0.25])
    assert f["category_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_scorer_is_fixed_after_fit() -> None:
    ev, _ = population()
    feats = customer_features(ev, CUT)
    sc = RFMScorer.fit(feats)
    full = sc.score(feats)
    alone = sc.score(feats.filter(pl.col("user_id") == 101))
    assert alone["rfm_code"][0] == full.filter(pl.col("user_id") == 101)["rfm_code"][0]
    assert full["r_score"].is_between(1, 5).all() and full["m_score"].is_between(1, 5).all()
    # recency: more recent never scores lower
    srt = full.sort("recency_days")
    assert (np.diff(srt["r_score"].to_numpy().astype(int)) <= 0).all()


def test_no_purchases_before_cutoff_is_an_error() -> None:
    ev = frame([(1, 1, CUT + DAY, "purchase", 1, 1.0)])
    with pytest.raises(DataError):
        customer_features(ev, CUT)
