"""The README's "Your own shop" commands, run exactly as written (subprocesses, real gRPC).

The block between the ``your-own-shop`` markers in README.md is parsed and every line is
run in a fresh folder; only the port (50051) is swapped for a free one. The synthetic
shop has string ids and all four event types, so this is the path a new user takes.
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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- your-own-shop:start.*?```bash\n(.*?)```", text, re.S)
    assert m, "README.md lost its your-own-shop block"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _argv(line: str, port: int) -> list[str]:
    words = shlex.split(line.replace("50051", str(port)).rstrip("&").strip())
    assert words[0] == "ecomrec"
    return [sys.executable, "-m", "ecomrec", *words[1:]]


@pytest.mark.slow
def test_readme_your_own_shop_commands(tmp_path: Path) -> None:
    lines = readme_commands()
    assert len(lines) <= 5, "the README promises five commands or fewer"
    assert [ln.split()[1] for ln in lines] == ["data", "train", "serve", "recommend", "segments"]
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENBLAS_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("ECOMREC_API_KEYS", None)
    server: subprocess.Popen[bytes] | None = None
    try:
        for line in lines:
            argv = _argv(line, port)
            if line.endswith("&"):
                server = subprocess.Popen(
                    argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                continue
            if argv[3] == "recommend":
                out = _until_ready(argv, tmp_path, env, server)
                recs = json.loads(
                    subprocess.run(
                        [*argv, "--json"], cwd=tmp_path, env=env, capture_output=True, check=True
                    ).stdout
                )
                _check_recommendations(recs, tmp_path)
                assert out.count("\n") >= 5
                continue
            r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=900)
            assert r.returncode == 0, (line, r.stderr.decode()[-3000:])
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    # the shop the first command wrote: string ids, all four event types
    events = (tmp_path / "shop" / "events.csv").read_text().splitlines()
    kinds = {ln.split(",")[3] for ln in events[1:]}
    assert kinds == {"view", "cart", "purchase", "return"}
    # artifacts record what they were made from
    fp = json.loads((tmp_path / "runs" / "shop" / "fingerprint.json").read_text())["dataset"]
    versions = list((tmp_path / "artifacts" / "shop-index").rglob("manifest.json"))
    assert versions, "the serve --build-index command built no index version"
    man = json.loads(versions[0].read_text())
    assert man["provenance"]["dataset"]["id"] == fp["id"]
    report = (tmp_path / "reports" / "shop" / "report.html").read_text()
    assert "As of <b>2026-07-01</b>" in report and "data up to 2026-06-30" in report
    assert "Horizon <b>90 days</b>" in report and "checked at <b>" in report
    assert re.search(r"<td>\d+\.\d %</td>", report)  # shares as percentages
    assert report.count("class='cap'") >= 5  # a line of text per chart
    assert "<img" in report or "<svg" in report or "data:image/png" in report


def _until_ready(
    argv: list[str], cwd: Path, env: dict[str, str], server: subprocess.Popen[bytes] | None
) -> str:
    """Retry the client while the service loads (health NOT_SERVING -> UNAVAILABLE)."""
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
        assert "UNAVAILABLE" in last or "failed to connect" in last.lower(), last
        time.sleep(1.0)
    pytest.fail(f"service never became ready: {last}")


def _check_recommendations(resp: dict, cwd: Path) -> None:  # type: ignore[type-arg]
    import polars as pl

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
