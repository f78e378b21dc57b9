"""The README's "Your own shop" commands, run exactly as written (subprocesses, real gRPC).

The blocks between the ``your-own-shop`` and ``your-own-invoices`` markers in README.md
are parsed and every line is run in a fresh folder; only the port (50051) is swapped for a
free one. The synthetic shop has string ids and all four event types, so this is the path
a new user takes; the invoice block runs on Online Retail written out as the shop's own
CSV (its column names, ``12/1/2010 8:26`` dates, cancellations, postage, repeated lines).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from intake.dataset import Dataset

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(block: str = "your-own-shop") -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {block}:start.*?```bash\n(.*?)```", text, re.S)
    assert m, f"README.md lost its {block} block"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _argv(line: str, port: int) -> list[str]:
    words = shlex.split(line.replace("50051", str(port)).rstrip("&").strip())
    assert words[0] == "ecomrec"
    return [sys.executable, "-m", "ecomrec", *words[1:]]


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENBLAS_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("ECOMREC_API_KEYS", None)
    return env


def run_block(
    lines: list[str], cwd: Path, check: Callable[[list[str], dict[str, Any]], None]
) -> dict[str, str]:
    """Run README lines in ``cwd`` (a trailing ``&`` starts the service); ``check`` gets each
    ``recommend`` line's argv and its ``--json`` answer. Returns each command's stdout."""
    port = _free_port()
    env = _env()
    server: subprocess.Popen[bytes] | None = None
    printed: dict[str, str] = {}
    try:
        for line in lines:
            argv = _argv(line, port)
            if line.endswith("&"):
                server = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                continue
            if argv[3] == "recommend":
                out = _until_ready(argv, cwd, env, server)
                recs = json.loads(
                    subprocess.run(
                        [*argv, "--json"], cwd=cwd, env=env, capture_output=True, check=True
                    ).stdout
                )
                check(argv, recs)
                assert out.count("\n") >= 5
                printed["recommend"] = out
                continue
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=900)
            assert r.returncode == 0, (line, r.stderr.decode()[-3000:])
            printed[argv[3]] = r.stdout.decode()
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    return printed


@pytest.mark.slow
def test_readme_your_own_shop_commands(tmp_path: Path) -> None:
    lines = readme_commands()
    assert len(lines) <= 5, "the README promises five commands or fewer"
    assert [ln.split()[1] for ln in lines] == ["data", "train", "serve", "recommend", "segments"]
    run_block(lines, tmp_path, lambda argv, recs: _check_recommendations(recs, tmp_path))
    # the shop the first command wrote: string ids, all four event types
    events = (tmp_path / "shop" / "events.csv").read_text().splitlines()
    kinds = {ln.split(",")[3] for ln in events[1:]}
    assert kinds == {"view", "cart", "purchase", "return"}
    # artifacts record what they were made from
    fp = json.loads((tmp_path / "runs" / "shop" / "fingerprint.json").read_text())["dataset"]
    mans = [
        json.loads(p.read_text())
        for p in (tmp_path / "artifacts" / "shop-index").rglob("manifest.json")
    ]
    # the item collection's versions (its text collection's point back at one: item_version)
    items = [m for m in mans if "item_version" not in m["provenance"]]
    assert items, "the serve --build-index command built no index version"
    assert all(m["provenance"]["dataset"]["id"] == fp["id"] for m in items)
    item_versions = {m["version"] for m in items}
    assert all(m["provenance"]["item_version"] in item_versions for m in mans if m not in items)
    report = (tmp_path / "reports" / "shop" / "report.html").read_text()
    assert "As of <b>2026-07-01</b>" in report and "data up to 2026-06-30" in report
    assert "Horizon <b>90 days</b>" in report and "checked at <b>" in report
    assert re.search(r"<td>\d+\.\d %</td>", report)  # shares as percentages
    assert report.count("class='cap'") >= 5  # a line of text per chart
    assert "<img" in report or "<svg" in report or "data:image/png" in report


def _until_ready(
    argv: list[str], cwd: Path, env: dict[str, str], server: subprocess.Popen[bytes] | None
) -> str:
    """Retry the client while the service loads (health NOT_SERVING -> UNAVAILABLE; while
    `serve --build-index` builds the index in the same process the server may also miss
    the client's 1 s deadline: DEADLINE_EXCEEDED)."""
    deadline = time.monotonic() + 600
    last = ""
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            out = server.stdout.read().decode() if server.stdout else ""
            pytest.fail(f"serve exited with {server.returncode}: {out[-3000:]}")
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=60)
        if r.returncode == 0:
            return r.stdout.decode()
        last = r.stderr.decode()
        loading = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "failed to connect")
        assert any(w.lower() in last.lower() for w in loading), last
        time.sleep(1.0)
    pytest.fail(f"service never became ready: {last}")


def _check_recommendations(resp: dict, cwd: Path) -> None:  # type: ignore[type-arg]
    cat = pl.read_csv(cwd / "shop" / "catalogue.csv", infer_schema_length=0)
    ev = pl.read_csv(cwd / "shop" / "events.csv", infer_schema_length=0)
    items = [r["itemId"] for r in resp["items"]]
    assert len(items) == 5 and len(set(items)) == 5
    # real product ids of the shop (string ids, leading zeros kept), none the customer bought
    assert set(items) <= set(cat["product_id"].to_list())
    bought = set(
        ev.filter((pl.col("customer_id") == "cust-00001") & (pl.col("event_type") == "purchase"))[
            "product_id"
        ].to_list()
    )
    assert not (set(items) & bought)
    # planted: customers shop 85% in one or two favourite themes; the recommendations follow
    mine = ev.filter(pl.col("customer_id") == "cust-00001")["product_id"]
    theme_of = dict(zip(cat["product_id"].to_list(), cat["category"].to_list()))
    themes = {theme_of[p] for p in mine.to_list()}
    assert sum(theme_of[i] in themes for i in items) >= 3, (items, themes)


# ----------------------------------------------------------------- an invoice export
PRODUCT_CODE = r"^(\d{5}|DCGS)"  # the data's own README: other StockCodes are not products


def export_online_retail(raw_path: Path, out: Path) -> pl.DataFrame:
    """A slice of Online Retail written as the shop's own CSV: original column names,
    ``12/1/2010 8:26`` dates, ids as text, cancellations and postage left in.

    The slice: customer 17850 and every 15th customer (all their invoices over the whole
    year, about 1,700 invoices), plus 300 guest lines. Returns the rows written (as text).
    """
    raw = pl.read_parquet(raw_path)
    cid = pl.col("CustomerID").cast(pl.Int64)
    keep = (cid == 17850) | (cid % 15 == 0)
    part = pl.concat([raw.filter(keep), raw.filter(pl.col("CustomerID").is_null()).head(300)])
    d = pl.col("InvoiceDate")
    shop = part.sort("InvoiceDate", maintain_order=True).with_columns(
        pl.format(
            "{}/{}/{} {}:{}",
            d.dt.month(),
            d.dt.day(),
            d.dt.year(),
            d.dt.hour(),
            d.dt.minute().cast(pl.Utf8).str.zfill(2),
        ).alias("InvoiceDate"),
        cid.cast(pl.Utf8).alias("CustomerID"),
    )
    shop.write_csv(out)
    return pl.read_csv(out, infer_schema_length=0)


@pytest.mark.slow
@pytest.mark.realdata
def test_readme_invoice_export_on_online_retail(tmp_path: Path, data_dir: Path) -> None:
    lines = readme_commands("your-own-invoices")
    assert [ln.split()[1] for ln in lines] == ["data", "train", "serve", "recommend", "segments"]
    assert "--events invoices.csv" in lines[0]
    raw = export_online_retail(data_dir / "online_retail" / "online_retail_raw.parquet",
                               tmp_path / "invoices.csv")  # fmt: skip
    assert raw["InvoiceDate"][0] == "12/1/2010 8:26"
    is_product = pl.col("StockCode").str.contains(PRODUCT_CODE)
    non_products = set(raw.filter(~is_product)["StockCode"].to_list())
    assert {"POST", "C2"} <= non_products  # the slice holds postage and carriage
    post_buyers = (
        raw.filter((pl.col("StockCode") == "POST") & pl.col("CustomerID").is_not_null())
        .group_by("CustomerID")
        .len()
        .sort(["len", "CustomerID"], descending=[True, False])["CustomerID"]
        .head(5)
        .to_list()
    )
    assert len(post_buyers) == 5

    def check(argv: list[str], first: dict[str, Any]) -> None:
        answers = [first]
        user_at = argv.index("--user") + 1
        for user in post_buyers:  # customers who paid postage most often
            ask = [*argv[:user_at], user, *argv[user_at + 1 :], "--json"]
            r = subprocess.run(ask, cwd=tmp_path, env=_env(), capture_output=True, check=True)
            answers.append(json.loads(r.stdout))
        for resp in answers:
            items = [x["itemId"] for x in resp["items"]]
            assert len(items) == 10
            assert not set(items) & non_products, items

    printed = run_block(lines, tmp_path, check)
    assert "not a product (--not-products): POST" in printed["data"]

    # the file's own numbers, computed here from the exported text
    f = raw.with_columns(
        pl.col("Quantity").cast(pl.Int64), pl.col("UnitPrice").cast(pl.Float64)
    ).filter(pl.col("CustomerID").is_not_null() & is_product)
    cancel = pl.col("InvoiceNo").str.starts_with("C")
    buys = f.filter(~cancel & (pl.col("Quantity") > 0))
    rets = f.filter(cancel)
    assert rets.height > 100 and (rets["Quantity"] < 0).all()

    ds = Dataset.load(tmp_path / "shop")
    assert not set(ds.item_ids.external_ids) & non_products  # never a product, anywhere
    ev = ds.events.with_columns((pl.col("quantity") * pl.col("price")).alias("revenue"))
    for kind, lines_ in (("purchase", buys), ("return", rets)):
        got = ev.filter(pl.col("event_type") == kind)
        units = int(lines_["Quantity"].abs().sum())
        revenue = float((lines_["Quantity"].abs() * lines_["UnitPrice"]).sum())
        assert int(got["quantity"].sum()) == units, kind
        assert float(got["revenue"].sum()) == pytest.approx(revenue, rel=1e-9), kind
        # one event per (invoice, product): repeated lines summed, none lost
        assert got.height == lines_.select("InvoiceNo", "StockCode").n_unique(), kind
    assert ds.report.notes["purchase rows made returns by the rule 'order_id startswith C'"] == (
        raw.filter(cancel).height
    )
    assert ds.extra["currency"] == "GBP"
    report = (tmp_path / "reports" / "shop" / "report.html").read_text()
    assert "Amounts (monetary, spend) in GBP." in report
