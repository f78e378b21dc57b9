"""A synthetic shop with a planted structure, for fast tests whose right answers are known.

Planted:
- every user has a favourite category and a price tier; ``p_taste`` of their purchases
  come from that category (cheap/expensive items according to the tier);
- within a category, items form a chain: after item ``i`` the next purchase is very often
  ``i + 1`` (a sequential signal a next-item model must learn, invisible to popularity);
- a fraction of customers lapse: they stop buying at a random time before the end;
- views and carts precede purchases with fixed probabilities.
Everything is returned in ``Dataset.extra["planted"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from towers.dataset import Dataset, IdMap
from towers.schema import DropReport

_CATEGORY_NAMES = [
    "Lipstick",
    "Shampoo",
    "Candle",
    "Teapot",
    "Notebook",
    "Headphones",
    "Sneakers",
    "Backpack",
    "Perfume",
    "Mug",
    "Lantern",
    "Blanket",
    "Sunscreen",
    "Wallet",
    "Puzzle",
    "Scarf",
]
_ADJ = [
    "Red",
    "Blue",
    "Vintage",
    "Classic",
    "Deluxe",
    "Mini",
    "Organic",
    "Soft",
    "Bright",
    "Golden",
]


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 600
    n_items: int = 240
    n_categories: int = 8
    mean_len: int = 12
    p_taste: float = 0.85
    p_chain: float = 0.7
    lapse_fraction: float = 0.3
    with_views: bool = False
    days: int = 365
    seed: int = 0


def make_shop(cfg: SyntheticConfig = SyntheticConfig()) -> Dataset:
    """Generate the shop; deterministic for a given config."""
    rng = np.random.default_rng(cfg.seed)
    n_cat = cfg.n_categories
    item_cat = np.arange(cfg.n_items) % n_cat  # item index -> category
    tier = (np.arange(cfg.n_items) // n_cat) % 2  # 0 cheap, 1 expensive
    price = np.where(
        tier == 0, rng.uniform(2, 10, cfg.n_items), rng.uniform(30, 90, cfg.n_items)
    ).round(2)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    fav = rng.integers(0, n_cat, cfg.n_users)
    user_tier = rng.integers(0, 2, cfg.n_users)
    lapsed = rng.random(cfg.n_users) < cfg.lapse_fraction
    t_end = cfg.days * 86400
    rows: list[tuple[int, int, int, str, int, float]] = []
    for u in range(cfg.n_users):
        n = max(4, int(rng.poisson(cfg.mean_len)))
        stop = rng.uniform(0.3, 0.6) * t_end if lapsed[u] else t_end
        times = np.sort(rng.uniform(0, stop, n)).astype(np.int64)
        cur = -1
        for t in times:
            if cur >= 0 and item_cat[cur] == fav[u] and rng.random() < cfg.p_chain:
                pos = int(np.searchsorted(by_cat[fav[u]], cur))
                nxt = int(by_cat[fav[u]][(pos + 1) % len(by_cat[fav[u]])])
            elif rng.random() < cfg.p_taste:
                cands = by_cat[fav[u]]
                pref = cands[tier[cands] == user_tier[u]]
                pool = pref if len(pref) and rng.random() < 0.8 else cands
                nxt = int(rng.choice(pool))
            else:
                nxt = int(rng.integers(0, cfg.n_items))
            if cfg.with_views:
                rows.append((u, nxt, int(t) - 600, "view", 1, float(price[nxt])))
                if rng.random() < 0.5:
                    rows.append((u, nxt, int(t) - 300, "cart", 1, float(price[nxt])))
            rows.append((u, nxt, int(t), "purchase", int(rng.integers(1, 4)), float(price[nxt])))
            cur = nxt
    arr = list(zip(*rows))
    events = (
        pl.DataFrame(
            {
                "user_id": np.asarray(arr[0], np.int32) + 1,
                "item_id": np.asarray(arr[1], np.int32) + 1,
                "ts": np.asarray(arr[2], np.int64) + 1_600_000_000,
                "event_type": list(arr[3]),
                "quantity": np.asarray(arr[4], np.int32),
                "price": np.asarray(arr[5], np.float64),
            }
        )
        .sort(["user_id", "ts"])
        .with_row_index("order")
        .with_columns(pl.col("order").cast(pl.Int64))
    )
    names = [
        f"{_ADJ[i % len(_ADJ)]} {_CATEGORY_NAMES[item_cat[i] % len(_CATEGORY_NAMES)]} {i}"
        for i in range(cfg.n_items)
    ]
    items = pl.DataFrame(
        {
            "item_id": np.arange(1, cfg.n_items + 1, dtype=np.int32),
            "external_id": [f"SKU{i:05d}" for i in range(cfg.n_items)],
            "title": names,
            "brand": [f"Brand{i % 5}" for i in range(cfg.n_items)],
            "category": [_CATEGORY_NAMES[c % len(_CATEGORY_NAMES)] for c in item_cat],
            "price": price,
        }
    )
    planted = {
        "favourite_category": [_CATEGORY_NAMES[c % len(_CATEGORY_NAMES)] for c in fav],
        "price_tier": user_tier.tolist(),
        "lapsed": lapsed.astype(int).tolist(),
        "item_category": [_CATEGORY_NAMES[c % len(_CATEGORY_NAMES)] for c in item_cat],
    }
    return Dataset(
        name="synthetic",
        events=events,
        items=items,
        users=IdMap([f"C{u:05d}" for u in range(cfg.n_users)]),
        item_ids=IdMap([f"SKU{i:05d}" for i in range(cfg.n_items)]),
        report=DropReport("synthetic", rows_in=events.height),
        extra={"format": "synthetic", "planted": planted, "config": cfg.__dict__},
    )
