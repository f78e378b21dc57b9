"""Inference API (load_run, embed_items, embed_text, user encoder) and ONNX export parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from towers.export import export_onnx
from towers.inference import TrainedModel, UserEncoder, load_run
from towers.item_tower import ItemTowerConfig, build_item_features
from towers.model import TwoTower, save_checkpoint
from towers.sequences import pad_batch
from towers.user_tower import UserTowerConfig

N = 40
TITLES = [
    f"{c} {k}"
    for k in ("lipstick", "shampoo", "nail polish", "face cream")
    for c in ("red", "blue", "green", "pink", "black", "white", "gold", "silver", "matte", "glossy")
]


def _items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": np.arange(1, N + 1, dtype=np.int32),
            "external_id": [f"sku{i}" for i in range(1, N + 1)],
            "title": TITLES,
            "brand": ["acme", "globex"] * (N // 2),
            "category": ["Beauty > Makeup"] * (N // 2) + ["Beauty > Hair"] * (N // 2),
            "price": np.linspace(1, 40, N),
        }
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from towers.text_encoder import encode_texts, item_texts

    items = _items()
    text = encode_texts(item_texts(items))
    feats = build_item_features(items, N, text)
    torch.manual_seed(0)
    m = TwoTower(
        ItemTowerConfig(dim=16, text_pca=16),
        UserTowerConfig(hidden=16, n_heads=2, max_len=12),
        N,
        feats,
    )
    counts = np.zeros(N + 1, np.int64)
    counts[1:31] = 3  # items 31..40 never seen in training
    m.item_tower.set_known(counts)
    with torch.no_grad():  # make id embeddings matter
        m.item_tower.id_emb.weight.normal_(std=0.5)  # type: ignore[union-attr]
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(
        d / "model.pt",
        m.eval(),
        items["external_id"].to_list(),
        feats.vocab,
        {"config_hash": "abc", "model_version": "v1"},
    )
    return d


def test_load_run_api(run_dir: Path) -> None:
    tm = load_run(run_dir)
    assert isinstance(tm, TrainedModel)
    assert (tm.model_version, tm.config_hash, tm.max_len, tm.dim) == ("v1", "abc", 12, 16)
    v = tm.item_vectors()
    assert v.shape == (N + 1, 16) and v.dtype == np.float32
    assert np.all(v[0] == 0)
    np.testing.assert_allclose(np.linalg.norm(v[1:], axis=1), 1.0, atol=1e-5)
    assert tm.item_ids.to_internal("sku5") == 5


def test_embed_items_known_rows_equal_item_vectors_and_cold_rows_use_content(run_dir: Path) -> None:
    tm = load_run(run_dir)
    items = _items()
    e = tm.embed_items(items)
    v = tm.item_vectors()
    np.testing.assert_allclose(e[:30], v[1:31], atol=1e-5)  # trained rows
    np.testing.assert_allclose(e[30:], v[31:], atol=1e-4)  # unseen in training: content path
    # a brand-new product (unknown external id) gets the vector of its content
    new = items[35:36].with_columns(pl.lit("NEW-1").alias("external_id"))
    np.testing.assert_allclose(tm.embed_items(new)[0], v[36], atol=1e-4)


def test_embed_text_lands_near_matching_products(run_dir: Path) -> None:
    tm = load_run(run_dir)
    q = tm.embed_text(["red lipstick"])
    assert q.shape == (1, 16)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    # content vectors of all items (no id part): the matching title ranks first
    content = tm.embed_items(
        _items().with_columns(pl.format("new-{}", "external_id").alias("external_id"))
    )
    assert int(np.argmax(content @ q[0])) == TITLES.index("red lipstick")


def test_user_encoder_protocol(run_dir: Path) -> None:
    enc = load_run(run_dir).user_encoder()
    assert isinstance(enc, UserEncoder) and enc.dim == 16
    out = enc.encode(pad_batch([np.array([1, 2, 3]), np.array([], dtype=np.int64)], 12))
    assert out.shape == (2, 16) and out.dtype == np.float32
    assert abs(np.linalg.norm(out[0]) - 1) < 1e-5 and np.all(out[1] == 0)


@pytest.mark.slow
def test_onnx_export_parity(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    paths = export_onnx(run_dir, tmp_path / "onnx")
    tm = load_run(run_dir)
    enc = tm.user_encoder()
    sess = ort.InferenceSession(str(paths["user_tower"]))
    rng = np.random.default_rng(0)
    for b, maxw in [(1, 1), (3, 5), (7, 12), (16, 12)]:
        seqs = [rng.integers(1, N + 1, size=int(rng.integers(1, maxw + 1))) for _ in range(b)]
        ts = [np.sort(rng.integers(0, 10**8, size=len(s))) for s in seqs]
        batch = pad_batch(seqs, 12, ts=ts)
        feeds = {k: getattr(batch, k) for k in ("items", "event_type", "gap", "lengths")}
        onnx_out = sess.run(None, feeds)[0]
        assert np.abs(onnx_out - enc.encode(batch)).max() <= 1e-4
    item_sess = ort.InferenceSession(str(paths["item_content"]))
    from towers.text_encoder import encode_texts

    text = encode_texts(["blue shampoo"])
    z = np.zeros(1, np.int64)
    got = item_sess.run(None, {"text": text, "brand": z, "category": z, "price": z})[0]
    np.testing.assert_allclose(got, tm.embed_text(["blue shampoo"]), atol=1e-4)
    np.testing.assert_allclose(np.load(paths["item_vectors"]), tm.item_vectors(), atol=1e-6)
