"""Serving fixtures: a tiny trained model, a real embedded Qdrant index, a real gRPC server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

API_KEY = "test-key-123"


def _ensure_protos() -> None:
    """Generate the stubs when missing, before test modules import them (make/CI run the
    generator first; this keeps a bare ``pytest`` self-contained)."""
    from serving.gen_protos import OUT_DIR, generate

    if not (OUT_DIR / "ecomrec" / "v1" / "recommend_pb2_grpc.py").exists():
        generate()


_ensure_protos()


@pytest.fixture(scope="session")
def serve_shop() -> Any:
    """A small synthetic shop with planted tastes."""
    from intake.synthetic import SyntheticConfig, make_shop

    return make_shop(SyntheticConfig(n_users=300, n_items=120, seed=1))


def train_quick_run(ds: Any, out: Path, epochs: int) -> Path:
    """The quick tower config without the text model, trained on ``ds``'s leave-one-out
    split for ``epochs`` epochs into ``out``."""
    import torch

    from towers.sequences import Interactions
    from training.splits import leave_one_out
    from training.two_tower import TwoTowerRetriever

    torch.set_num_threads(1)
    inter = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
    split = leave_one_out(inter)
    r = TwoTowerRetriever.for_dataset(
        ds,
        Path(__file__).resolve().parents[2] / "configs" / "towers" / "quick.toml",
        out,
        {"item": {"use_text": False}, "pretrain": {"epochs": epochs}, "threads": 1},
    )
    r.fit(split.train, split.valid, resume=False)
    return out


@pytest.fixture(scope="session")
def run_dir(serve_shop: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick tower config trained for two epochs without the text model (~5 s)."""
    return train_quick_run(serve_shop, tmp_path_factory.mktemp("run"), epochs=2)


@pytest.fixture(scope="session")
def parts(run_dir: Path, serve_shop: Any) -> Any:
    from serving.assemble import load_parts

    return load_parts(run_dir, serve_shop)


def build_index(location: Path, parts: Any, keep: np.ndarray | None = None) -> str:
    """Build (or add) a verified index version of the parts' item vectors; returns its version."""
    from indexing.base import IndexConfig
    from indexing.build import build_version, item_payloads, open_store

    cfg = IndexConfig(location=str(location), hnsw_m=16, hnsw_ef_construct=64, keep_versions=5)
    store = open_store(cfg)
    try:
        vecs = parts.model.item_vectors()  # (N+1, D)
        items = parts.dataset.items
        if keep is not None:
            import polars as pl

            items = items.filter(pl.col("item_id").is_in(keep.tolist()))
        ids, payloads = item_payloads(
            items, parts.model.model_version, parts.history.inter.item_counts()
        )
        m = build_version(store, ids, vecs[ids], payloads, model_version=parts.model.model_version)
        return m.version
    finally:
        store.close()


def open_reader(location: Path) -> Any:
    from indexing.base import IndexConfig
    from indexing.build import open_index

    return open_index(IndexConfig(location=str(location), hnsw_m=16, hnsw_ef_construct=64))


@pytest.fixture(scope="session")
def index_dir(parts: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("index")
    build_index(d, parts)
    return d


@pytest.fixture(scope="session")
def segments(serve_shop: Any) -> Any:
    """Real RFM segments of the synthetic shop (segments.rfm)."""
    from segments.rfm import rfm_table
    from serving.segments import TableSegmentLookup

    ev = serve_shop.events
    cutoff = int(ev["ts"].max()) + 1
    table, _ = rfm_table(ev, cutoff, serve_shop.items)
    centroid = {"Champions": np.ones(4, np.float32) / 2}
    return TableSegmentLookup(table, centroids=centroid)


def make_engine(parts: Any, index: Any, segments: Any = None, **cfg_kw: Any) -> Any:
    from serving.assemble import build_recommender
    from serving.config import ServeConfig
    from serving.observability import Metrics

    root = Path(__file__).resolve().parents[2]
    cfg = ServeConfig(
        port=0, rerank_policies=str(root / "configs" / "serving" / "rerank.toml"), **cfg_kw
    )
    return build_recommender(cfg, parts, index, segments, metrics=Metrics())


class Served:
    """A running server, a channel and a stub with the API key attached."""

    def __init__(
        self, engine: Any, keys: tuple[str, ...] = (API_KEY,), metrics_port: int = -1
    ) -> None:
        import dataclasses

        import grpc
        from serving._generated.ecomrec.v1 import recommend_pb2 as pb
        from serving._generated.ecomrec.v1 import recommend_pb2_grpc as pbg

        from serving.server import start_server
        from serving.service import RecommendServicer

        self.cfg = dataclasses.replace(engine.cfg, api_keys=keys, metrics_port=metrics_port)
        engine.cfg = self.cfg
        self.engine = engine
        self.servicer = RecommendServicer(engine)
        self.handle = start_server(self.cfg, self.servicer)
        self.handle.set_ready(True)
        self.channel = grpc.insecure_channel(self.handle.target)
        self.stub = pbg.RecommendServiceStub(self.channel)
        self.pb = pb
        self.md = (("x-api-key", keys[0]),) if keys else ()

    def call(self, method: str, request: Any, timeout: float = 10.0) -> Any:
        return getattr(self.stub, method)(request, metadata=self.md, timeout=timeout)

    def close(self) -> None:
        self.channel.close()
        self.handle.stop(0.5)


@pytest.fixture(scope="module")
def served(parts: Any, index_dir: Path, segments: Any) -> Iterator[Served]:
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader, segments), metrics_port=0)
    yield s
    s.close()
    reader.close()


def wait_for(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False
