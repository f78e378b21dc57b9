"""The data contract (docs/data.md): planted drop reports, the bad-input table, time zones,
column mapping, the three file forms, and ``--dataset`` taking the imported folder."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from ecomrec.cli import main
from ecomrec.errors import DataError
from intake.loaders import load_dataset
from intake.loaders.contract import ContractOptions, load_contract, parse_mapping

NOW = ContractOptions(now=1_800_000_000)  # 2027-01-15: fixed "now" for the future check


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_planted_drop_report_counts_each_case(tmp_path: Path) -> None:
    ev = _write(
        tmp_path / "ev.csv",
        "customer_id,product_id,timestamp,event_type,quantity,price,order_id\n"
        "c1,007,2024-01-01T10:00:00Z,view,1,2.5,\n"  # kept
        "c1,007,2024-01-01T10:00:00Z,view,1,2.5,\n"  # exact duplicate
        "c1,007,2024-01-01T10:00:00Z,view,3,2.5,\n"  # same event, other quantity
        "c1,A-1,2024-01-02T10:00:00Z,purchase,0,4.0,o1\n"  # zero quantity, not a return
        "c1,A-1,2024-01-02T11:00:00Z,purchase,-2,4.0,o1\n"  # negative, not a return
        "c1,A-1,2024-01-03T10:00:00Z,return,-1,4.0,o1\n"  # kept, quantity made 1
        "c2,A-1,2099-01-01T00:00:00Z,purchase,1,4.0,o2\n"  # future
        "c2,ZZZ,2024-01-04T10:00:00Z,purchase,1,4.0,o3\n"  # not in the catalogue
        ",A-1,2024-01-04T10:00:00Z,purchase,1,4.0,o4\n"  # no customer
        "c2,A-1,2024-01-05T10:00:00Z,cart,1,4.0,\n"  # kept
        "c2,007,1704448800,purchase,2,2.5,o5\n",  # kept (Unix seconds)
    )
    cat = _write(tmp_path / "cat.csv", "product_id,title\n007,Tea\nA-1,Pot\nB-2,Cup\n")
    ds = load_contract(ev, cat, NOW)
    assert ds.report.rows_in == 11
    assert ds.report.dropped == {
        "exact duplicate": 1,
        "same event twice (customer, product, timestamp, type), other fields differ: first kept": 1,
        "zero or negative quantity outside a return": 2,
        "timestamp in the future": 1,
        "product not in the catalogue": 1,
        "no customer_id (guest or missing)": 1,
    }
    assert ds.report.notes == {"returns with negative quantity (made positive)": 1}
    assert ds.events.height == 4
    # ids are kept as strings: leading zeros survive; catalogue products with no events too
    assert ds.item_ids.external_ids == ["007", "A-1", "B-2"]
    assert ds.users.external_ids == ["c1", "c2"]
    got = ds.events.sort("ts").select("event_type", "quantity").rows()
    assert got == [("view", 1), ("return", 1), ("cart", 1), ("purchase", 2)]


def test_time_zone_rule(tmp_path: Path) -> None:
    ev = _write(
        tmp_path / "ev.csv",
        "customer_id,product_id,timestamp\n"
        "a,x,2024-03-01T10:00:00+01:00\n"  # offset: converted to UTC (09:00)
        "b,x,2024-03-01T09:00:00Z\n"  # Z is UTC
        "c,x,2024-03-01 10:00:00\n"  # naive: the shop's time zone
        "d,x,1709283600\n"  # Unix seconds
        "e,x,1709283600000\n",  # Unix milliseconds
    )
    berlin = ContractOptions(timezone="Europe/Berlin", now=NOW.now)
    ds = load_contract(ev, None, berlin)
    by_user = dict(
        zip(
            [ds.users.to_external(int(u)) for u in ds.events["user_id"]],
            ds.events["ts"].to_list(),
        )
    )
    nine_utc = 1709283600  # 2024-03-01T09:00:00Z
    assert by_user == {u: nine_utc for u in "abcde"}
    # the same naive time read in UTC is an hour later
    utc = load_contract(ev, None, NOW)
    c = utc.users.to_internal("c")
    assert utc.events.filter(pl.col("user_id") == c)["ts"][0] == nine_utc + 3600


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("header.csv", b"customer_id,product_id,timestamp\n", r"header.csv: no data \(header only"),
        ("empty.csv", b"", r"empty.csv: file is empty"),
        (
            "latin1.csv",
            b"customer_id,product_id,timestamp\nA,B,2024-01-01\nA,caf\xe9,2024-01-02\n",
            r"latin1.csv, line 3: not UTF-8 text \(byte 0xe9",
        ),
        (
            "badtime.csv",
            b"customer_id,product_id,timestamp\nA,B,2024-01-01\nA,B,12/01/2024\n",
            r"badtime.csv, line 3, column 'timestamp': timestamp '12/01/2024' is not ISO 8601",
        ),
        (
            "badqty.csv",
            b"customer_id,product_id,timestamp,quantity\nA,B,2024-01-01,1\nA,B,2024-01-02,1.5\n",
            r"badqty.csv, line 3, column 'quantity': '1.5' is not a whole number",
        ),
        (
            "badtype.csv",
            b"customer_id,product_id,timestamp,event_type\nA,B,2024-01-01,wishlist\n",
            r"badtype.csv, line 2, column 'event_type': event type 'wishlist'",
        ),
        (
            "nocol.csv",
            b"user,product_id,timestamp\nA,B,2024-01-01\n",
            r"nocol.csv, column 'customer_id': missing required events column.*--map customer_id=",
        ),
        ("events.json", b"{}", r"unsupported file type '.json'"),
    ],
)
def test_bad_events_files_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: bytes, expect: str
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    out = tmp_path / "ds"
    rc = main(["data", "import", "--events", str(f), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    import re

    assert re.search(expect, err), err
    assert not out.exists()  # nothing half-written


def test_zero_row_parquet_duplicate_catalogue_and_empty_s3rec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z = tmp_path / "zero.parquet"
    pl.DataFrame(
        {"customer_id": [], "product_id": [], "timestamp": []},
        schema={"customer_id": pl.Utf8, "product_id": pl.Utf8, "timestamp": pl.Utf8},
    ).write_parquet(z)
    with pytest.raises(DataError, match=r"zero.parquet: no data \(0 rows\)"):
        load_contract(z)
    ev = _write(tmp_path / "ev.csv", "customer_id,product_id,timestamp\nA,B,2024-01-01\n")
    cat = _write(tmp_path / "cat.csv", "product_id,title\nB,x\nC,y\nB,z\n")
    with pytest.raises(DataError, match=r"cat.csv, line 4, column 'product_id'.*'B' appears twice"):
        load_contract(ev, cat, NOW)
    (tmp_path / "Empty.txt").write_text("")
    assert main(["data", "describe", "--dataset", str(tmp_path / "Empty")]) == 2
    err = capsys.readouterr().err
    assert "Empty.txt: file is empty" in err and len(err.strip().splitlines()) == 1


def test_mapping_toml_and_map_flag_parquet_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a shop export with its own names, partitioned by month
    src = pl.DataFrame(
        {
            "CustomerID": ["17850", "17850", "00042"],
            "StockCode": ["85123A", "71053", "85123A"],
            "InvoiceDate": ["2024-01-05 08:26:00", "2024-01-05 08:26:00", "2024-02-01 09:00:00"],
            "Qty": [6, 6, 1],
            "month": ["2024-01", "2024-01", "2024-02"],
        }
    )
    for m, part in src.group_by("month"):
        d = tmp_path / "events" / f"month={m[0]}"
        d.mkdir(parents=True)
        part.drop("month").write_parquet(d / "part-0.parquet")
    toml = _write(
        tmp_path / "map.toml",
        '[columns]\ncustomer_id = "CustomerID"\nproduct_id = "StockCode"\n'
        'timestamp = "InvoiceDate"\ntimezone = "Europe/London"\n',
    )
    rc, _ = _import(tmp_path, ["--mapping", str(toml)])  # timezone inside [columns]
    assert rc == 2 and "'timezone' is not a contract column" in capsys.readouterr().err
    toml.write_text(
        'timezone = "Europe/London"\n[columns]\ncustomer_id = "CustomerID"\n'
        'product_id = "StockCode"\ntimestamp = "InvoiceDate"\n'
    )
    rc, out = _import(tmp_path, ["--mapping", str(toml), "--map", "quantity=Qty"])
    assert rc == 0
    ds = load_dataset(str(out))
    assert sorted(ds.users.external_ids) == ["00042", "17850"]
    assert ds.events["quantity"].sum() == 13
    assert ds.events["event_type"].unique().to_list() == ["purchase"]  # the default type
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["fingerprint"] == ds.fingerprint()
    assert parse_mapping("items.title=Description") == (("items.title", "Description"),)


def _import(tmp_path: Path, extra: list[str]) -> tuple[int, Path]:
    out = tmp_path / "ds"
    argv = ["data", "import", "--events", str(tmp_path / "events"), "--out", str(out), *extra]
    return main([*argv, "--overwrite"]), out


def test_synth_import_round_trip_and_dataset_forms(tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    assert main(["data", "synth", "--customers", "60", "--products", "25", "--seed", "3",
                 "--out", str(shop)]) == 0  # fmt: skip
    out = tmp_path / "ds"
    assert main(["data", "import", "--events", str(shop / "events.csv"), "--items",
                 str(shop / "catalogue.csv"), "--out", str(out)]) == 0  # fmt: skip
    folder, imported, csv = (
        load_dataset(str(shop)),
        load_dataset(str(out)),
        load_dataset(str(shop / "events.csv")),
    )
    assert folder.fingerprint()["id"] == imported.fingerprint()["id"]  # same data, same id
    assert csv.events.height == folder.events.height  # no catalogue: products from events
    assert set(imported.events["event_type"].unique()) == {"view", "cart", "purchase", "return"}
    assert imported.users.external_ids[0] == "cust-00001"
    assert any(e.startswith("000") for e in imported.item_ids.external_ids)
    cats = imported.items["category"].drop_nulls().to_list()
    assert all(" > " in c for c in cats) and "description" in imported.items.columns
    # a second import onto the same folder needs --overwrite
    assert main(["data", "import", "--events", str(shop / "events.csv"), "--out", str(out)]) == 2
    # seeds are reproducible, sizes are honoured
    s2 = tmp_path / "shop2"
    assert main(["data", "synth", "--customers", "60", "--products", "25", "--seed", "3",
                 "--out", str(s2)]) == 0  # fmt: skip
    assert (s2 / "events.csv").read_bytes() == (shop / "events.csv").read_bytes()
    assert imported.n_users == 60 and imported.n_items == 25


def test_a_contract_parquet_is_not_read_as_online_retail(tmp_path: Path) -> None:
    f = tmp_path / "shop.parquet"
    pl.DataFrame(
        {
            "customer_id": ["alice", "bob"],
            "product_id": ["tea-pot", "X1"],  # not five-digit stock codes
            "timestamp": ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"],
            "event_type": ["view", "cart"],
        }
    ).write_parquet(f)
    ds = load_dataset(str(f))
    assert ds.users.external_ids == ["alice", "bob"]
    assert sorted(ds.item_ids.external_ids) == ["X1", "tea-pot"]
    assert ds.events["event_type"].to_list() == ["view", "cart"]


def test_online_retail_columns_with_text_customer_ids(tmp_path: Path) -> None:
    f = tmp_path / "or.csv"
    f.write_text(
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A,LANTERN,6,2010-12-01 08:26:00,2.55,C-17850,UK\n"
        "536366,22423,CAKESTAND,1,2010-12-01 09:00:00,12.75,17851.0,UK\n"
    )
    ds = load_dataset(str(f))
    assert ds.users.external_ids == ["17851", "C-17850"]


def test_import_bundled_synthetic_keeps_its_fingerprint(tmp_path: Path) -> None:
    from intake.synthetic import make_shop

    out = tmp_path / "syn"
    assert main(["data", "import", "--bundled", "synthetic", "--out", str(out)]) == 0
    assert load_dataset(str(out)).fingerprint()["id"] == make_shop().fingerprint()["id"]
