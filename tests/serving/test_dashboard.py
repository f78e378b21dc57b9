"""The dashboard's app in process (Starlette's test client over ASGI): sign-in rules,
read-only routes, numbers equal the report's, segment movement on planted snapshots,
config. The real browser against a real service is tests/serving/test_dashboard_browser.py."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ecomrec.errors import ConfigError
from tests.serving.dashboard_data import (
    GONE,
    MOVES,
    NEW,
    parse_shown,
    planted_report,
    variant_cells,
    warning,
    write_snapshots,
    write_warnings,
)

KEY = "dash-key-0123456789"


def client(tmp_path: Path, **cfg: Any) -> Any:
    from starlette.testclient import TestClient

    from serving.dashboard.app import create_app
    from serving.dashboard.config import DashboardConfig

    cfg.setdefault("charts", False)  # matplotlib costs seconds; the charts' own test draws them
    app = create_app(DashboardConfig(**cfg), [KEY, "second-key"], lookup=None)
    return TestClient(app, follow_redirects=False)


def signed_in(c: Any, key: str = KEY) -> Any:
    r = c.post("/login", data={"api_key": key})
    assert r.status_code == 303 and r.headers["location"] == "/"
    return r


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rep = tmp_path / "report"
    rep.mkdir()
    (rep / "online.json").write_text(json.dumps(planted_report()))
    w = tmp_path / "warnings.jsonl"
    write_warnings(w, [warning("old", 1, 0.75, "first"), warning("new", 3, 0.91, "newest")])
    cur, prev = write_snapshots(tmp_path / "snap")
    return {"report": rep, "warnings": w, "segments": cur, "previous_segments": prev}


def test_every_page_needs_a_key_and_a_wrong_one_shows_nothing(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    from serving.dashboard.app import SECURITY_HEADERS

    c = client(tmp_path, **{k: str(v) for k, v in files.items()})
    for page in ("/", "/segments", "/churn", "/customer?id=c1"):
        r = c.get(page)
        assert (r.status_code, r.headers["location"]) == (303, "/login"), page
        for h in SECURITY_HEADERS:
            assert h in r.headers
    r = c.post("/login", data={"api_key": "wrong"})
    assert r.status_code == 401 and "wrong API key" in r.text
    assert "set-cookie" not in r.headers and "12,345" not in r.text and "control" not in r.text
    assert c.get("/").status_code == 303  # still signed out
    # a bearer key: wrong -> 401 with nothing of the report; right -> the page
    r = c.get("/", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and "control" not in r.text
    r = c.get("/", headers={"authorization": "Bearer second-key"})
    assert r.status_code == 200 and "12,345" in r.text
    # the login form: an HttpOnly, SameSite=strict, signed session cookie
    login = signed_in(c)
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    for page in ("/", "/segments", "/churn", "/customer"):
        r = c.get(page)
        assert r.status_code == 200, (page, r.text[:300])
        assert "default-src 'none'" in r.headers["content-security-policy"]
        # no page loads anything from elsewhere (and no scripts at all)
        assert not re.search(r"(src|href)=\"(https?:)?//", r.text) and "<script" not in r.text
    # read-only: no other method on the pages
    assert c.post("/").status_code == 405 and c.put("/segments").status_code == 405
    # a forged cookie (same token, another signature) is refused
    token = c.cookies["ecomrec_dash"]
    c.cookies.clear()
    c.cookies.set("ecomrec_dash", token.rsplit(".", 1)[0] + "." + "0" * 64)
    assert c.get("/").status_code == 303
    c.cookies.clear()
    c.cookies.set("ecomrec_dash", token)
    assert c.get("/").status_code == 200
    # sign out ends the session on the server (the old cookie no longer works)
    c.get("/logout")
    c.cookies.clear()
    c.cookies.set("ecomrec_dash", token)
    assert c.get("/").status_code == 303


def test_sessions_expire_and_end_with_their_key() -> None:
    from serving.dashboard.auth import Sessions

    now = [0.0]
    s = Sessions(["k1", "k2"], ttl_s=10.0, max_sessions=2, clock=lambda: now[0])
    assert s.login("nope") is None and s.login("") is None and s.login(" ") is None
    a = s.login("k1")
    assert a is not None and s.key_for(a) == "k1"
    now[0] = 10.0
    assert s.key_for(a) is None  # expired
    b, c, d = s.login("k1"), s.login("k2"), s.login("k2")
    assert s.key_for(b) is None and s.key_for(c) == s.key_for(d) == "k2"  # oldest dropped
    s._keys = [b"k1"]  # the key list changed (key revoked): its sessions end
    assert s.key_for(c) is None
    assert s.bearer_key("Bearer k1") == "k1" and s.bearer_key("Bearer k2") is None


def test_wrong_keys_from_one_address_are_slowed_down(tmp_path: Path) -> None:
    from serving.dashboard.auth import FailedSignIns

    c = client(tmp_path, max_failed_logins=3)
    for _ in range(2):
        assert c.post("/login", data={"api_key": "guess"}).status_code == 401
    assert c.get("/", headers={"authorization": "Bearer guess"}).status_code == 401
    r = c.post("/login", data={"api_key": KEY})  # even the right key waits now
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert c.get("/", headers={"authorization": f"Bearer {KEY}"}).status_code == 429
    now = [0.0]
    f = FailedSignIns(2, window_s=60.0, max_clients=2, clock=lambda: now[0])
    f.failed("a"), f.failed("a"), f.failed("b")
    assert f.blocked("a") == 60.0 and f.blocked("b") == 0.0
    now[0] = 61.0
    assert f.blocked("a") == 0.0  # the window passed
    f.failed("c"), f.failed("d"), f.failed("d")
    assert f.blocked("d") and len(f._seen) <= 2  # bounded memory


def test_overview_shows_the_reports_numbers(tmp_path: Path, files: dict[str, Path]) -> None:
    from serving.dashboard.app import metric

    rep = planted_report()
    c = client(tmp_path, report=str(files["report"]))
    signed_in(c)
    html = c.get("/").text
    shown = variant_cells(html)
    assert set(shown) == {"control", "candidate"}
    for v in rep["variants"]:
        cells = shown[v["variant"]]
        for f in ("recommendations", "impressions", "clicks", "carts", "purchases", "revenue"):
            raw, text = cells[f]
            assert float(raw) == v[f] and parse_shown(text) == pytest.approx(v[f], abs=0.005)
        for m, iv in v["metrics"].items():
            raw, text = cells[m]
            assert float(raw) == iv["value"]  # exactly the JSON's number
            assert text == metric(iv["value"], m)
            scale = 100 if m != "revenue_per_1000" else 1
            assert parse_shown(text) == pytest.approx(iv["value"] * scale, abs=0.005)
    diffs = re.findall(r'data-metric="(\w+)">.*?data-value="([^"]+)"', html, re.S)
    assert [(m, float(v)) for m, v in diffs] == [
        (d["metric"], d["value"]) for d in rep["differences"]
    ]
    assert 'src="data:image/png' not in html  # charts off in these tests


@pytest.mark.slow
def test_charts_are_inline_images(tmp_path: Path, files: dict[str, Path]) -> None:
    import base64

    c = client(tmp_path, charts=True, **{k: str(v) for k, v in files.items()})
    signed_in(c)
    for page, n in (("/", 2), ("/segments", 2)):
        imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', c.get(page).text)
        assert len(imgs) == n, page
        assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)


def test_a_bad_report_is_named_not_shown(tmp_path: Path, files: dict[str, Path]) -> None:
    rep = planted_report()
    del rep["variants"][1]["clicks"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rep))
    c = client(tmp_path, report=str(bad))
    signed_in(c)
    html = c.get("/").text
    assert f"file {bad}: online report: variants[1].clicks is missing" in html
    assert "<table" not in html
    bad.write_text("{not json")
    assert "online report is not JSON" in c.get("/").text  # re-read after the change
    c2 = client(tmp_path, report=str(tmp_path / "missing"))
    signed_in(c2)
    assert "run `ecomrec report online`" in c2.get("/").text


def test_segment_movement_between_two_planted_snapshots(files: dict[str, Path]) -> None:
    from serving.dashboard import data

    cur = data.load_snapshot(files["segments"])
    prev = data.load_snapshot(files["previous_segments"])
    mv = data.movement(cur, prev, "rfm_segment")
    want: dict[str, dict[str, int]] = {}
    for before, now in MOVES.values():
        want.setdefault(before, {})[now] = want.get(before, {}).get(now, 0) + 1
    assert mv["matrix"] == want
    stayed = sum(a == b for a, b in MOVES.values())
    assert (mv["matched"], mv["stayed"], mv["moved"]) == (len(MOVES), stayed, len(MOVES) - stayed)
    assert (mv["new"], mv["gone"]) == (len(NEW), len(GONE))
    rows = {r["segment"]: (r["previous"], r["current"], r["change"]) for r in mv["rows"]}
    assert rows["At Risk"] == (1, 2, 1) and rows["Loyal"] == (4, 2, -2) and rows["New"] == (0, 1, 1)
    # internal user ids of two different datasets are never matched
    for snap, fp in ((cur, "a"), (prev, "b")):
        snap.key, snap.dataset_fingerprint = "user_id", fp
        snap.table = snap.table.rename({"customer_id": "user_id"})
    mv = data.movement(cur, prev, "rfm_segment")
    assert mv["matrix"] == {} and "different datasets" in mv["reason"]
    assert rows == {r["segment"]: (r["previous"], r["current"], r["change"]) for r in mv["rows"]}


def test_segments_and_churn_pages(tmp_path: Path, files: dict[str, Path]) -> None:
    c = client(tmp_path, **{k: str(v) for k, v in files.items()})
    signed_in(c)
    html = c.get("/segments").text
    sec = html.split('id="seg-rfm_segment"')[1].split("</section>")[0]
    loyal = re.search(r'<tr data-from="Loyal">(.*?)</tr>', sec, re.S)
    assert loyal is not None
    cells = dict(re.findall(r'data-to="([^"]+)">([^<]+)<', loyal.group(1)))
    assert cells["Loyal"] == "1" and cells["At Risk"] == "2" and cells["Champions"] == "0"
    moved = sum(a != b for a, b in MOVES.values())
    assert f'class="moved">{moved}<' in sec and 'class="new">1<' in sec and 'class="gone">1<' in sec
    html = c.get("/churn").text
    order = re.findall(r'<tr data-customer="([^"]+)">', html)
    assert order == ["new", "old"]  # newest first
    assert "newest" in html and "Loyal &rarr; At Risk" in html and "91.0 %" in html


def load_args(**kw: Any) -> argparse.Namespace:
    base = dict(
        config=None,
        set=[],
        target=None,
        host=None,
        port=None,
        report=None,
        segments=None,
        previous_segments=None,
        warnings=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_config_reads_the_services_keys_and_its_own_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecomrec.config import builtin_config
    from serving.config import load_serve_config
    from serving.dashboard.cli import load

    shipped = str(builtin_config("serving", "serve"))
    monkeypatch.delenv("ECOMREC_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="none are configured"):
        load(load_args(config=shipped))
    monkeypatch.setenv("ECOMREC_API_KEYS", "a1, b2")
    cfg, keys = load(load_args(config=shipped, port=0, set=["dashboard.max_warnings=7"]))
    assert keys == ("a1", "b2") and (cfg.port, cfg.max_warnings, cfg.recommend_k) == (0, 7, 10)
    with pytest.raises(ConfigError, match="max_warning"):
        load(load_args(config=shipped, set=["dashboard.max_warning=7"]))
    # `ecomrec serve` still reads the file with its [dashboard] table
    assert load_serve_config(shipped).port == 50051
    bad = tmp_path / "serve.toml"
    bad.write_text('[serve]\napi_keys = ["k"]\n[dashbord]\nport = 1\n')
    with pytest.raises(ConfigError, match="dashbord"):
        load(load_args(config=str(bad)))


@pytest.mark.slow
def test_movement_between_two_real_exports_and_score_folders(tmp_path: Path) -> None:
    """Snapshots as `segments export` and `segments report` write them (score_customers on
    a synthetic shop now and 30 days earlier); the movement equals a join of the files."""
    import polars as pl

    from intake.synthetic import make_shop
    from segments import artifacts
    from segments.behaviour import SegmentConfig
    from segments.churn import ChurnConfig, pre_cutoff_dataset
    from segments.export import MarketingConfig, score_customers, write_export
    from serving.dashboard import data
    from tests.segments.test_export import category_mix

    cfg = MarketingConfig(
        dataset="synthetic",
        churn=ChurnConfig(horizon_days=60, epochs=10),
        segments=SegmentConfig(k=4),
    )
    shop = make_shop()
    before = pre_cutoff_dataset(shop, 30)
    now_scores = score_customers(shop, cfg, embed=category_mix)
    old_scores = score_customers(before, cfg, embed=category_mix)
    write_export(tmp_path / "cur", now_scores, shop, salt="same-key")
    write_export(tmp_path / "prev", old_scores, before, salt="same-key")
    cur, prev = data.load_snapshot(tmp_path / "cur"), data.load_snapshot(tmp_path / "prev")
    assert cur.key == "customer_id" and cur.as_of == now_scores.now_ts
    for col in ("rfm_segment", "segment_name"):
        mv = data.movement(cur, prev, col)
        a = pl.read_parquet(tmp_path / "prev" / "customers.parquet")
        b = pl.read_parquet(tmp_path / "cur" / "customers.parquet")
        joined = a.join(b, on="customer_id", suffix="_now")
        want: dict[str, dict[str, int]] = {}
        for f, t in zip(joined[col].to_list(), joined[f"{col}_now"].to_list(), strict=True):
            want.setdefault(f, {})[t] = want.get(f, {}).get(t, 0) + 1
        assert mv["matrix"] == want and mv["reason"] is None
        assert mv["matched"] == joined.height and mv["moved"] > 0
        assert sum(r["current"] for r in mv["rows"]) == b.height
    # score folders: internal ids join within one dataset, never across two
    artifacts.save(tmp_path / "rep_now", now_scores, shop, "test")
    artifacts.save(tmp_path / "rep_old", old_scores, before, "test")
    s_now = data.load_snapshot(tmp_path / "rep_now")
    assert s_now.key == "user_id" and s_now.as_of == now_scores.now_ts
    assert (
        data.movement(s_now, data.load_snapshot(tmp_path / "rep_now"), "rfm_segment")["moved"] == 0
    )
    mv = data.movement(s_now, data.load_snapshot(tmp_path / "rep_old" / "scores"), "rfm_segment")
    assert mv["matrix"] == {} and "different datasets" in mv["reason"]


def test_customer_page_says_when_the_service_is_down(tmp_path: Path) -> None:
    """A real channel to a port nobody listens on: a sentence, never a traceback."""
    import socket

    from starlette.testclient import TestClient

    from serving.dashboard.app import create_app
    from serving.dashboard.config import DashboardConfig
    from serving.dashboard.lookup import ServiceLookup

    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lookup = ServiceLookup(f"127.0.0.1:{port}", timeout_s=1.0)
    try:
        app = create_app(DashboardConfig(charts=False), [KEY], lookup)
        c = TestClient(app, follow_redirects=False)
        signed_in(c)
        html = c.get("/customer?id=c1").text
        assert html.count("the Recommend service is unavailable") == 2  # profile + recs
        assert 'id="recommendations"' not in html and "Traceback" not in html
    finally:
        lookup.close()
