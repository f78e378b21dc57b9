"""Fixtures for the refresh tests: a synthetic shop cut in time, a live model trained on the
first part, and a fresh (state, index) pair per test."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]
DAY = 86400


@dataclass
class Shop:
    full: Any  # Dataset: all events
    mid: Any  # Dataset: events before t2
    old: Any  # Dataset: events before t1 (what the live model was trained on)
    t1: int
    t2: int
    full_dir: Path  # saved Dataset directories (for the CLI)
    mid_dir: Path

    @property
    def since(self) -> str:
        return dt.datetime.fromtimestamp(self.t1, dt.UTC).strftime("%Y-%m-%d")


def _cut(ds: Any, until: int) -> Any:
    from intake.dataset import Dataset

    return Dataset(
        ds.name, ds.events.filter(pl.col("ts") < until), ds.items, ds.users, ds.item_ids, ds.report
    )


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    from intake.synthetic import SyntheticConfig, make_shop

    ds = make_shop(SyntheticConfig(n_users=300, n_items=120, seed=1))
    t0 = int(ds.events["ts"].min())  # type: ignore[arg-type]
    t1 = (t0 // DAY + 240) * DAY  # day boundaries (the CLI's --since is a date)
    t2 = (t0 // DAY + 300) * DAY
    d = tmp_path_factory.mktemp("shop")
    s = Shop(ds, _cut(ds, t2), _cut(ds, t1), t1, t2, d / "full", d / "mid")
    s.full.save(s.full_dir)
    s.mid.save(s.mid_dir)
    return s


@pytest.fixture(scope="session")
def live_run(shop: Shop, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick tower (no text model) trained on the events before t1 (~3 s)."""
    import torch

    from towers.sequences import Interactions
    from training.two_tower import TwoTowerRetriever

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("live")
    inter = Interactions.from_events(shop.old.events, shop.old.n_users, shop.old.n_items)
    r = TwoTowerRetriever.for_dataset(
        shop.old,
        ROOT / "ecomrec" / "configs" / "towers" / "quick.toml",
        out,
        {"item": {"use_text": False}, "pretrain": {"epochs": 3}, "threads": 1},
    )
    r.fit(inter, None, resume=False)
    return out


def quick_config(**kw: Any) -> Any:
    """A refresh config for tests: 60-day shadow window, no ONNX export unless asked."""
    from lifecycle.refresh import RefreshConfig

    base: dict[str, Any] = {"eval_days": 60.0, "export_onnx": False, "index_queries": 100}
    base.update(kw)
    return RefreshConfig(**base)


def index_cfg() -> dict[str, Any]:
    return {"hnsw_m": 16, "hnsw_ef_construct": 64, "keep_versions": 5}


def alias_target(index: Path) -> str | None:
    from indexing.base import IndexConfig
    from indexing.build import open_store

    store = open_store(IndexConfig(location=str(index)))
    try:
        return store.alias_target("items")
    finally:
        store.close()
