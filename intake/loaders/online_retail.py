"""UCI Online Retail (id 352): invoices of a UK gift retailer, 2010-12-01 to 2011-12-09.

Handled explicitly, each counted in the :class:`DropReport`:
- invoices starting with ``C`` are cancellations -> ``event_type="return"`` with positive
  quantity (kept: they feed return rates; recommenders train on purchases only);
- rows without CustomerID -> dropped;
- StockCodes that are not products (POST, DOT, M, BANK CHARGES, AMAZONFEE, ...) -> dropped;
- zero or negative unit price -> dropped; negative quantity outside a cancellation
  (stock adjustments) -> dropped;
- description ``'nan'`` / empty -> missing title (the item keeps its most frequent real one).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ecomrec.errors import DataError
from intake.dataset import Dataset, densify
from intake.schema import DropReport, require_columns

COLUMNS = [
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
    "Country",
]
# Product stock codes start with five digits (85123A, 22423); DCGS* are real gift products.
PRODUCT_CODE = r"^(\d{5}|DCGS)"


def _customer_ids(dtype: pl.DataType) -> pl.Expr:
    """CustomerID as text: ``17850.0`` (a float column) -> ``17850``; text ids kept as they are."""
    c = pl.col("CustomerID")
    if dtype.is_float():
        return c.cast(pl.Int64).cast(pl.Utf8)
    return c.cast(pl.Utf8).str.strip_chars().str.replace(r"^(\d+)\.0$", "$1")


def load_online_retail(path: str | Path, name: str = "online-retail") -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=str(path))
    try:
        raw = (
            pl.read_parquet(path)
            if path.suffix == ".parquet"
            else pl.read_csv(path, infer_schema_length=10000)
        )
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot read: {e}", file=str(path)) from e
    require_columns(raw, COLUMNS, file=str(path))
    report = DropReport(str(path), rows_in=raw.height)
    df = raw.with_row_index("order").with_columns(
        pl.col("InvoiceNo").cast(pl.Utf8),
        pl.col("StockCode").cast(pl.Utf8).str.strip_chars(),
        pl.col("Description").cast(pl.Utf8).str.strip_chars(),
    )
    # types: Quantity integer, UnitPrice float, InvoiceDate datetime
    for col, dtype in (("Quantity", pl.Int64), ("UnitPrice", pl.Float64)):
        cast = df[col].cast(dtype, strict=False)
        bad = df.with_row_index("_r").filter(cast.is_null() & df[col].is_not_null())
        if bad.height:
            raise DataError(
                f"not a number: {bad[col][0]!r}", file=str(path), row=int(bad["_r"][0]), column=col
            )
        df = df.with_columns(cast.alias(col))
    if df.schema["InvoiceDate"] == pl.Utf8:
        parsed = df["InvoiceDate"].str.to_datetime(strict=False)
        bad = df.with_row_index("_r").filter(parsed.is_null() & df["InvoiceDate"].is_not_null())
        if bad.height:
            raise DataError(
                f"unparsable date {bad['InvoiceDate'][0]!r}",
                file=str(path),
                row=int(bad["_r"][0]),
                column="InvoiceDate",
            )
        df = df.with_columns(parsed.alias("InvoiceDate"))
    nulls = df.with_row_index("_r").filter(
        pl.col("InvoiceDate").is_null()
        | pl.col("StockCode").is_null()
        | pl.col("Quantity").is_null()
    )
    if nulls.height:
        raise DataError(
            "missing InvoiceDate/StockCode/Quantity", file=str(path), row=int(nulls["_r"][0])
        )

    def drop(mask: pl.Expr, reason: str) -> None:
        nonlocal df
        n = df.filter(mask).height
        report.drop(reason, n)
        df = df.filter(~mask)

    drop(pl.col("CustomerID").is_null(), "no CustomerID")
    drop(
        ~pl.col("StockCode").str.contains(PRODUCT_CODE),
        "non-product StockCode (POST, DOT, M, fees, ...)",
    )
    drop(pl.col("UnitPrice") <= 0, "zero or negative UnitPrice")
    is_cancel = pl.col("InvoiceNo").str.starts_with("C")
    drop((pl.col("Quantity") <= 0) & ~is_cancel, "non-positive Quantity outside a cancellation")
    drop((pl.col("Quantity") >= 0) & is_cancel, "cancellation with non-negative Quantity")
    report.note("cancellations kept as 'return' events", df.filter(is_cancel).height)
    nan_desc = pl.col("Description").is_null() | pl.col("Description").is_in(["nan", ""])
    report.note("'nan' or empty Description -> missing title", df.filter(nan_desc).height)

    df = df.with_columns(
        _customer_ids(df.schema["CustomerID"]).alias("customer"),
        pl.when(is_cancel).then(pl.lit("return")).otherwise(pl.lit("purchase")).alias("event_type"),
        pl.col("Quantity").abs().cast(pl.Int32).alias("quantity"),
        pl.col("UnitPrice").alias("price"),
        (pl.col("InvoiceDate").cast(pl.Datetime("us")).dt.epoch("s")).alias("ts"),
        pl.when(nan_desc).then(None).otherwise(pl.col("Description")).alias("Description"),
    )
    events, users, items = densify(df, "customer", "StockCode")
    events = events.select(
        "user_id",
        "item_id",
        "ts",
        "event_type",
        "quantity",
        "price",
        pl.col("order").cast(pl.Int64),
        "InvoiceNo",
        "Country",
    )

    # One row per product: most frequent real description, median purchase price.
    titles = (
        df.filter(pl.col("Description").is_not_null())
        .group_by("StockCode", "Description")
        .len()
        .sort(["StockCode", "len", "Description"], descending=[False, True, False])
        .unique("StockCode", keep="first")
        .select(
            pl.col("StockCode").alias("external_id"),
            pl.col("Description").str.to_titlecase().alias("title"),
        )
    )
    prices = (
        df.group_by("StockCode").agg(pl.col("price").median()).rename({"StockCode": "external_id"})
    )
    items_frame = (
        items.to_frame("item_id")
        .join(titles, on="external_id", how="left")
        .join(prices, on="external_id", how="left")
        .with_columns(
            pl.lit(None, dtype=pl.Utf8).alias("brand"),
            pl.lit(None, dtype=pl.Utf8).alias("category"),
        )
    )
    countries = events.group_by("user_id").agg(pl.col("Country").mode().first())
    return Dataset(
        name=name,
        events=events.drop("InvoiceNo", "Country"),
        items=items_frame,
        users=users,
        item_ids=items,
        report=report,
        extra={
            "format": "online_retail",
            "path": str(path),
            "n_countries": countries["Country"].n_unique(),
        },
    )
