"""``ecomrec index ...`` end to end on a directory: build, list, upsert, delete, rollback, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecomrec.cli import main
from indexing.base import IndexConfig
from indexing.build import open_store


def _catalog(n: int, start: int = 1) -> pl.DataFrame:
    ids = list(range(start, start + n))
    return pl.DataFrame(
        {
            "item_id": ids,
            "external_id": [f"SKU{i}" for i in ids],
            "title": [f"product {i}" for i in ids],
            "brand": [f"b{i % 3}" for i in ids],
            "category": ["Home > Kitchen" if i % 2 else "Home > Garden" for i in ids],
            "price": [float(i) for i in ids],
        }
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    _catalog(300).write_parquet(tmp_path / "cat.parquet")
    np.save(tmp_path / "vec.npy", rng.normal(size=(300, 8)).astype(np.float32))
    new = _catalog(3, start=1000).drop("item_id")
    new.write_csv(tmp_path / "new.csv")
    np.save(tmp_path / "new.npy", rng.normal(size=(3, 8)).astype(np.float32))
    return {k: str(tmp_path / v) for k, v in {
        "cat": "cat.parquet", "vec": "vec.npy", "new": "new.csv", "newvec": "new.npy", "index": "index",
    }.items()}  # fmt: skip


def test_cli_lifecycle(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    ix = ["--index", files["index"]]
    assert main(["index", "build", *ix, "--catalog", files["cat"], "--vectors", files["vec"]]) == 0
    store = open_store(IndexConfig(location=files["index"]))
    reader = store.open()
    v1 = reader.version
    assert reader.count() == 300

    up = ["index", "upsert", *ix, "--items", files["new"], "--vectors", files["newvec"]]
    assert main(up) == 0
    assert reader.count() == 303
    v2 = reader.version
    new_id = reader.search(np.load(files["newvec"])[0], 1)[0]
    assert new_id.payload["external_id"] == "SKU1000" and new_id.item_id == 301
    assert main(up) == 0 and reader.version == v2  # idempotent: no new version

    rm = ["index", "delete", *ix, "--external-ids", "SKU1000,SKU5"]
    assert main(rm) == 0 and reader.count() == 301
    v3 = reader.version
    assert main(rm) == 0 and reader.version == v3  # idempotent
    assert main([*rm, "--strict"]) == 2  # strict: unknown ids are an error

    capsys.readouterr()
    assert main(["index", "list", *ix, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [v1, v2, v3][-3:] and rows[-1]["live"]

    assert main(["index", "rollback", *ix]) == 0 and reader.version == v2
    capsys.readouterr()
    assert main(["index", "verify", *ix, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["count"] == 303 and rep["recall"] >= 0.98


def test_cli_bad_catalogue_writes_nothing(files: dict[str, str], tmp_path: Path) -> None:
    ix = ["--index", files["index"]]
    assert main(["index", "build", *ix, "--catalog", files["cat"], "--vectors", files["vec"]]) == 0
    store = open_store(IndexConfig(location=files["index"]))
    before = store.alias_target("items")
    bad = tmp_path / "bad.parquet"
    _catalog(300).drop("brand").write_parquet(bad)
    assert main(["index", "build", *ix, "--catalog", str(bad), "--vectors", files["vec"]]) == 2
    wrong_dim = tmp_path / "w.npy"
    np.save(wrong_dim, np.ones((3, 9), np.float32))
    assert main(["index", "upsert", *ix, "--items", files["new"], "--vectors", str(wrong_dim)]) == 2
    short = tmp_path / "s.npy"
    np.save(short, np.ones((10, 8), np.float32))
    assert main(["index", "build", *ix, "--catalog", files["cat"], "--vectors", str(short)]) == 2
    assert store.alias_target("items") == before
    assert len(store.versions("items")) == 1 and store.incomplete_versions("items") == []


def test_build_index_function_passes_every_option_of_index_build(monkeypatch) -> None:
    """``serve --build-index`` calls ``build_index``: its namespace must carry every option
    ``index build`` has (a hand-built one missed ``--no-text`` and serve crashed)."""
    import argparse

    import indexing.cli as icli

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(icli, "_build", lambda ns: seen.append(ns) or 0)
    assert icli.build_index("IDX", "RUN", "DS", data_dir="DATA", alias="items") == 0
    parser = argparse.ArgumentParser()
    icli.register(parser.add_subparsers(dest="command"))
    cli_ns = parser.parse_args(["index", "build", "--index", "I"])
    assert set(vars(cli_ns)) <= set(vars(seen[0]))
    got = vars(seen[0])
    assert (got["index"], got["model"], got["dataset"]) == ("IDX", "RUN", "DS")
    assert (got["data_dir"], got["alias"], got["no_text"]) == ("DATA", "items", False)
