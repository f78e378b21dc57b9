"""Audiences (exact user-vector search), per-customer plans and the offline theme check."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ecomrec.errors import InvalidArgumentError, NotFoundError
from segments.campaign import (
    ExactUserSearch,
    bought_before,
    plan_for_users,
    query_from_items,
    segment_mask,
    theme_precision,
)
from segments.rfm import rfm_table


def test_exact_search_matches_brute_force_and_respects_the_filter() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 16)).astype(np.float32)
    users = np.arange(1, 501)
    s = ExactUserSearch(users, v)
    q = rng.standard_normal(16)
    got, scores = s.search(q, 20)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    ref = users[np.argsort(-(vn @ (q / np.linalg.norm(q))))[:20]]
    assert got.tolist() == ref.tolist()
    assert np.all(np.diff(scores) <= 1e-7)
    allowed = users % 2 == 0
    got2, _ = s.search(q, 20, allowed)
    assert (got2 % 2 == 0).all() and len(got2) == 20
    assert s.search(q, 10_000)[0].shape == (500,)
    with pytest.raises(InvalidArgumentError):
        s.search(q, 0)


def test_query_from_items_is_the_normalised_mean() -> None:
    iv = np.zeros((4, 3), np.float32)
    iv[1] = [1, 0, 0]
    iv[2] = [0, 1, 0]
    assert np.allclose(query_from_items([1, 2], iv), np.array([1, 1, 0]) / np.sqrt(2))
    with pytest.raises(NotFoundError):
        query_from_items([7], iv)


def test_plan_excludes_bought_items_and_names_the_closest_past_purchase() -> None:
    iv = np.zeros((6, 3), np.float32)
    iv[1] = [1, 0, 0]  # bought
    iv[2] = [0.9, 0.1, 0]  # close to item 1
    iv[3] = [0, 1, 0]  # bought
    iv[4] = [0.1, 0.95, 0]  # close to item 3
    iv[5] = [0, 0, 1]  # unrelated
    titles = {1: "Red Candle", 2: "Pink Candle", 3: "Teapot", 4: "Teacup", 5: "Lamp"}
    user_vec = np.array([[1.0, 0.2, 0.0]])
    plans = plan_for_users(np.array([7]), user_vec, iv, {7: np.array([1, 3])}, titles, k=2)
    p = plans[0]
    assert p.items == [2, 4]
    assert "Red Candle" in p.reasons[0] and "Teapot" in p.reasons[1]
    assert p.scores[0] >= p.scores[1]


def test_segment_mask_by_rfm_name_and_behavioural_id() -> None:
    t = pl.DataFrame(
        {
            "rfm_segment": ["At Risk", "Champions", "At Risk"],
            "segment_id": [0, 1, 1],
            "segment_name": ["a", "b", "b"],
        }
    )
    assert segment_mask(t, "At Risk").tolist() == [True, False, True]  # type: ignore[union-attr]
    assert segment_mask(t, "1").tolist() == [False, True, True]  # type: ignore[union-attr]
    assert segment_mask(t, "b").tolist() == [False, True, True]  # type: ignore[union-attr]
    assert segment_mask(t, None) is None
    with pytest.raises(NotFoundError):
        segment_mask(t, "Nobody")


def test_theme_audience_beats_base_rate_on_planted_tastes(shop) -> None:  # type: ignore[no-untyped-def]
    """Customers whose planted favourite is the theme's category keep buying it: an audience
    from taste vectors must find them far above the base rate."""
    cats = sorted(set(shop.items["category"].to_list()))
    item_cat = np.array(
        [0] + [cats.index(c) for c in shop.items.sort("item_id")["category"].to_list()]
    )
    ev = shop.events.filter(pl.col("event_type") == "purchase")
    last_day = int(ev["ts"].max()) // 86400
    cut = (last_day + 1 - 120) * 86400
    tab, _ = rfm_table(shop.events, cut, shop.items)
    users = tab["user_id"].to_numpy()
    row = {int(u): i for i, u in enumerate(users.tolist())}
    vec = np.zeros((len(users), len(cats)))
    past = ev.filter(pl.col("ts") < cut)
    for u, it in zip(past["user_id"].to_list(), past["item_id"].to_list()):
        vec[row[u], item_cat[it]] += 1.0

    def embed_text(texts: list[str]) -> np.ndarray:
        return np.stack([np.eye(len(cats))[cats.index(t)] for t in texts])

    theme = cats[0]
    res = theme_precision(
        shop, tab, vec, embed_text, cut, 120, themes={theme: (theme, theme.lower())}, n=30
    )
    r = res.row(0, named=True)
    assert r["embedding"] >= 2 * r["base_rate"]
    assert r["embedding"] > 0.5
    for col in ("rfm_segment", "popularity", "keyword_history", "embedding_x_activity"):
        assert 0.0 <= r[col] <= 1.0
    b = bought_before(shop, cut, users[:3])
    assert all(len(v) > 0 for v in b.values())


def test_default_audience_method_is_chosen_on_validation() -> None:
    import polars as pl

    from segments.campaign import choose_method

    valid = pl.DataFrame(
        {
            "theme": ["a", "b"],
            "embedding": [0.1, 0.2],
            "keyword_history": [0.6, 0.5],
            "history_x_embedding": [0.7, 0.45],
            "popularity": [0.3, 0.3],
        }
    )
    assert choose_method(valid) == "history_x_embedding"  # mean 0.575 > 0.55
    assert choose_method(valid.drop("history_x_embedding")) == "keyword_history"
