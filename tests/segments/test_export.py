"""Analyst export: schema, pseudonymised ids, raw ids only on request, stable refresh."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from intake.dataset import Dataset
from segments.behaviour import SegmentConfig
from segments.churn import ChurnConfig
from segments.export import (
    CUSTOMER_COLUMNS,
    SEGMENT_COLUMNS,
    MarketingConfig,
    load_previous_segments,
    pseudonymise,
    score_customers,
    write_export,
)


def category_mix(ds: Dataset, cutoff: int, users: np.ndarray) -> np.ndarray:
    """A cheap user representation for tests: share of purchases per category."""
    cats = sorted(set(ds.items["category"].to_list()))
    item_cat = np.array(
        [0] + [cats.index(c) for c in ds.items.sort("item_id")["category"].to_list()]
    )
    ev = ds.events.filter((pl.col("ts") < cutoff) & (pl.col("event_type") == "purchase"))
    row = {int(u): i for i, u in enumerate(users.tolist())}
    mix = np.zeros((len(users), len(cats)), np.float32)
    for u, it in zip(ev["user_id"].to_list(), ev["item_id"].to_list()):
        if u in row:
            mix[row[u], item_cat[it]] += 1.0
    return mix / np.maximum(mix.sum(1, keepdims=True), 1.0)


CFG = MarketingConfig(
    dataset="synthetic",
    churn=ChurnConfig(horizon_days=60, epochs=10),
    segments=SegmentConfig(k=4),
)


@pytest.fixture(scope="module")
def scored(shop):  # type: ignore[no-untyped-def]
    return score_customers(shop, CFG, embed=category_mix)


def test_export_schema_and_manifest(tmp_path: Path, shop, scored) -> None:  # type: ignore[no-untyped-def]
    man = write_export(tmp_path, scored, shop, salt="s3cret")
    cust = pl.read_parquet(tmp_path / "customers.parquet")
    segs = pl.read_parquet(tmp_path / "segments.parquet")
    assert tuple(cust.columns) == CUSTOMER_COLUMNS
    assert tuple(segs.columns) == SEGMENT_COLUMNS
    n_buyers = shop.events.filter(pl.col("event_type") == "purchase")["user_id"].n_unique()
    assert cust.height == n_buyers == man["customers"]
    d = scored.embeddings.shape[1]
    assert cust.schema["embedding"] == pl.Array(pl.Float32, d)
    assert segs.schema["centroid"] == pl.Array(pl.Float32, d)
    assert cust["churn_probability"].is_between(0, 1).all()
    assert cust["high_value_probability"].is_between(0, 1).all()
    assert (cust["predicted_spend"] >= 0).all()
    assert cust["r_score"].is_between(1, 5).all()
    assert set(cust["segment_id"].unique().to_list()) == set(segs["segment_id"].to_list())
    assert segs["size"].sum() == cust.height
    assert cust["model_version"].n_unique() == 1 and cust["config_hash"][0] == man["config_hash"]
    for pj in segs["profile_json"].to_list():
        assert "name" in json.loads(pj)
    assert man["ids"] == "hmac-sha256"
    # embeddings round-trip exactly
    assert np.allclose(cust["embedding"].to_numpy(), scored.embeddings)


def test_ids_are_pseudonymised_by_default(tmp_path: Path, shop, scored) -> None:  # type: ignore[no-untyped-def]
    write_export(tmp_path / "a", scored, shop, salt="s3cret")
    write_export(tmp_path / "b", scored, shop, salt="s3cret")
    write_export(tmp_path / "c", scored, shop, salt="other")
    a = pl.read_parquet(tmp_path / "a" / "customers.parquet")["customer_id"].to_list()
    b = pl.read_parquet(tmp_path / "b" / "customers.parquet")["customer_id"].to_list()
    c = pl.read_parquet(tmp_path / "c" / "customers.parquet")["customer_id"].to_list()
    raw = {shop.users.to_external(int(u)) for u in scored.users}
    assert not raw & set(a)
    assert a == b  # same salt: joinable across exports
    assert not set(a) & set(c)  # another salt: unlinkable
    assert len(set(a)) == len(a)
    expected = pseudonymise([shop.users.to_external(int(scored.users[0]))], "s3cret")[0]
    assert a[0] == expected
    for f in (tmp_path / "a").iterdir():  # the salt never lands in the export
        assert b"s3cret" not in f.read_bytes()


def test_exported_id_cannot_be_recomputed_without_the_key(tmp_path: Path, shop, scored) -> None:  # type: ignore[no-untyped-def]
    """HMAC, not a salted hash: every keyless or naive recomputation misses, the keyed
    HMAC-SHA256 (stdlib) hits."""
    import hashlib
    import hmac

    write_export(tmp_path, scored, shop, salt="k3y")
    exported = pl.read_parquet(tmp_path / "customers.parquet")["customer_id"].to_list()[0]
    raw = shop.users.to_external(int(scored.users[0])).encode()
    naive = {
        hashlib.sha256(raw).hexdigest()[:20],
        hashlib.sha256(b"k3y" + b"\x00" + raw).hexdigest()[:20],  # the old salted sha256
        hashlib.sha256(b"k3y" + raw).hexdigest()[:20],
        hashlib.sha256(raw + b"k3y").hexdigest()[:20],
        hmac.new(b"", raw, hashlib.sha256).hexdigest()[:20],
        hmac.new(b"other", raw, hashlib.sha256).hexdigest()[:20],
    }
    assert exported not in naive
    assert exported == hmac.new(b"k3y", raw, hashlib.sha256).hexdigest()[:20]


def test_raw_ids_only_with_the_flag(tmp_path: Path, shop, scored) -> None:  # type: ignore[no-untyped-def]
    man = write_export(tmp_path, scored, shop, raw_ids=True)
    ids = pl.read_parquet(tmp_path / "customers.parquet")["customer_id"].to_list()
    assert ids == [shop.users.to_external(int(u)) for u in scored.users]
    assert man["ids"] == "raw"


def test_refresh_from_previous_export_keeps_segment_ids(tmp_path: Path, shop, scored) -> None:  # type: ignore[no-untyped-def]
    write_export(tmp_path, scored, shop, salt="x")
    prev = load_previous_segments(tmp_path)
    assert np.allclose(prev.centroids, scored.segment_model.centroids)
    other_seed = MarketingConfig(
        dataset="synthetic", churn=CFG.churn, segments=SegmentConfig(k=4, seed=9)
    )
    again = score_customers(shop, other_seed, embed=category_mix, previous=prev)
    assert (again.table["segment_id"].to_numpy() == scored.table["segment_id"].to_numpy()).all()
    assert again.segment_model.next_id == prev.next_id


@pytest.mark.slow
def test_cli_export_and_truncate_on_synthetic(tmp_path: Path) -> None:
    """`ecomrec segments export` and `ecomrec churn truncate` run as a user runs them."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    base = [sys.executable, "-m", "ecomrec"]
    common = ["--dataset", "synthetic", "--horizon-days", "60", "--k-segments", "3"]
    out = subprocess.run(
        [*base, "segments", "export", *common, "--out", str(tmp_path / "exp"), "--salt", "x"],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    man = json.loads(out.stdout)
    assert man["ids"] == "hmac-sha256" and man["segments"] == 3
    cust = pl.read_parquet(tmp_path / "exp" / "customers.parquet")
    assert tuple(cust.columns) == CUSTOMER_COLUMNS and cust.height == man["customers"]
    assert not cust["customer_id"].str.starts_with("C0").any()  # synthetic raw ids are C00042
    subprocess.run(
        [*base, "churn", "truncate", *common, "--out", str(tmp_path / "pre")],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    pre = Dataset.load(tmp_path / "pre")
    from intake.synthetic import make_shop
    from segments.labels import cutoff_for

    full = make_shop()
    assert int(pre.events["ts"].max()) < cutoff_for(full.events, 60)  # type: ignore[arg-type]
    assert pre.item_ids.external_ids == full.item_ids.external_ids


@pytest.mark.slow
@pytest.mark.realdata
def test_churn_benchmark_json_shape(tmp_path: Path, data_dir: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "churn.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/churn.py",
            "--dataset",
            "online-retail",
            "--data-dir",
            str(data_dir),
            "--horizon-days",
            "90",
            "--campaign-n",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    res = json.loads(out.read_text())
    for task in ("churn", "high_value"):
        for model in ("bgnbd", "gbdt", "ours"):
            assert set(res[task][model]) >= {"roc_auc", "pr_auc", "brier", "lift@10"}
            assert 0.6 < res[task][model]["roc_auc"] < 1.0
    for k, v in {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}.items():
        assert abs(res["cdnow_bgnbd"][k] - v) < 0.01
    assert out.with_suffix(".md").exists()
