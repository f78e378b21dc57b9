"""The console script and the quality benchmark, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_data_describe_synthetic() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ecomrec", "data", "describe", "--dataset", "synthetic", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    info = json.loads(out.stdout)
    assert info["users"] == 600 and info["items"] == 240


def test_data_describe_bad_dataset_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ecomrec", "data", "describe", "--dataset", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "unknown dataset" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_quality_benchmark_json_shape(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality  # type: ignore[import-not-found]

    res = quality.main(
        [
            "--dataset",
            "synthetic",
            "--models",
            "popularity,als",
            "--quiet",
            "--out",
            str(tmp_path / "q.json"),
        ]
    )
    saved = json.loads((tmp_path / "q.json").read_text())
    assert set(saved) >= {"dataset", "protocol", "models"}
    for m in ("popularity", "als"):
        keys = {
            "recall@10",
            "ndcg@10",
            "recall@20",
            "ndcg@20",
            "mrr@10",
            "coverage@10",
            "valid",
            "train_seconds",
            "eval_seconds",
        }
        assert keys <= set(saved["models"][m])
    assert res["models"]["als"]["ndcg@10"] > res["models"]["popularity"]["ndcg@10"]
    assert (tmp_path / "q.md").read_text().count("|") > 10


def test_quality_benchmark_buy_again_protocol(tmp_path: Path) -> None:
    """Buy-again: history stays rankable, the repeat share is reported, the temporal cutoff
    comes from the data (last --test-days days) when no --test-start is given."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality  # type: ignore[import-not-found]

    args = ["--dataset", "synthetic", "--split", "temporal", "--quiet", "--test-days", "60"]
    res = quality.main(
        [
            *args,
            "--protocol",
            "buy-again",
            "--models",
            "personal-top,ease",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    p = res["protocol"]
    assert p["protocol"] == "buy-again" and p["exclude_seen"] is False
    assert p["cutoff_from"].startswith("data: last 60 days")
    assert 0.0 < p["repeat_share_test"] < 1.0
    assert "history items kept" in p["ranking"]
    assert json.loads((tmp_path / "b.json").read_text())["models"]["personal-top"]["ndcg@10"] > 0
    new = quality.main([*args, "--models", "popularity"])
    assert new["protocol"]["repeat_share_test"] == 0.0  # new-items: no repeat targets
    assert new["protocol"]["test_start"] == p["test_start"]
