"""Fixtures for the index tests: planted catalogues and a store per backend."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexing.base import IndexConfig
from indexing.build import category_path, open_store

CATEGORIES = [
    "Beauty > Makeup > Nails",
    "Beauty > Makeup > Eyes",
    "Beauty > Skin Care",
    "Beauty > Hair Care | Beauty > Tools",
]


def make_points(
    n: int, dim: int, seed: int = 0, start: int = 1, model_version: str = "test"
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """ids (n,), vectors (n, dim) Gaussian, payloads with every filterable field."""
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.int64)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    payloads = []
    for i in ids.tolist():
        cat = CATEGORIES[i % len(CATEGORIES)]
        payloads.append(
            {
                "external_id": f"P{i:05d}",
                "brand": f"brand{i % 7}",
                "category": cat,
                "category_path": category_path(cat),
                "price": None if i % 11 == 0 else float(i % 97),
                "in_stock": int(i % 3 != 0),
                "popularity": i % 13,
                "model_version": model_version,
            }
        )
    return ids, vecs, payloads


def make_config(backend: str, tmp_path: Path, **kw: Any) -> IndexConfig:
    loc = str(tmp_path / "index") if backend == "edge" else f":memory:{uuid.uuid4().hex}"
    base: dict[str, Any] = {
        "backend": backend,
        "location": loc,
        "hnsw_m": 16,
        "hnsw_ef_construct": 64,
        "verify_sample": 50,
        "keep_versions": 3,
    }
    base.update(kw)
    return IndexConfig.from_dict(base)


@pytest.fixture(params=["edge", "server"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Path) -> Any:
    s = open_store(make_config(backend, tmp_path))
    yield s
    s.close()


def indexed_vectors(reader: Any) -> tuple[int, int]:
    """(vectors in an HNSW graph, points) of the embedded reader's live version.

    A delta version counts its base and its delta shard.  Below the engine's full-scan
    threshold nothing is indexed (every search is a full scan): a test that claims to
    check ANN answers must see a graph here.
    """
    handle = reader._resolve()[1]
    shards = [handle.base, handle.delta] if hasattr(handle, "delta") else [handle]
    infos = [s.info() for s in shards]
    return sum(i.indexed_vectors_count for i in infos), sum(i.points_count for i in infos)
