"""MiniLM text embeddings: normalised, semantically ordered, cached per catalogue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from towers.text_encoder import catalogue_text_embeddings, encode_texts, item_texts


def test_item_texts_join_unescape_and_skip_unknown() -> None:
    df = pl.DataFrame(
        {
            "title": ["Tom &amp; Jerry&#39;s soap", None],
            "brand": ["Unknown", "OPI"],
            "category": ["Beauty > Bath", None],
        }
    )
    assert item_texts(df) == ["Tom & Jerry's soap | Beauty > Bath", "OPI"]


def test_embeddings_are_normalised_and_semantic() -> None:
    e = encode_texts(["red lipstick", "crimson lip colour", "garden hose 20m", ""])
    assert e.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(e[:3], axis=1), 1.0, atol=1e-5)
    assert np.all(e[3] == 0)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_catalogue_cache_hit_and_key(tmp_path: Path) -> None:
    df = pl.DataFrame({"title": ["a lipstick", "a shampoo"]})
    e1 = catalogue_text_embeddings(df, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.save(files[0], e1 * 0 + 7)  # a cache hit must return the stored array
    assert np.all(catalogue_text_embeddings(df, cache_dir=tmp_path) == 7)
    catalogue_text_embeddings(df.with_columns(pl.lit("x").alias("title")), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # another catalogue, another key
