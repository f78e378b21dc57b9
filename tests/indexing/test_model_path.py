"""``index build/upsert --model RUN_DIR``: the real towers inference path (untrained tiny model).

The vectors come from ``towers.inference.load_run``; an upserted product never seen in
training gets the item tower's content vector; the user collection holds real user
vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ecomrec.cli import main
from indexing.base import IndexConfig
from indexing.build import open_store


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, shop) -> Path:  # type: ignore[no-untyped-def]
    from towers.item_tower import ItemTowerConfig, build_item_features
    from towers.model import TwoTower, save_checkpoint
    from towers.user_tower import UserTowerConfig

    torch.manual_seed(0)
    icfg = ItemTowerConfig(dim=16, use_text=False)
    ucfg = UserTowerConfig(max_len=20, hidden=16, n_layers=1, n_heads=2)
    n = len(shop.item_ids)
    feats = build_item_features(shop.items, n, None)
    model = TwoTower(icfg, ucfg, n, feats)
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(
        d / "model.pt", model, shop.item_ids.external_ids, feats.vocab, {"model_version": "tiny-1"}
    )
    return d


@pytest.mark.slow
def test_build_and_upsert_through_the_towers(run_dir: Path, tmp_path: Path) -> None:
    from towers.inference import load_run

    ix = str(tmp_path / "ix")
    rc = main(
        [
            "index",
            "build",
            "--index",
            ix,
            "--model",
            str(run_dir),
            "--dataset",
            "synthetic",
            "--users",
        ]
    )
    assert rc == 0
    store = open_store(IndexConfig(location=ix))
    reader = store.open()
    tm = load_run(run_dir)
    assert reader.count() == 240 and reader.manifest().model_version == "tiny-1"
    np.testing.assert_allclose(reader.get_vectors([5])[0], tm.item_vectors()[5], atol=1e-5)
    pay = reader.get_payloads([5])[0]
    assert pay["external_id"] == "SKU00004" and pay["popularity"] > 0

    users = store.open(alias="users")
    assert users.manifest().kind == "users" and 0 < users.count() <= 600

    new = pl.DataFrame(
        {"external_id": ["NEW-1"], "title": ["Red Lipstick deluxe"], "brand": ["Brand0"],
         "category": ["Lipstick"], "price": [9.5]}
    )  # fmt: skip
    new.write_csv(tmp_path / "new.csv")
    assert (
        main(
            [
                "index",
                "upsert",
                "--index",
                ix,
                "--model",
                str(run_dir),
                "--items",
                str(tmp_path / "new.csv"),
            ]
        )
        == 0
    )
    assert reader.count() == 241
    new_id = 241
    want = tm.embed_items(new.with_columns(pl.lit(new_id, dtype=pl.Int32).alias("item_id")))[0]
    np.testing.assert_allclose(reader.get_vectors([new_id])[0], want, atol=1e-5)
    assert reader.search(want, 1)[0].item_id == new_id
