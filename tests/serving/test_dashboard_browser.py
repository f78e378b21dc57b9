"""The dashboard in a real headless browser against a real running service.

A real gRPC service (tests/serving/conftest.py ``served``: a trained quick run, an embedded
Qdrant index, RFM segments) and the real ``ecomrec dashboard`` process; Debian's Chromium
driven by Selenium through Debian's chromedriver (Selenium Manager is never asked: it
would try to download a driver). Checks: a wrong key is refused and shows nothing, each
page loads, the numbers shown equal the report JSON's, the churn list equals the
warnings file, the customer lookup shows what a direct gRPC Recommend answers.

Needs ``chromium`` and ``chromium-driver`` (`make chromium`; `.ci/run` installs them).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import API_KEY, Served, make_engine, open_reader, wait_for
from tests.serving.dashboard_data import (
    MOVES,
    parse_shown,
    warning,
    write_snapshots,
    write_warnings,
)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    for exe in (CHROMIUM, CHROMEDRIVER):
        assert os.access(exe, os.X_OK), (
            f"{exe} is missing: install Debian's chromium and chromium-driver (`make chromium`)"
        )
    # Selenium Manager would download a driver/browser: it must never run here
    orig = SeleniumManager.binary_paths

    def refuse(self: Any, args: list[str]) -> dict[str, str]:
        raise AssertionError(f"Selenium Manager was asked for {args}")

    SeleniumManager.binary_paths = refuse  # type: ignore[method-assign]
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.add_argument("--window-size=1400,1000")
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    finally:
        SeleniumManager.binary_paths = orig  # type: ignore[method-assign]
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(
    parts: Any, index_dir: Path, segments: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The real service with its event log (and so its served-recommendation log)."""
    reader = open_reader(index_dir)
    log_dir = tmp_path_factory.mktemp("events")
    s = Served(
        make_engine(
            parts, reader, segments, event_log=str(log_dir / "events.db"), served_log_flush_s=0.05
        )
    )
    yield s
    s.close()
    reader.close()


def shop_traffic(served: Served) -> int:
    """Recommendations to six customers and what they did with them (TrackEvents, each
    event carrying its answer's recommendation id); returns the answers served."""
    pb = served.pb
    now = int(time.time())
    events = []
    for n, u in enumerate(range(1, 7)):
        user = served.engine.users.to_external(u)
        r = served.call("Recommend", pb.RecommendRequest(user_id=user, k=10))
        rid = r.recommendation_id

        def ev(kind: str, item: str, user: str = user, rid: str = rid, **kw: Any) -> Any:
            return pb.TrackedEvent(
                customer_id=user,
                product_id=item,
                event_type=kind,
                timestamp=now,
                recommendation_id=rid,
                **kw,
            )

        events += [ev("impression", it.item_id) for it in r.items[:4]]
        if n % 2 == 0:
            events.append(ev("click", r.items[1].item_id))
        if n % 3 == 0:
            events.append(ev("cart", r.items[1].item_id))
        if n == 0:
            events.append(ev("purchase", r.items[1].item_id, price=12.5, quantity=2))
    resp = served.call("TrackEvents", pb.TrackEventsRequest(events=events))
    assert resp.accepted == len(events) and not resp.errors
    return 6


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, served: Served) -> dict[str, Path]:
    from outcomes.report import online_report
    from outcomes.served_log import read_served

    root = tmp_path_factory.mktemp("dashboard")
    rep = root / "report"
    n = shop_traffic(served)
    assert wait_for(lambda: len(list(read_served(served.cfg.event_log))) >= n)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    report = online_report(served.cfg.event_log, since, out=rep)  # writes online.json
    assert report["variants"][0]["clicks"] == 3 and report["variants"][0]["purchases"] == 1
    w = root / "warnings.jsonl"
    write_warnings(
        w,
        [
            warning("old-customer", 1, 0.72, "no purchase for 40 days (usual gap 20)"),
            warning(served.engine.users.to_external(3), 4, 0.93, "no purchase for 64 days"),
            warning("mid-customer", 2, 0.81, "fewer visits than usual"),
        ],
    )
    cur, prev = write_snapshots(root / "snapshots")
    return {"report": rep, "warnings": w, "segments": cur, "previous_segments": prev}


@pytest.fixture(scope="module")
def dashboard(
    served: Served, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``ecomrec dashboard`` as its own process on a free port; yields its base URL."""
    env = {**os.environ, "ECOMREC_API_KEYS": API_KEY, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "ecomrec",
        "dashboard",
        "--target",
        served.handle.target,
        "--port",
        "0",
        *[f"--{k.replace('_', '-')}={v}" for k, v in files.items()],
    ]
    log = tmp_path_factory.mktemp("dashboard-log") / "stderr.txt"
    err = log.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # its first line: the address
        assert ready, f"no address from the dashboard in 120 s: {log.read_text()}"
        line = proc.stdout.readline()
        assert line.startswith("dashboard on http://"), (line, log.read_text())
        url = line.split()[2]
        deadline = time.monotonic() + 60
        while True:  # the socket is bound before the line; wait for the app to answer
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        err.close()
        text = log.read_text()
        # no traceback in the dashboard's log: every failure became a message on a page
        assert "Traceback" not in text, text
        assert rc == 0, (rc, text)  # SIGTERM: a clean stop


def click_and_wait(driver: Any, element: Any) -> None:
    """Click (a submit button, a link) and wait for the next page to replace this one: a
    click returns before the navigation it starts has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 60).until(ec.staleness_of(old))
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def sign_in(driver: Any, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/login")
    box = driver.find_element(By.ID, "api_key")
    box.clear()
    box.send_keys(key)
    click_and_wait(driver, driver.find_element(By.ID, "sign-in"))


def check_variant_row(row: Any, v: dict[str, Any]) -> None:
    """Every number of one variants-table row equals the report's (shown and exact)."""
    from selenium.webdriver.common.by import By

    cells = {
        c.get_attribute("data-field"): c
        for c in row.find_elements(By.CSS_SELECTOR, "td[data-field]")
    }
    for f in ("recommendations", "impressions", "clicks", "carts", "purchases", "revenue"):
        assert parse_shown(cells[f].text) == pytest.approx(v[f], abs=0.005), f
        assert float(cells[f].get_attribute("data-value")) == v[f]
    for m, iv in v["metrics"].items():
        if m not in cells:
            continue  # a metric the report adds beyond the four the page shows
        scale = 1 if m == "revenue_per_1000" else 100
        for b, attr in (("value", "data-value"), ("lo", "data-lo"), ("hi", "data-hi")):
            shown = parse_shown(cells[m].find_element(By.CLASS_NAME, b).text)
            assert shown == pytest.approx(iv[b] * scale, abs=0.005), (v["variant"], m, b)
            assert float(cells[m].get_attribute(attr)) == iv[b]


def test_a_wrong_key_is_refused_and_shows_nothing(browser: Any, dashboard: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    for page in ("/", "/segments", "/churn", "/customer?id=x"):
        browser.get(dashboard + page)
        assert browser.current_url == dashboard + "/login", page
    sign_in(browser, dashboard, "not-" + API_KEY)
    assert browser.find_element(By.ID, "login-error").text == "wrong API key"
    src = browser.page_source
    assert "impressions" not in src and "default" not in src and not browser.get_cookies()
    browser.get(dashboard + "/")
    assert browser.current_url == dashboard + "/login"
    # the same rule without a browser: a wrong bearer key is 401, the right one passes
    req = urllib.request.Request(dashboard + "/", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401 and b"impressions" not in e.value.read()
    req = urllib.request.Request(dashboard + "/", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and b'<table id="variants">' in r.read()


def test_overview_numbers_equal_the_report_json(
    browser: Any, dashboard: str, files: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    sign_in(browser, dashboard, API_KEY)
    assert browser.current_url == dashboard + "/"
    cookie = browser.get_cookie("ecomrec_dash")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    report = json.loads((files["report"] / "online.json").read_text())
    for table, key in (("variant-totals", "variant_totals"), ("variants", "variants")):
        rows = browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
        assert [(r.get_attribute("data-variant"), r.get_attribute("data-model")) for r in rows] == [
            (v["variant"], v["model_version"]) for v in report[key]
        ]
        for row, v in zip(rows, report[key], strict=True):
            check_variant_row(row, v)
    assert report["differences"] == []  # one variant (A/B tests: tests/serving/test_dashboard.py)
    assert "nothing to compare" in browser.find_element(By.TAG_NAME, "main").text
    # the charts are images inside the page (nothing loaded from elsewhere), and drawn
    imgs = browser.find_elements(By.CSS_SELECTOR, "img.chart")
    assert len(imgs) == 2
    for img in imgs:
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 100
    # and the browser fetched nothing from anywhere else
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(u.startswith((dashboard, "data:")) for u in fetched), fetched


def test_segments_and_churn_pages_load(
    browser: Any, dashboard: str, files: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    from segments.alerts import read_warnings

    sign_in(browser, dashboard, API_KEY)
    browser.get(dashboard + "/segments")
    sec = browser.find_element(By.ID, "seg-rfm_segment")
    for before in {b for b, _ in MOVES.values()}:
        row = sec.find_element(By.CSS_SELECTOR, f'table.matrix tr[data-from="{before}"]')
        got = {
            c.get_attribute("data-to"): int(c.text)
            for c in row.find_elements(By.CSS_SELECTOR, "td")
        }
        want = {t: sum(1 for b, n in MOVES.values() if (b, n) == (before, t)) for t in got}
        assert got == want, before
    browser.get(dashboard + "/churn")
    want = read_warnings(files["warnings"])
    rows = browser.find_elements(By.CSS_SELECTOR, "#warnings tbody tr")
    assert [r.get_attribute("data-customer") for r in rows] == [w["customer_id"] for w in want]
    for row, w in zip(rows, want, strict=True):
        assert (
            float(
                row.find_element(By.CSS_SELECTOR, '[data-field="risk"]').get_attribute("data-value")
            )
            == w["risk"]
        )
        assert [li.text for li in row.find_elements(By.TAG_NAME, "li")] == [
            r["text"] for r in w["reasons"]
        ]


def test_customer_lookup_equals_a_direct_grpc_call(
    browser: Any, dashboard: str, served: Served
) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, dashboard, API_KEY)
    user = served.engine.users.to_external(3)
    browser.get(dashboard + "/churn")
    click_and_wait(browser, browser.find_element(By.LINK_TEXT, user))  # warning -> customer
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")
    assert browser.find_element(By.CSS_SELECTOR, '#profile [data-field="user_id"]').text == user
    pb = served.pb
    direct = served.call("Recommend", pb.RecommendRequest(user_id=user, k=10))
    profile = served.call("GetUserProfile", pb.GetUserProfileRequest(user_id=user))
    rows = browser.find_elements(By.CSS_SELECTOR, "#recommendations tbody tr")
    assert [r.get_attribute("data-item") for r in rows] == [it.item_id for it in direct.items]
    assert len(rows) == 10
    for row, it in zip(rows, direct.items, strict=True):
        assert row.find_element(By.CLASS_NAME, "reasons").text == ", ".join(it.reasons)
    assert browser.find_element(By.CSS_SELECTOR, '#profile [data-field="rfm_segment"]').text == (
        profile.rfm_segment or "none"
    )
    assert browser.find_elements(By.CSS_SELECTOR, "#customer-warnings li")  # its warning
    # an unknown customer: the service's NOT_FOUND, said plainly
    box = browser.find_element(By.ID, "customer-id")
    box.clear()
    box.send_keys("no-such-customer")
    click_and_wait(browser, browser.find_element(By.ID, "look-up"))
    assert browser.find_element(By.ID, "profile-error").text == "unknown customer"
    # ... and what the service recommends to a stranger (cold start), as it answers it
    cold = served.call("Recommend", pb.RecommendRequest(user_id="no-such-customer", k=10))
    rows = browser.find_elements(By.CSS_SELECTOR, "#recommendations tbody tr")
    assert [r.get_attribute("data-item") for r in rows] == [it.item_id for it in cold.items]


def test_a_key_the_service_refuses_is_said_plainly(served: Served) -> None:
    """The lookup calls the service with the signed-in key: the service's own refusal
    (UNAUTHENTICATED) reaches the page as a sentence."""
    from serving.dashboard.lookup import ServiceLookup

    lookup = ServiceLookup(served.handle.target, timeout_s=5.0)
    try:
        user = served.engine.users.to_external(3)
        got = lookup.customer("not-the-service-key", user, 5)
        assert got["profile_error"] == got["recommend_error"] == "the service refused this API key"
        ok = lookup.customer(API_KEY, user, 5)
        assert ok["profile"]["user_id"] == user and len(ok["recommendations"]["items"]) == 5
    finally:
        lookup.close()
