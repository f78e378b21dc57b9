"""Artifacts check each other: every mismatch refuses at once with a clear error.

Two tiny shops A and B (different catalogues), one run trained on each, through the real
CLI. Each case below was accepted before issue 11 (exit 0, or a server answering INTERNAL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ecomrec.cli import main

QUICK = ["--config", "quick", "--set", "item.use_text=false", "--set", "pretrain.epochs=1"]
TRAIN = [*QUICK, "--set", "threads=1", "--no-test"]


def _shop(root: Path, name: str, seed: int, products: int) -> Path:
    out = root / name
    assert main(["data", "synth", "--customers", "120", "--products", str(products),
                 "--days", "300", "--seed", str(seed), "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifacts")
    a, b = _shop(root, "shop_a", 1, 40), _shop(root, "shop_b", 2, 48)
    for shop, run in ((a, root / "run_a"), (b, root / "run_b")):
        assert main(["train", "--dataset", str(shop), "--out", str(run), *TRAIN]) == 0
    idx = root / "index_a"
    assert main(["index", "build", "--index", str(idx), "--model", str(root / "run_a"),
                 "--dataset", str(a)]) == 0  # fmt: skip
    return {"a": a, "b": b, "run_a": root / "run_a", "run_b": root / "run_b", "index_a": idx}


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("ecomrec: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _index_state(idx: Path) -> Any:
    from indexing.base import IndexConfig
    from indexing.build import list_versions, open_store

    return [
        (m.version, m.count, live)
        for m, live in list_versions(open_store(IndexConfig(location=str(idx))))
    ]


def test_run_and_index_record_provenance(world: dict[str, Path]) -> None:
    from intake.loaders import load_dataset

    fp = load_dataset(str(world["a"])).fingerprint()
    run_fp = json.loads((world["run_a"] / "fingerprint.json").read_text())["dataset"]
    assert run_fp == fp
    from indexing.base import IndexConfig
    from indexing.build import list_versions, open_store

    (m, live), *_ = list_versions(open_store(IndexConfig(location=str(world["index_a"]))))
    assert live and m.provenance["dataset"]["id"] == fp["id"]
    assert m.provenance["model_version"] == m.model_version
    assert m.provenance["model_items"] == fp["items"]


def test_train_out_onto_a_run_of_other_data(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = (world["run_a"] / "model.pt").stat().st_mtime_ns
    _refused(
        ["train", "--dataset", str(world["b"]), "--out", str(world["run_a"]), *TRAIN],
        capsys,
        "--overwrite",
        "shop_b",
    )
    assert (world["run_a"] / "model.pt").stat().st_mtime_ns == before  # untouched
    # --overwrite replaces it (a copy, so the shared run stays A's)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run_a"], run)
    argv = ["train", "--dataset", str(world["b"]), "--out", str(run), *TRAIN, "--overwrite"]
    assert main(argv) == 0
    fp = json.loads((run / "fingerprint.json").read_text())["dataset"]
    assert fp["name"] == "shop_b"


def test_index_build_with_a_model_of_another_catalogue(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    idx = tmp_path / "idx"
    argv = ["index", "build", "--index", str(idx), "--model", str(world["run_a"]),
            "--dataset", str(world["b"])]  # fmt: skip
    _refused(argv, capsys, "another catalogue", "shop_b")
    assert not any(idx.rglob("manifest.json"))


@pytest.mark.slow
def test_index_upsert_with_a_model_of_another_catalogue(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _index_state(world["index_a"])
    items = world["b"] / "catalogue.csv"  # the contract's catalogue columns
    argv = ["index", "upsert", "--index", str(world["index_a"]), "--items", str(items),
            "--model", str(world["run_b"])]  # fmt: skip
    _refused(argv, capsys, "nothing written")
    assert _index_state(world["index_a"]) == before
    # the model the index was built from may add a product (contract catalogue columns)
    new = world["a"].parent / "new.csv"
    new.write_text("product_id,title,category,price\nNEW-1,Green Teapot,Home > Kitchen > Tea,9\n")
    argv = ["index", "upsert", "--index", str(world["index_a"]), "--items", str(new),
            "--model", str(world["run_a"])]  # fmt: skip
    assert main(argv) == 0
    after = _index_state(world["index_a"])
    live_before = next(c for _, c, live in before if live)
    assert next(c for _, c, live in after if live) == live_before + 1


def test_serve_with_an_index_of_another_model(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    t0 = time.perf_counter()
    argv = ["serve", "--model", str(world["run_b"]), "--dataset", str(world["b"]),
            "--index", str(world["index_a"]), "--port", "0"]  # fmt: skip
    _refused(argv, capsys, "serve:", "rebuild")
    assert time.perf_counter() - t0 < 120  # refused at start-up, not left running


def test_segments_export_run_of_another_dataset_and_existing_out(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "exp"
    argv = ["segments", "export", "--dataset", str(world["b"]), "--run", str(world["run_a"]),
            "--out", str(out), "--horizon-days", "60"]  # fmt: skip
    _refused(argv, capsys, "another catalogue")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["segments", "export", "--dataset", str(world["b"]), "--out", str(out)]
    _refused(argv, capsys, "already exists")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("action", ["list", "verify", "upsert", "delete", "rollback"])
def test_index_commands_on_a_missing_path_create_nothing(
    action: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    idx = tmp_path / "no" / "index"
    extra = {
        "upsert": ["--items", str(tmp_path / "x.csv"), "--vectors", str(tmp_path / "v.npy")],
        "delete": ["--ids", "1"],
    }.get(action, [])
    _refused(["index", action, "--index", str(idx), *extra], capsys, "does not exist", str(idx))
    assert not (tmp_path / "no").exists()


def test_segments_horizon_longer_than_the_data(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["segments", "report", "--dataset", str(world["a"]), "--out", str(tmp_path / "r"),
            "--horizon-days", "120"]  # fmt: skip
    line = _refused(argv, capsys, "--horizon-days 120", "Use --horizon-days")
    assert "360" in line  # 3 x 120 days needed


def test_serve_rerank_default_from_the_package_and_missing_path(tmp_path: Path) -> None:
    from ecomrec.errors import ConfigError
    from serving.config import DEFAULT_RERANK, ServeConfig, load_serve_config

    assert Path(ServeConfig().rerank_policies) == DEFAULT_RERANK and DEFAULT_RERANK.is_file()
    with pytest.raises(ConfigError, match="does not exist"):
        ServeConfig(rerank_policies=str(tmp_path / "nope.toml"))
    # a relative path in a TOML resolves against that file, not the working directory
    cfg = tmp_path / "serve.toml"
    (tmp_path / "mine.toml").write_text((DEFAULT_RERANK).read_text())
    cfg.write_text('[serve]\nrerank_policies = "mine.toml"\n')
    assert load_serve_config(cfg).rerank_policies == str(tmp_path / "mine.toml")


def test_customers_show_and_similar(
    world: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import polars as pl

    ev = pl.read_csv(world["a"] / "events.csv", infer_schema_length=0)
    buyers = ev.filter(pl.col("event_type") == "purchase")["customer_id"].value_counts(sort=True)
    who = str(buyers["customer_id"][0])  # the most frequent buyer has a profile
    argv = ["customers", "show", who, "--dataset", str(world["a"]), "--json"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    mine = ev.filter(pl.col("customer_id") == who)
    assert info["first_seen"] == min(mine["timestamp"].to_list())[:10]
    assert info["events"] == dict(mine["event_type"].value_counts().iter_rows())
    bought = (
        mine.filter(pl.col("event_type") == "purchase")
        .group_by("product_id")
        .agg(pl.col("quantity").cast(pl.Int64).sum())
    )
    assert info["top_items"][0]["bought"] == bought["quantity"].max()
    assert 0.0 <= info["churn_probability"] <= 1.0 and info["rfm_segment"]
    out = world["a"].parent / "similar.csv"
    argv = ["customers", "similar", who, "--dataset", str(world["a"]), "--k", "4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    sim = pl.read_csv(out, infer_schema_length=0)
    assert sim.height == 4 and who not in sim["customer"].to_list()
    s = sim["similarity"].cast(pl.Float64).to_list()
    assert s == sorted(s, reverse=True)
    assert main(["customers", "show", "nobody", "--dataset", str(world["a"])]) == 2
    assert "customer 'nobody' is not in dataset" in capsys.readouterr().err
