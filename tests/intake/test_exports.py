"""Real export semantics of the data contract (docs/data.md "Shop exports"), each on a file
written the way a shop exports it: returns by rule, non-product codes, repeated invoice
lines, truncated lines, ids as written, empty quantities, mappings that name nothing,
product attributes on event rows, click logs without a type, the currency; and the one
reader shared by ``data import`` and the streaming ingest (the same events on both roads).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from ecomrec.cli import main
from ecomrec.errors import ConfigError, DataError
from intake.dataset import Dataset
from intake.ingest import IngestConfig, ingest_event_log
from intake.loaders.contract import MERGED_NOTE, ContractOptions, load_contract, parse_mapping
from intake.synthetic import ShopConfig, write_shop

NOW = 1_800_000_000
# An invoice export in the shop's own columns and dates (month/day/year, no leading zeros).
INVOICES = (
    "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    "536365,85123A,WHITE HANGING HEART,6,12/1/2010 8:26,2.55,17850,United Kingdom\n"
    "536365,85123A,WHITE HANGING HEART,4,12/1/2010 8:26,2.45,17850,United Kingdom\n"
    "536365,71053,WHITE METAL LANTERN,6,12/1/2010 8:26,3.39,17850,United Kingdom\n"
    "536365,POST,POSTAGE,1,12/1/2010 8:26,18.00,17850,United Kingdom\n"
    "536366,22633,HAND WARMER UNION JACK,6,12/1/2010 8:28,1.85,17850,United Kingdom\n"
    "536367,C2,CARRIAGE,1,12/1/2010 8:34,50.00,13047,United Kingdom\n"
    "536367,gift_0001_20,GIFT VOUCHER,1,12/1/2010 8:34,17.02,13047,United Kingdom\n"
    "536367,71053,WHITE METAL LANTERN,2,12/1/2010 8:34,3.39,13047,United Kingdom\n"
    "C536379,85123A,WHITE HANGING HEART,-2,12/1/2010 9:41,2.55,17850,United Kingdom\n"
    "C536379,85123A,WHITE HANGING HEART,-1,12/1/2010 9:41,2.55,17850,United Kingdom\n"
    "536380,22633,HAND WARMER UNION JACK,3,12/2/2010 10:00,1.85,,United Kingdom\n"
)
INVOICE_FLAGS = [
    "--map",
    "customer_id=CustomerID,product_id=StockCode,timestamp=InvoiceDate,quantity=Quantity,"
    "price=UnitPrice,order_id=InvoiceNo,title=Description",
    "--timestamp-format",
    "%m/%d/%Y %H:%M",
    "--timezone",
    "Europe/London",
    "--returns",
    "order_id startswith C",
    "--not-products",
    "POST,DOT,M,C2,BANK CHARGES",
    "--not-products-pattern",
    "gift_.*",
    "--currency",
    "GBP",
    "--now",
    "2027-01-01",
]


def _invoice_options() -> ContractOptions:
    return ContractOptions(
        columns=parse_mapping(INVOICE_FLAGS[1]),
        timestamp_format="%m/%d/%Y %H:%M",
        timezone="Europe/London",
        returns="order_id startswith C",
        not_products=("POST", "DOT", "M", "C2", "BANK CHARGES"),
        not_products_pattern="gift_.*",
        currency="GBP",
        now=NOW,
    )


def _rows(ds: Dataset) -> list[tuple[str, str, str, int, float | None]]:
    ev = ds.events.sort("order")
    return [
        (
            ds.users.to_external(u),
            ds.item_ids.to_external(i),
            t,
            q,
            None if p is None else round(p, 6),
        )
        for u, i, t, q, p in ev.select(
            "user_id", "item_id", "event_type", "quantity", "price"
        ).rows()
    ]


def test_invoice_export_returns_non_products_and_repeated_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "invoices.csv"
    f.write_text(INVOICES)
    out = tmp_path / "shop"
    assert main(["data", "import", "--events", str(f), "--out", str(out), *INVOICE_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "not a product (--not-products): POST" in printed
    ds = Dataset.load(out)
    # never a product: postage, carriage, vouchers are in no map and no event
    assert set(ds.item_ids.external_ids) == {"85123A", "71053", "22633"}
    assert ds.report.dropped == {
        "no customer_id (guest or missing)": 1,
        "not a product (--not-products): POST": 1,
        "not a product (--not-products): C2": 1,
        "not a product (--not-products): gift_0001_20": 1,
    }
    assert ds.report.notes == {
        "purchase rows made returns by the rule 'order_id startswith C'": 2,
        "returns with negative quantity (made positive)": 2,
        MERGED_NOTE: 2,  # two repeated lines: one in 536365, one in C536379
    }
    # repeated lines summed: 6 + 4 units, revenue 6*2.55 + 4*2.45 kept (mean price 2.51)
    assert _rows(ds) == [
        ("17850", "85123A", "purchase", 10, 2.51),
        ("17850", "71053", "purchase", 6, 3.39),
        ("17850", "22633", "purchase", 6, 1.85),
        ("13047", "71053", "purchase", 2, 3.39),
        ("17850", "85123A", "return", 3, 2.55),
    ]
    # product attributes from event rows (no catalogue); the currency is kept for reports
    titles = dict(zip(ds.items["external_id"].to_list(), ds.items["title"].to_list()))
    assert titles["85123A"] == "WHITE HANGING HEART"
    assert ds.extra["currency"] == "GBP"
    # 12/1/2010 8:26 in London (GMT in December) = 08:26 UTC
    assert int(ds.events.sort("order")["ts"][0]) == 1291191960


def test_returns_rule_on_quantity_and_bad_rules(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text(
        "customer_id,product_id,timestamp,quantity,price\n"
        "a,p1,2024-01-01T10:00:00Z,2,5.0\n"
        "a,p1,2024-01-09T10:00:00Z,-1,5.0\n"  # a refund line: negative quantity
    )
    ds = load_contract(f, None, ContractOptions(returns="quantity < 0", now=NOW))
    assert [r[2:4] for r in _rows(ds)] == [("purchase", 2), ("return", 1)]
    # without the rule the negative line is a counted drop, never silently kept
    plain = load_contract(f, None, ContractOptions(now=NOW))
    assert plain.report.dropped == {"zero or negative quantity outside a return": 1}
    with pytest.raises(ConfigError, match="COLUMN OP VALUE"):
        ContractOptions(returns="order_id begins C")
    with pytest.raises(DataError, match=r"no column 'InvoiceNo'"):
        load_contract(f, None, ContractOptions(returns="InvoiceNo startswith C", now=NOW))


def test_not_products_leave_the_catalogue_too(tmp_path: Path) -> None:
    ev = tmp_path / "ev.csv"
    ev.write_text("customer_id,product_id,timestamp\na,TEA,1704103200\na,POST,1704103200\n")
    cat = tmp_path / "cat.csv"
    cat.write_text("product_id,title\nTEA,Tea\nPOST,Postage\nCUP,Cup\n")
    ds = load_contract(ev, cat, ContractOptions(not_products=("POST",), now=NOW))
    assert ds.item_ids.external_ids == ["TEA", "CUP"]  # POST cannot be recommended cold
    assert ds.report.dropped == {
        "catalogue rows that are not products (--not-products)": 1,
        "not a product (--not-products): POST": 1,
    }


def test_same_product_twice_in_an_order_without_order_id_is_summed(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text(
        "customer_id,product_id,timestamp,event_type,quantity,price\n"
        "a,p1,2024-01-01T10:00:00Z,purchase,1,2.0\n"
        "a,p1,2024-01-01T10:00:00Z,purchase,1,2.0\n"  # same line twice: two units bought
        "a,p1,2024-01-01T10:00:00Z,view,1,\n"
        "a,p1,2024-01-01T10:00:00Z,view,1,\n"  # the same view twice: one view
    )
    ds = load_contract(f, None, ContractOptions(now=NOW))
    assert sorted(r[2:4] for r in _rows(ds)) == [("purchase", 2), ("view", 1)]
    assert ds.report.notes == {MERGED_NOTE: 1} and ds.report.dropped == {"exact duplicate": 1}


@pytest.mark.parametrize(
    "tail",
    ["a,p2,2024-01-0", "a,p2", "17850"],  # cut mid-field, cut after a field, only an id
)
def test_a_truncated_last_line_is_an_error_on_both_roads(tmp_path: Path, tail: str) -> None:
    f = tmp_path / "ev.csv"
    f.write_text(
        "customer_id,product_id,timestamp,event_type\n"
        "a,p1,2024-01-01T10:00:00Z,view\n"
        f"b,p1,2024-01-02T10:00:00Z,view\n{tail}"
    )
    with pytest.raises(DataError, match=r"ev.csv, line 4: \d field\(s\) where the header has 4"):
        load_contract(f, None, ContractOptions(now=NOW))
    with pytest.raises(DataError, match=r"line 4: .*truncated or ragged"):
        ingest_event_log(f, tmp_path / "out", IngestConfig(progress=False))
    assert not (tmp_path / "out" / "events").exists()


def test_ids_are_kept_exactly_as_written(tmp_path: Path) -> None:
    ev = tmp_path / "ev.csv"
    ev.write_text(
        'customer_id,product_id,timestamp\n"A1",007,1704103200\n" A1","007 ",1704103200\n'
        '"  ",007,1704103200\n'
    )
    ds = load_contract(ev, None, ContractOptions(now=NOW))
    assert ds.users.external_ids == [" A1", "A1"]
    assert ds.item_ids.external_ids == ["007", "007 "]
    assert ds.report.dropped == {"no customer_id (guest or missing)": 1}  # blank = missing
    cat = tmp_path / "cat.csv"
    cat.write_text('product_id,title\n007,Tea\n" 008",Cup\n" 008",Mug\n')
    with pytest.raises(DataError, match=r"line 4, column 'product_id': product_id ' 008' appears"):
        load_contract(ev, cat, ContractOptions(now=NOW))


def test_an_empty_quantity_is_one_in_csv_and_parquet(tmp_path: Path) -> None:
    csv = tmp_path / "ev.csv"
    csv.write_text(
        "customer_id,product_id,timestamp,quantity\na,p1,1704103200,\na,p2,1704103300,3\n"
    )
    pq = tmp_path / "ev.parquet"
    pl.DataFrame(
        {
            "customer_id": ["a", "a"],
            "product_id": ["p1", "p2"],
            "timestamp": [1704103200, 1704103300],
            "quantity": [None, 3],
        }
    ).write_parquet(pq)
    for f in (csv, pq):
        ds = load_contract(f, None, ContractOptions(now=NOW))
        assert [r[3] for r in _rows(ds)] == [1, 3]
        assert ds.report.notes == {"empty quantity -> 1": 1}


def test_a_mapping_that_names_nothing_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "ev.csv"
    f.write_text("cust,product_id,timestamp\na,p1,1704103200\n")
    out = tmp_path / "shop"
    rc = main(["data", "import", "--events", str(f), "--out", str(out), "--map",
               "customer_id=cust,price=UnitPrice"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "ev.csv" in err and "no column 'UnitPrice'" in err, err
    rc = main(["data", "import", "--events", str(f), "--out", str(out), "--map",
               "customer_id=cust,items.title=Description"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no catalogue (--items) was given" in err, err
    assert not out.exists()


def test_product_attributes_from_event_rows_latest_wins(tmp_path: Path) -> None:
    f = tmp_path / "clicks.csv"
    f.write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
        "user_session\n"
        "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,s1\n"
        "2019-10-02 00:00:00 UTC,view,44600062,2103807459595387724,beauty.care,shiseido,"
        "32.00,541312140,s1\n"
        "2019-10-01 12:00:00 UTC,purchase,3900821,2053013552326770905,appliances.water,aqua,"
        "33.20,554748717,s2\n"
    )
    opts = ContractOptions(
        columns=parse_mapping(
            "customer_id=user_id,timestamp=event_time,category=category_code,session_id=user_session"
        ),
        timestamp_format="%Y-%m-%d %H:%M:%S UTC",
        now=NOW,
    )
    ds = load_contract(f, None, opts)
    items = {r["external_id"]: r for r in ds.items.iter_rows(named=True)}
    # the latest row wins (2019-10-02), an empty cell does not erase a value
    assert items["44600062"]["price"] == 32.0 and items["44600062"]["category"] == "beauty.care"
    assert items["44600062"]["brand"] == "shiseido"
    assert items["3900821"]["category"] == "appliances.water"


def test_a_click_log_without_a_type_column_is_views(tmp_path: Path) -> None:
    f = tmp_path / "clicks.csv"
    f.write_text("session,item,ts\ns1,p1,1704103200\ns1,p2,1704103300\n")
    opts = ContractOptions(
        columns=parse_mapping("customer_id=session,product_id=item,timestamp=ts"),
        event_type="view",
        now=NOW,
    )
    assert {r[2] for r in _rows(load_contract(f, None, opts))} == {"view"}
    with pytest.raises(ConfigError, match="event_type 'clicked'"):
        ContractOptions(event_type="clicked")


def test_one_reader_for_import_and_the_streaming_ingest(tmp_path: Path) -> None:
    """The same shop as CSV and as Parquet with ISO text timestamps: the same events through
    `data import` and through the streaming ingest (chunked, so chunks cross orders)."""
    ep, _ = write_shop(ShopConfig(customers=80, products=30, days=120, seed=5), tmp_path / "s")
    raw = pl.read_csv(ep, infer_schema_length=0)
    assert raw["timestamp"][0].endswith("Z")  # 2025-07-02T13:18:58Z form
    # a shop's own export habits: repeated order lines and a cancelled order
    dup = raw.filter(pl.col("event_type") == "purchase").head(3)
    raw = pl.concat([raw, dup])
    pq_dir = tmp_path / "log" / "month=1"
    pq_dir.mkdir(parents=True)
    half = raw.height // 2
    raw.head(half).write_parquet(pq_dir / "part-0.parquet")  # text timestamps in Parquet
    raw.tail(raw.height - half).write_parquet(pq_dir / "part-1.parquet")
    csv = tmp_path / "events.csv"
    raw.write_csv(csv)
    opts = ContractOptions(now=NOW)
    want = load_contract(csv, None, opts)
    assert want.report.notes[MERGED_NOTE] >= 3

    def canon(ev: pl.DataFrame, users: list[str], items: list[str]) -> pl.DataFrame:
        return ev.select(
            pl.col("user_id").map_elements(lambda u: users[u - 1], return_dtype=pl.Utf8),
            pl.col("item_id").map_elements(lambda i: items[i - 1], return_dtype=pl.Utf8),
            "ts", "event_type", "quantity", pl.col("price").round(9), "order",
        ).sort("order")  # fmt: skip

    ref = canon(want.events, want.users.external_ids, want.item_ids.external_ids)
    for src in (pq_dir.parent, csv):
        out = tmp_path / f"ingest-{src.name}"
        res = ingest_event_log(
            src, out, IngestConfig(buckets=3, chunk_rows=700, progress=False), opts
        )
        got = pl.read_parquet(out / "events" / "**" / "*.parquet")
        users = pl.read_parquet(out / "customers.parquet")["customer_id"].to_list()
        items = pl.read_parquet(out / "products.parquet")["product_id"].to_list()
        assert users == want.users.external_ids and items == want.item_ids.external_ids
        assert canon(got, users, items).equals(ref), src
        assert res.rows == want.events.height and res.report["dropped"] == want.report.dropped
        assert res.report["notes"] == want.report.notes
        saved = json.loads((out / "ingest.json").read_text())
        assert saved["rows_in"] == raw.height


def test_the_ingest_command_takes_the_import_flags(tmp_path: Path) -> None:
    """`python -m intake.ingest` with the README's invoice flags = `data import`'s events."""
    from intake.ingest import main as ingest_main

    f = tmp_path / "invoices.csv"
    f.write_text(INVOICES)
    assert (
        main(["data", "import", "--events", str(f), "--out", str(tmp_path / "ds"), *INVOICE_FLAGS])
        == 0
    )
    ds = Dataset.load(tmp_path / "ds")
    out = tmp_path / "ingest"
    assert ingest_main([str(f), str(out), "--no-progress", "--buckets", "2", *INVOICE_FLAGS]) == 0
    ev = pl.read_parquet(out / "events" / "**" / "*.parquet").sort("order")
    users = pl.read_parquet(out / "customers.parquet")["customer_id"].to_list()
    items = pl.read_parquet(out / "products.parquet")
    got = [
        (users[u - 1], items["product_id"][i - 1], t, q, round(p, 6))
        for u, i, t, q, p in ev.select(
            "user_id", "item_id", "event_type", "quantity", "price"
        ).rows()
    ]
    assert got == _rows(ds)
    assert items.filter(pl.col("product_id") == "85123A")["title"][0] == "WHITE HANGING HEART"
    report = json.loads((out / "ingest.json").read_text())["report"]
    assert report["dropped"] == ds.report.dropped and report["notes"] == ds.report.notes
