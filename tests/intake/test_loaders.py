"""Loaders on the real files (counts from ../shared/data/README.md) and on malformed input."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ecomrec.errors import DataError
from intake.loaders import load_dataset
from intake.loaders.contract import ContractOptions, load_contract, parse_mapping
from intake.loaders.s3rec import load_s3rec


@pytest.mark.realdata
def test_beauty_counts_ids_and_text(data_dir: Path) -> None:
    ds = load_dataset("beauty", data_dir)
    assert (ds.n_users, ds.n_items, ds.events.height) == (22363, 12101, 198502)
    # ids are kept as in the file: user 1's sequence is 1 2 3 4 5
    u1 = ds.events.filter(pl.col("user_id") == 1).sort("order")["item_id"].to_list()
    assert u1 == [1, 2, 3, 4, 5]
    assert ds.item_ids.to_external(1) == "B004756YJA"
    assert ds.users.to_external(1) == "A1YJEY40YUW4SE"
    assert ds.items["title"].is_not_null().sum() == 12094
    # HTML entities are unescaped
    assert not ds.items["title"].drop_nulls().str.contains("&amp;").any()
    # timestamps are aligned and non-decreasing within every user
    bad = (
        ds.events.sort("order")
        .group_by("user_id")
        .agg((pl.col("ts").diff() < 0).any().alias("bad"))
    )
    assert not bad["bad"].any()


@pytest.mark.realdata
def test_online_retail_drops_are_explained(data_dir: Path) -> None:
    ds = load_dataset("online-retail", data_dir)
    rep = ds.report
    assert rep.rows_in == 541909
    assert rep.dropped["no CustomerID"] == 135080
    assert rep.rows_in - rep.rows_dropped == ds.events.height
    assert ds.n_users == 4362
    # cancellations are kept as returns with positive quantity
    ret = ds.events.filter(pl.col("event_type") == "return")
    assert ret.height == rep.notes["cancellations kept as 'return' events"] > 0
    assert (ret["quantity"] > 0).all()
    assert (ds.events["price"] > 0).all()
    assert "POST" not in ds.item_ids.external_ids and "85123A" in ds.item_ids.external_ids


@pytest.mark.realdata
def test_cdnow_master_and_sample(data_dir: Path) -> None:
    m = load_dataset("cdnow", data_dir)
    assert (m.n_users, m.events.height) == (23570, 69659)
    s = load_dataset("cdnow-sample", data_dir)
    assert (s.n_users, s.events.height) == (2357, 6919)
    spend = (s.events["quantity"] * s.events["price"].fill_null(0)).sum()
    assert spend == pytest.approx(
        sum(float(line.split()[-1]) for line in (data_dir / "cdnow/CDNOW_sample.txt").open()),
        rel=1e-6,
    )


def _write_s3rec(tmp: Path, seqs: list[str], times: list[str] | None = None) -> Path:
    prefix = tmp / "Sports"
    (tmp / "Sports.txt").write_text("\n".join(seqs) + "\n")
    if times is not None:
        (tmp / "Sports_time.txt").write_text("\n".join(times) + "\n")
    return prefix


def test_s3rec_any_category_without_side_files(tmp_path: Path) -> None:
    prefix = _write_s3rec(tmp_path, ["1 3 1 2", "2 2 4"])
    ds = load_s3rec(prefix)
    assert ds.name == "sports" and (ds.n_users, ds.n_items) == (2, 4)
    assert ds.events.sort("order")["item_id"].to_list() == [3, 1, 2, 2, 4]
    assert ds.report.notes  # synthetic timestamps are reported
    assert load_dataset(str(prefix)).events.height == 5


def test_s3rec_misaligned_time_file_names_row_and_column(tmp_path: Path) -> None:
    prefix = _write_s3rec(tmp_path, ["1 3 1 2", "2 2 4"], ["1 10 20 30", "2 10"])
    with pytest.raises(DataError) as e:
        load_s3rec(prefix)
    msg = str(e.value)
    assert "Sports_time.txt" in msg and "line 2" in msg and "'ts'" in msg


def test_s3rec_non_integer_item(tmp_path: Path) -> None:
    prefix = _write_s3rec(tmp_path, ["1 3 x 2"])
    with pytest.raises(DataError, match=r"line 1.*item_id\[2\]"):
        load_s3rec(prefix)


def test_contract_mapping_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text(
        "cust,sku,when,kind,qty,amount\na,x,2024-01-01T10:00:00,view,1,2.5\na,y,2024-01-02T10:00:00,PURCHASE,2,3.0\nb,x,2024-01-03T10:00:00,cart,1,2.5\n"
    )
    mapping = parse_mapping(
        "customer_id=cust,product_id=sku,timestamp=when,event_type=kind,quantity=qty,price=amount"
    )
    ds = load_contract(f, None, ContractOptions(columns=mapping))
    assert (ds.n_users, ds.n_items) == (2, 2)
    assert ds.events.sort("order")["event_type"].to_list() == ["view", "purchase", "cart"]
    assert ds.events["ts"][0] == 1704103200

    bad = tmp_path / "bad.csv"
    bad.write_text("cust,sku,when\na,x,2024-01-01\nb,y,not-a-date\n")
    m3 = ContractOptions(columns=parse_mapping("customer_id=cust,product_id=sku,timestamp=when"))
    with pytest.raises(DataError, match=r"bad.csv, line 3, column 'when'.*not-a-date"):
        load_contract(bad, None, m3)
    kinds = tmp_path / "kinds.csv"
    kinds.write_text("u,i,t,e\na,x,1,view\na,x,2,wishlist\n")
    opts = ContractOptions(
        columns=parse_mapping("customer_id=u,product_id=i,timestamp=t,event_type=e")
    )
    with pytest.raises(DataError, match=r"line 3, column 'e'.*wishlist"):
        load_contract(kinds, None, opts)


def test_unknown_dataset_and_missing_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(str(tmp_path / "nothing"))
    monkeypatch.delenv("ECOMREC_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="ECOMREC_DATA_DIR"):
        load_dataset("beauty")


def test_dataset_save_load_round_trip(tmp_path: Path, shop) -> None:  # type: ignore[no-untyped-def]
    shop.save(tmp_path / "shop")
    back = load_dataset(str(tmp_path / "shop"))
    assert back.events.equals(shop.events)
    assert back.items.equals(shop.items)
    assert back.item_ids.external_ids == shop.item_ids.external_ids


def test_synthetic_shop_is_planted(shop) -> None:  # type: ignore[no-untyped-def]
    planted = shop.extra["planted"]
    ev = shop.events.join(shop.items.select("item_id", "category"), on="item_id")
    fav = pl.DataFrame(
        {"user_id": range(1, shop.n_users + 1), "fav": planted["favourite_category"]}
    )
    share = ev.join(fav, on="user_id").select((pl.col("category") == pl.col("fav")).mean()).item()
    assert share > 0.8
    lapsed = pl.DataFrame({"user_id": range(1, shop.n_users + 1), "lapsed": planted["lapsed"]})
    last = shop.events.group_by("user_id").agg(pl.col("ts").max()).join(lapsed, on="user_id")
    t_end = shop.events["ts"].max()
    assert last.filter(pl.col("lapsed") == 1)["ts"].max() < t_end - 0.3 * 365 * 86400
