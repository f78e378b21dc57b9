"""Planted shops for the protocol / selection / serving tests (written as dataset folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

DAY = 86400


def planted_invoice_shop(
    root: Path, n_customers: int = 400, n_themes: int = 12, n_unseen: int = 6, seed: int = 0
) -> Path:
    """A shop's invoice log with a planted next purchase, ids only (no product text).

    Products come in themes of 4 (theme ``t`` = products ``4t+1 .. 4t+4``); a customer
    buys six invoices about 20 days apart whose themes follow one another
    (``t, t+1, t+2, ...`` mod ``n_themes``), each invoice two of the theme's products plus
    one random product of the 10 noise products: what comes next follows the LATEST
    invoice (a recency-weighted model wins over plain co-occurrence, which also ranks the
    unbought products of older themes). Invoices have times of day. ``n_unseen``
    catalogue products are never bought (no trained vector, no text). Returns the dataset
    folder (``Dataset.save``)."""
    from intake.dataset import Dataset, IdMap
    from intake.schema import DropReport

    rng = np.random.default_rng(seed)
    n_items = n_themes * 4 + 10
    noise = np.arange(n_themes * 4 + 1, n_items + 1)
    users, items, ts = [], [], []
    for u in range(1, n_customers + 1):
        start = int(rng.integers(0, 260)) * DAY
        t0 = int(rng.integers(0, n_themes))
        for s in range(6):
            t = start + s * 20 * DAY + int(rng.integers(8, 18)) * 3600 + int(rng.integers(0, 3600))
            theme = (t0 + s) % n_themes
            two = rng.choice(4, 2, replace=False) + 4 * theme + 1
            for it in [*two, rng.choice(noise)]:
                users.append(u)
                items.append(int(it))
                ts.append(t)
    n = len(users)
    ev = pl.DataFrame(
        {
            "user_id": np.asarray(users, np.int32),
            "item_id": np.asarray(items, np.int32),
            "ts": np.asarray(ts, np.int64) + 1_700_000_000 - 1_700_000_000 % DAY,
            "event_type": ["purchase"] * n,
            "quantity": np.ones(n, np.int32),
            "price": [None] * n,
            "order": np.arange(n, dtype=np.int64),
        },
        schema_overrides={"price": pl.Float64},
    )
    total = n_items + n_unseen
    ext = [f"P{i:04d}" for i in range(1, total + 1)]
    catalogue = pl.DataFrame(
        {"item_id": np.arange(1, total + 1, dtype=np.int32), "external_id": ext}
    )
    ds = Dataset(
        "planted-invoices",
        ev,
        catalogue,
        IdMap([f"C{u}" for u in range(1, n_customers + 1)]),
        IdMap(ext),
        DropReport("planted"),
    )
    out = root / "invoices"
    ds.save(out)
    return out


def next_theme(item: int, n_themes: int = 12) -> list[int]:
    """The products of the theme after ``item``'s in :func:`planted_invoice_shop`."""
    t = ((item - 1) // 4 + 1) % n_themes
    return list(range(4 * t + 1, 4 * t + 5))
