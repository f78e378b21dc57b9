"""benchmarks/serve_load.py's generator against a real server: rows with the fields the
issue asks for, CPU per request measured for both sides, open and closed loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import API_KEY, Served

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_load_generator_rows(served: Served, parts: Any, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load  # type: ignore[import-not-found]

    users = [parts.dataset.users.to_external(int(u)) for u in parts.history.users()[:50]]
    payloads = [served.pb.RecommendRequest(user_id=u, k=5).SerializeToString() for u in users]
    rows = [
        serve_load.run_point(
            served.handle.target, API_KEY, payloads, "closed", 2, 1.5, 0.3, 1, [os.getpid()]
        ),
        serve_load.run_point(
            served.handle.target, API_KEY, payloads, "open", 40, 1.5, 0.3, 1, [os.getpid()]
        ),
    ]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] > 10, r
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        cpu = r["cpu_ms_per_request"]
        assert cpu["server"] > 0 and cpu["loadgen"] > 0, cpu
        assert {"history", "encode", "ann", "rerank"} <= set(r["stages"]), r["stages"]
    assert rows[0]["concurrency"] == 2 and rows[1]["offered_rps"] == 40
    assert 20 < rows[1]["rps"] < 60  # Poisson at 40/s over 1.5 s
    assert rows[1]["send_lag_p99_ms"] is not None
    res = {"dataset": "shop", "encoder": "inprocess", "server_procs": 1, "seconds": 1.5}
    res["runs"] = rows
    serve_load.write_table(res, tmp_path / "t.md")
    assert serve_load.plot_open_loop(res, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert "| closed | 2 |" in (tmp_path / "t.md").read_text()


def test_paired_summary_is_the_median_of_per_round_ratios(tmp_path: Path) -> None:
    """--baseline-code: each round measures both server sets back to back; the summary
    takes the median of the per-round ratios (not the ratio of medians)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load

    def row(rnd: int, rps: float, p99: float, cpu: float, gen: float) -> dict[str, Any]:
        return {
            "mode": "closed",
            "concurrency": 8,
            "offered_rps": None,
            "round": rnd,
            "rps": rps,
            "p99_ms": p99,
            "cpu_ms_per_request": {"server": cpu, "loadgen": gen},
            "server_cpu_per_loadgen_cpu": cpu / gen,
        }

    mine = [row(0, 900, 10, 1.0, 0.5), row(1, 400, 30, 3.0, 1.0), row(2, 800, 12, 1.2, 0.4)]
    base = [row(0, 600, 20, 1.5, 0.5), row(1, 500, 40, 2.0, 1.0), row(2, 700, 16, 1.8, 0.4)]
    got = serve_load.paired_summary(mine, base)["closed 8"]
    assert got["rounds"] == 3 and got["rps"] == 800 and got["baseline_rps"] == 600
    assert got["ratio_rps"] == sorted([900 / 600, 400 / 500, 800 / 700])[1]
    assert got["ratio_p99_ms"] == sorted([10 / 20, 30 / 40, 12 / 16])[1]
    assert abs(got["ratio_server_cpu_per_loadgen_cpu"] - 2 / 3) < 1e-12  # 2/3, 3/2, 2/3
    res = {"dataset": "shop", "encoder": "onnx", "server_procs": 2, "seconds": 8, "runs": []}
    res["paired"], res["baseline_code"] = {"closed 8": got}, "/base"
    serve_load.write_table(res, tmp_path / "p.md")
    assert "| closed 8 | 3 | 800 |" in (tmp_path / "p.md").read_text()
