"""Churn / high-value models on the synthetic shop (planted lapsing customers), the
metrics, and LoRA / full fine-tuning of a user tower with the heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segments.churn import (
    BGNBDModel,
    ChurnConfig,
    GBDTModel,
    TowerHeads,
    binary_metrics,
    lift_at,
    temporal_split,
)

CFG = ChurnConfig(horizon_days=60, epochs=15, patience=4)


def test_metrics_on_known_cases() -> None:
    y = np.array([0, 0, 1, 1.0])
    m = binary_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]))
    assert m["roc_auc"] == 1.0 and m["pr_auc"] == 1.0
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.04 + 0.01) / 4)
    y10 = np.array([1] + [0] * 9, dtype=float)
    assert lift_at(y10, np.arange(10, 0, -1, dtype=float), 0.1) == pytest.approx(10.0)


@pytest.fixture(scope="module")
def split(shop):  # type: ignore[no-untyped-def]
    return temporal_split(shop, CFG)


def test_split_is_temporal_and_labels_do_not_overlap(split) -> None:  # type: ignore[no-untyped-def]
    train, test = split
    assert train.cutoff_ts + CFG.horizon_days * 86400 == test.cutoff_ts
    assert 0 < train.label("churn").mean() < 1


@pytest.mark.slow
def test_baselines_find_planted_lapsers(split) -> None:  # type: ignore[no-untyped-def]
    train, test = split
    for model in (BGNBDModel(CFG), GBDTModel(CFG)):
        p = model.fit(train).predict(test)
        m = binary_metrics(test.label("churn"), p.churn)
        assert m["roc_auc"] > 0.75, type(model).__name__
        assert ((p.high_value >= 0) & (p.high_value <= 1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_tower_fine_tuning_modes(shop, split, mode) -> None:  # type: ignore[no-untyped-def]
    from segments.behaviour import tower_batches
    from towers.item_tower import ItemTowerConfig, build_item_features
    from towers.model import TwoTower
    from towers.user_tower import UserTowerConfig

    train, test = split
    torch.manual_seed(0)
    feats = build_item_features(shop.items, shop.n_items, None)
    tt = TwoTower(
        ItemTowerConfig(dim=16, use_text=False),
        UserTowerConfig(max_len=20, hidden=16, n_layers=1, n_heads=1),
        shop.n_items,
        feats,
    )
    before = {k: v.clone() for k, v in tt.state_dict().items()}

    class Run:  # the two attributes tower_batches needs from a TrainedModel
        item_ids = shop.item_ids
        max_len = 20

    heads = TowerHeads(CFG).fit_tower(
        tt, tower_batches(Run, shop, train.cutoff_ts, train.users), train, mode=mode
    )
    p = heads.predict_tower(tower_batches(Run, shop, test.cutoff_ts, test.users), test)
    assert binary_metrics(test.label("churn"), p.churn)["roc_auc"] > 0.75
    # the caller's model is untouched (the heads fine-tune a copy)
    assert all(torch.equal(before[k], v) for k, v in tt.state_dict().items())
    head_params = sum(q.numel() for q in heads.head.parameters())
    tower_params = sum(q.numel() for q in tt.user_tower.parameters())
    if mode == "lora":
        lora = [n for n, q in heads.tower.named_parameters() if q.requires_grad]
        assert lora and all("lora_" in n for n in lora)
        assert heads.trainable_params < head_params + tower_params // 2
    else:
        assert heads.trainable_params == head_params + tower_params
