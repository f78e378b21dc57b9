"""The complements model, the near-duplicate rule, product search and the ONNX query
encoder: planted answers, round trips and parity with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from towers.complements import ComplementConfig, ComplementModel, title_stem


def test_title_stem_groups_colour_and_size_variants_only() -> None:
    assert title_stem("WHITE HANGING HEART T-LIGHT HOLDER") == title_stem(
        "RED HANGING HEART T-LIGHT HOLDER"
    )
    assert title_stem("Shampoo, 16 fl oz") == title_stem("Shampoo 250ml Large")
    assert title_stem("JUMBO BAG RED RETROSPOT") != title_stem("JUMBO BAG PINK POLKADOT")
    assert title_stem("Red") is None and title_stem(None) is None


def _shop() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Item 1 bought with 2 in 30 invoices, with 3 (its colour variant) in 50; 4..8 noise."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(80):
        for it in (1, 2 if k < 30 else 3):
            rows.append((1 + k % 20, it, 1000 + k))
    for k in range(200):
        for it in rng.choice(np.arange(4, 9), 2, replace=False):
            rows.append((1 + k % 20, int(it), 100_000 + k))
    ev = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [r[2] for r in rows],
        },
        schema={"user_id": pl.Int32, "item_id": pl.Int32, "ts": pl.Int64},
    ).with_columns(pl.lit("purchase").alias("event_type"))
    titles = [
        "Garden Hose",
        "Hose Reel",
        "Green Garden Hose",
        "Mug",
        "Plate",
        "Bowl",
        "Fork",
        "Cup",
    ]
    items = pl.DataFrame(
        {"item_id": list(range(1, 9)), "title": titles},
        schema={"item_id": pl.Int32, "title": pl.Utf8},
    )
    return ev, items


@pytest.mark.parametrize("ease_max_items", [8000, 0])  # EASE (dense) and cosine (sparse)
def test_planted_complement_ranks_first_and_variants_never(
    ease_max_items: int, tmp_path: Path
) -> None:
    ev, items = _shop()
    m = ComplementModel.fit(ev, items, 8, ComplementConfig(ease_max_items=ease_max_items))
    s = m.score([1])
    assert int(np.argmax(s)) == 2  # the complement, not the more frequent colour variant
    assert s[1] == -np.inf and s[3] == -np.inf and s[0] == -np.inf
    # personalisation: a customer who bought 6 gets it lifted above the other noise items
    p = m.score([1], history=[6])
    assert p[6] > s[6] and p[6] == max(p[j] for j in range(4, 9))
    m.save(tmp_path)
    back = ComplementModel.load(tmp_path)
    np.testing.assert_array_equal(back.score([1], [6]), m.score([1], [6]))
    assert back.kind == m.kind == ("ease" if ease_max_items else "cosine")


def test_product_search_lexical_semantic_and_explain() -> None:
    from towers.product_search import ProductSearch, SearchConfig
    from towers.text_encoder import encode_texts

    items = pl.DataFrame(
        {
            "item_id": [1, 2, 3],
            "title": ["Dinosaur Lunchbox", "Gentle Foaming Cleanser", "Steel Hammer"],
            "brand": ["Rexco", "Glow", "Forge"],
            "category": ["Toys > Lunchboxes", "Beauty > Skin Care > Cleansers", "Tools > Hammers"],
        }
    )
    ps = ProductSearch.from_items(items, 3, encode_texts, SearchConfig())
    lex = ps.lexical("dinosaur lunchbox")
    assert int(np.argmax(lex)) == 1 and lex[2] == lex[3] == 0
    # no shared word: the language model half finds it
    s, lex2, sem = ps.hybrid("face wash")
    assert not lex2.any() and int(np.argmax(sem)) == 2 and int(np.argmax(s)) == 2
    m = ps.explain("rexco dinosaur lunchboxes", 1)
    assert m.words == ("rexco", "dinosaur", "lunchboxes") and m.brand
    assert m.category == "Lunchboxes"


def test_onnx_query_encoder_equals_torch(tmp_path: Path) -> None:
    from towers.text_encoder import encode_texts
    from towers.text_onnx import QueryEncoder

    enc = QueryEncoder(cache_dir=tmp_path)
    assert enc.backend == "onnx"
    texts = ["gift for a 6-year-old who likes dinosaurs under £20", "oily skin", "a"]
    np.testing.assert_allclose(enc.encode(texts), encode_texts(texts), atol=1e-4)
    np.testing.assert_array_equal(enc.encode(["oily skin"]), enc.encode(["oily skin"]))  # LRU


def test_int8_query_encoder_is_close_to_torch_and_batch_independent(tmp_path: Path) -> None:
    """``precision="int8"`` (what SearchProducts serves): block-quantised MatMul weights,
    vectors within cosine 0.998 of torch's, and a query's vector does not depend on the
    other queries of its batch (dynamic per-tensor quantisation failed this: 0.98)."""
    from towers.text_encoder import encode_texts
    from towers.text_onnx import QueryEncoder

    enc = QueryEncoder(cache_dir=tmp_path, lru=0, precision="int8")
    assert enc.backend == "onnx-int8" and list(tmp_path.glob("*-int8b32.onnx"))
    texts = ["moisturizer for dry skin", "x", "hair dryer ionic 1875 watt with a long cord"]
    batch = enc.encode(texts)  # (3, 384)
    want = encode_texts(texts)
    assert (batch * want).sum(1).min() > 0.998
    assert np.abs(batch - want).max() > 1e-5  # it is the quantised graph, not the float one
    alone = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(alone, batch, atol=1e-6)
    # a broken quantised file: the float graph answers (exactly torch), logged
    for f in tmp_path.glob("*-int8b32.onnx"):
        f.write_bytes(b"not onnx")
    fallback = QueryEncoder(cache_dir=tmp_path, lru=0, precision="int8")
    assert fallback.backend == "onnx" and not list(tmp_path.glob("*-int8b32.onnx"))
    np.testing.assert_allclose(fallback.encode(texts), want, atol=1e-4)
    assert QueryEncoder(cache_dir=tmp_path, precision="int8").backend == "onnx-int8"  # redone


def test_int8_is_served_unless_it_loses_on_validation() -> None:
    from towers.text_onnx import choose_precision

    assert choose_precision({"fp32": 0.8424, "int8": 0.8433}) == "int8"
    assert choose_precision({"fp32": 0.8424, "int8": 0.8380}) == "int8"  # within 0.005
    assert choose_precision({"fp32": 0.8424, "int8": 0.8370}) == "fp32"
    assert choose_precision({"fp32": 0.8424}) == "fp32"


def test_batched_queries_equal_single_ones(tmp_path: Path) -> None:
    """SearchProducts batches concurrent queries (one MiniLM forward, one pass over the
    item vectors): each row equals the query encoded and scored alone."""
    from towers.product_search import ProductSearch
    from towers.text_onnx import QueryEncoder

    enc = QueryEncoder(cache_dir=tmp_path, lru=0)
    items = pl.DataFrame({"item_id": [1, 2, 3], "title": ["Lip Balm", "Hair Dryer", "Tea Cup"]})
    ps = ProductSearch.from_items(items, 3, enc.encode)
    texts = ["balm", "a hair dryer for travel with a long cord", "cup"]
    batch = ps.semantic_many(enc.encode(texts))  # (3, 4)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(batch[i], ps.semantic(enc.encode([t])[0]), atol=1e-5)
