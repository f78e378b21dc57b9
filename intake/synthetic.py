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
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from intake.dataset import Dataset, IdMap
from intake.loaders.contract import EVENT_COLUMNS
from intake.schema import DropReport

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


# ---------------------------------------------------------------------------------------
# A realistic synthetic shop written in the data contract (docs/data.md).

_THEMES: list[tuple[str, list[str]]] = [
    ("Home > Kitchen > Tea", ["Teapot", "Tea Cup", "Loose Tea", "Tea Strainer", "Kettle"]),
    ("Home > Living > Candles", ["Candle", "Lantern", "Candle Holder", "Wax Melt", "Diffuser"]),
    ("Beauty > Skin Care", ["Sunscreen", "Moisturiser", "Face Mask", "Serum", "Cleanser"]),
    ("Beauty > Hair", ["Shampoo", "Conditioner", "Hair Oil", "Brush", "Hair Clip"]),
    ("Fashion > Accessories", ["Scarf", "Wallet", "Belt", "Sunglasses", "Hat"]),
    ("Fashion > Shoes", ["Sneakers", "Boots", "Sandals", "Slippers", "Insoles"]),
    ("Stationery > Paper", ["Notebook", "Planner", "Sketchbook", "Envelope", "Postcard"]),
    ("Electronics > Audio", ["Headphones", "Speaker", "Earbuds", "Cable", "Charger"]),
    ("Toys > Games", ["Puzzle", "Board Game", "Card Game", "Dice Set", "Building Kit"]),
    ("Garden > Outdoor", ["Plant Pot", "Watering Can", "Seed Kit", "Garden Gloves", "Bird Feeder"]),
]
_BRANDS = ["Nordlys", "Maple & Co", "Brightwell", "Oakhaven", "Lumen", "Tidewater", "Kestrel"]


@dataclass(frozen=True)
class ShopConfig:
    """Size and behaviour of :func:`generate_shop` (deterministic for a given config)."""

    customers: int = 400
    products: int = 80
    days: int = 365
    end: str = "2026-06-30"  # last day of the log (UTC)
    repeat_fraction: float = 0.45  # customers who come back regularly
    loyal_fraction: float = 0.15  # frequent buyers
    churn_fraction: float = 0.3  # of repeat/loyal customers: stop at a random time
    return_rate: float = 0.08  # purchases returned a few days later
    views_per_session: float = 3.0
    seed: int = 0


def generate_shop(cfg: ShopConfig = ShopConfig()) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events, catalogue) frames in the data contract: string ids, four event types.

    Planted: each product belongs to a theme (category path); each customer has one or
    two favourite themes; one-off, repeat and loyal customers; churners stop visiting;
    sessions are view -> cart -> purchase funnels with order ids; some purchases are
    returned; visits peak in November-December and at weekends.
    """
    import datetime as dt

    if cfg.customers < 1 or cfg.products < 1 or cfg.days < 1:
        raise ValueError("customers, products and days must be >= 1")
    rng = np.random.default_rng(cfg.seed)
    n_th = min(len(_THEMES), max(1, cfg.products // 4))
    p_theme = np.arange(cfg.products) % n_th
    kinds = [_THEMES[t][1][(i // n_th) % len(_THEMES[t][1])] for i, t in enumerate(p_theme)]
    base_price = rng.lognormal(2.8, 0.6, cfg.products).round(2)
    # ids of different shapes: leading zeros, letters, dashes
    pids = [
        f"{i:05d}" if i % 5 == 0 else f"SKU-{_THEMES[t][0][:2].upper()}-{i:04d}"
        for i, t in enumerate(p_theme)
    ]
    catalogue = pl.DataFrame(
        {
            "product_id": pids,
            "title": [f"{_ADJ[i % len(_ADJ)]} {k}" for i, k in enumerate(kinds)],
            "description": [
                f"A {_ADJ[(i * 3) % len(_ADJ)].lower()} {k.lower()} from our "
                f"{_THEMES[t][0].split(' > ')[-1].lower()} range."
                for i, (k, t) in enumerate(zip(kinds, p_theme))
            ],
            "category": [_THEMES[t][0] for t in p_theme],
            "brand": [_BRANDS[(i * 7 + t) % len(_BRANDS)] for i, t in enumerate(p_theme)],
            "price": base_price,
            "available": rng.random(cfg.products) > 0.05,
        }
    )
    by_theme = [np.flatnonzero(p_theme == t) for t in range(n_th)]
    pop = rng.pareto(1.5, cfg.products) + 1.0  # within-theme popularity
    end = dt.datetime.fromisoformat(cfg.end).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
    t_end = int(end.timestamp())
    t_start = t_end - cfg.days * 86400
    # seasonality: day weights (Nov-Dec x2.5, weekends x1.4)
    days = np.arange(cfg.days)
    dates = [end - dt.timedelta(days=int(cfg.days - d)) for d in days]
    season = np.array(
        [(2.5 if d.month in (11, 12) else 1.0) * (1.4 if d.weekday() >= 5 else 1.0) for d in dates]
    )
    u_kind = rng.random(cfg.customers)
    loyal = u_kind < cfg.loyal_fraction
    repeat = (u_kind >= cfg.loyal_fraction) & (u_kind < cfg.loyal_fraction + cfg.repeat_fraction)
    churn = (loyal | repeat) & (rng.random(cfg.customers) < cfg.churn_fraction)
    rows: list[tuple[str, str, int, str, int, float, str | None, str]] = []
    n_order = 0
    for u in range(cfg.customers):
        cid = f"cust-{u + 1:05d}"
        favs = rng.choice(n_th, size=1 + int(rng.random() < 0.4), replace=False)
        n_sessions = (
            int(rng.poisson(14)) + 4 if loyal[u] else int(rng.poisson(5)) + 2 if repeat[u] else 1
        )
        first = int(rng.integers(0, max(1, cfg.days - 30)))
        # churners stop somewhere in the first two thirds of their remaining time
        stop = first + int(rng.integers(20, max(21, (cfg.days - first) * 2 // 3 + 21)))
        last = min(stop if churn[u] else cfg.days, cfg.days)
        window = season[first:last] if last > first else season[first : first + 1]
        sess_days = first + rng.choice(len(window), n_sessions, p=window / window.sum())
        for s_i, day in enumerate(np.sort(sess_days)):
            t0 = t_start + int(day) * 86400 + int(rng.integers(8 * 3600, 22 * 3600))
            sid = f"s{u}-{s_i}"
            theme = int(rng.choice(favs)) if rng.random() < 0.85 else int(rng.integers(n_th))
            pool = by_theme[theme]
            w = pop[pool] / pop[pool].sum()
            n_view = 1 + int(rng.poisson(cfg.views_per_session - 1))
            viewed = rng.choice(pool, size=min(n_view, len(pool)), replace=False, p=w)
            t = t0
            carted = []
            for p in viewed:
                rows.append((cid, pids[p], t, "view", 1, float(base_price[p]), None, sid))
                t += int(rng.integers(20, 300))
                if rng.random() < 0.35:
                    rows.append((cid, pids[p], t, "cart", 1, float(base_price[p]), None, sid))
                    carted.append(p)
                    t += int(rng.integers(10, 120))
            buy_p = 0.75 if (loyal[u] or repeat[u]) else 0.5
            if carted and rng.random() < buy_p:
                n_order += 1
                oid = f"ORD{n_order:07d}"
                for p in carted:
                    q = 1 + int(rng.random() < 0.2) * int(rng.integers(1, 4))
                    rows.append((cid, pids[p], t, "purchase", q, float(base_price[p]), oid, sid))
                    if rng.random() < cfg.return_rate:
                        rt = t + int(rng.integers(2, 20)) * 86400
                        if rt < t_end:
                            rows.append(
                                (cid, pids[p], rt, "return", q, float(base_price[p]), oid, sid)
                            )
    cols: list[tuple[Any, ...]] = list(zip(*rows)) if rows else [() for _ in range(8)]
    events = pl.DataFrame(
        {
            "customer_id": pl.Series(cols[0], dtype=pl.Utf8),
            "product_id": pl.Series(cols[1], dtype=pl.Utf8),
            "ts": pl.Series(cols[2], dtype=pl.Int64),
            "event_type": pl.Series(cols[3], dtype=pl.Utf8),
            "quantity": pl.Series(cols[4], dtype=pl.Int64),
            "price": pl.Series(cols[5], dtype=pl.Float64),
            "order_id": pl.Series(cols[6], dtype=pl.Utf8),
            "session_id": pl.Series(cols[7], dtype=pl.Utf8),
        }
    ).sort(["ts", "customer_id"])
    events = events.with_columns(
        pl.from_epoch("ts", time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("timestamp")
    ).select(*EVENT_COLUMNS)
    return events, catalogue


def write_shop(cfg: ShopConfig, out: str | Path, fmt: str = "csv") -> tuple[Path, Path]:
    """Write ``events.<fmt>`` and ``catalogue.<fmt>`` (csv or parquet) into ``out``."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"format must be csv or parquet, got {fmt!r}")
    events, catalogue = generate_shop(cfg)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    ep, cp = d / f"events.{fmt}", d / f"catalogue.{fmt}"
    if fmt == "csv":
        events.write_csv(ep)
        catalogue.write_csv(cp)
    else:
        events.write_parquet(ep)
        catalogue.write_parquet(cp)
    return ep, cp
