"""Catalogue payloads (real Beauty and Online Retail slices) and the user-vector collection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from ecomrec.errors import DataError
from indexing.base import UserFilter
from indexing.build import category_path, item_payloads
from indexing.store import exact_search
from indexing.users import audience, build_user_index, user_payloads


def test_category_path_prefixes() -> None:
    assert category_path("Beauty > Makeup > Nails | Beauty > Tools") == [
        "Beauty",
        "Beauty > Makeup",
        "Beauty > Makeup > Nails",
        "Beauty > Tools",
    ]
    assert category_path(None) == [] and category_path("") == []


def test_item_payloads_fields_and_defaults() -> None:
    items = pl.DataFrame(
        {
            "item_id": [1, 2],
            "external_id": ["A1", "B2"],
            "title": ["t", "u"],
            "brand": ["acme", None],
            "category": ["X > Y", None],
            "price": [3.5, None],
            "in_stock": [False, True],
        }
    )
    ids, pay = item_payloads(items, "run7", popularity=np.array([0, 5, 9]))
    assert ids.tolist() == [1, 2]
    assert pay[0] == {
        "external_id": "A1",
        "brand": "acme",
        "category": "X > Y",
        "category_path": ["X", "X > Y"],
        "price": 3.5,
        "in_stock": 0,
        "popularity": 5,
        "model_version": "run7",
    }
    assert pay[1]["price"] is None and pay[1]["in_stock"] == 1 and pay[1]["popularity"] == 9
    with pytest.raises(DataError, match="duplicate"):
        item_payloads(items.with_columns(pl.lit(1).alias("item_id")), "m")
    with pytest.raises(DataError, match=r"file shop\.csv.*price"):
        item_payloads(items.drop("price"), "m", source="shop.csv")


@pytest.mark.realdata
def test_payloads_from_real_catalogues(data_dir: Path) -> None:
    from intake.loaders import load_dataset

    beauty = load_dataset("beauty", data_dir)
    ids, pay = item_payloads(beauty.items, "m")
    assert len(ids) == 12101 and ids.min() == 1
    with_path = [p for p in pay if p["category_path"]]
    assert len(with_path) == len(pay)  # every Beauty item has a category path
    assert all(p["category_path"][0] == "Beauty" for p in with_path[:500])
    retail = load_dataset("online-retail", data_dir)
    ids_r, pay_r = item_payloads(retail.items, "m")
    prices = [p["price"] for p in pay_r if p["price"] is not None]
    assert len(ids_r) == retail.items.height and len(prices) > 0.9 * len(pay_r)
    assert min(prices) > 0


def test_user_collection_audience_matches_bruteforce(backend: str, tmp_path: Any) -> None:
    from indexing.build import open_store
    from tests.indexing.conftest import make_config

    store = open_store(make_config(backend, tmp_path))
    rng = np.random.default_rng(0)
    n, d = 300, 12
    uids = np.arange(1, n + 1)
    vecs = rng.normal(size=(n, d)).astype(np.float32)
    seg = {int(u): ("loyal" if u % 3 == 0 else "new") for u in uids}
    rfm = {int(u): ("champions" if u % 5 == 0 else "at_risk") for u in uids}
    churn = {int(u): float(u % 10) / 10 for u in uids}
    pay = user_payloads(
        uids, [f"U{u}" for u in uids], segments=seg, rfm_segments=rfm, churn_risk=churn
    )
    m = build_user_index(store, uids, vecs, pay, model_version="m")
    assert m.kind == "users" and m.count == n
    assert store.alias_target("items") is None  # the item alias is untouched
    q = rng.normal(size=d).astype(np.float32)
    f = UserFilter(segments=("loyal",), churn_min=0.5)
    hits = audience(store, q, 5, f)
    mask = np.array([f.matches(p, int(u)) for p, u in zip(pay, uids)])
    ex, _ = exact_search(vecs, uids, q[None], 5, mask=mask)
    assert [h.item_id for h in hits] == ex[0].tolist()
    assert all(h.payload["segment"] == "loyal" and h.payload["churn_risk"] >= 0.5 for h in hits)
    with pytest.raises(DataError, match="churn risk"):
        user_payloads(uids[:1], ["U1"], churn_risk={1: 1.5})
