"""Warm-start transplant parity, the promotion rule, drift alerts and the shadow targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from tests.lifecycle.conftest import Shop


def test_transplant_keeps_known_items_and_inits_new_ones(shop: Shop, live_run: Path) -> None:
    from intake.dataset import IdMap
    from lifecycle.warmstart import transplant
    from towers.model import load_checkpoint
    from towers.sequences import Interactions

    ck, _ = load_checkpoint(live_run / "model.pt")
    with torch.no_grad():
        live_vecs = ck.model.item_vectors().numpy()  # (N+1, D)
    ds = shop.old
    # same catalogue: the carried model gives the same item and user vectors
    same = transplant(ck, ds.items, ds.item_ids.external_ids, np.zeros(ds.n_items + 1))
    same.model.eval()
    with torch.no_grad():
        assert np.allclose(same.model.item_vectors().numpy(), live_vecs, atol=1e-6)
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    from lifecycle.shadow import user_vectors

    users = np.flatnonzero(inter.lengths() > 0)[:50]
    assert np.allclose(
        user_vectors(same.model, inter, users, 20),
        user_vectors(ck.model, inter, users, 20),
        atol=1e-5,
    )
    # a grown catalogue whose sorted ids shift: two new products sorted FIRST
    ext = ds.item_ids.external_ids
    new_ext = ["!new-a", "!new-b"]
    ids = IdMap(sorted([*ext, *new_ext]))
    base = ds.items.drop("item_id")
    clone = base.filter(pl.col("external_id").is_in([ext[0], ext[1]])).with_columns(
        pl.Series("external_id", new_ext)
    )  # same brand/category/price as two known items
    items = pl.concat([base, clone]).with_columns(
        pl.col("external_id").replace_strict({e: ids.to_internal(e) for e in ids.external_ids}, return_dtype=pl.Int32).alias("item_id")
    ).sort("item_id")  # fmt: skip
    counts = np.zeros(len(ids) + 1)
    counts[ids.to_internal("!new-a")] = 3  # new-a was bought, new-b not yet
    tp = transplant(ck, items, ids.external_ids, counts, neighbours=5)
    tp.model.eval()
    with torch.no_grad():
        v = tp.model.item_vectors().numpy()
    for e in ext:
        assert np.allclose(v[ids.to_internal(e)], live_vecs[ds.item_ids.to_internal(e)], atol=1e-6)
    assert sorted(tp.new_items.tolist()) == sorted(ids.to_internal(e) for e in new_ext)
    known = tp.model.item_tower.known.numpy()
    a, b = ids.to_internal("!new-a"), ids.to_internal("!new-b")
    assert known[a] == 1.0 and known[b] == 0.0
    emb = tp.model.item_tower.id_emb.weight.detach().numpy()  # type: ignore[union-attr]
    assert np.abs(emb[a]).sum() > 0  # initialised from its content neighbours
    # new-a's id embedding is a convex mix of known items' id embeddings: it lies in their span
    old_rows = emb[[ids.to_internal(e) for e in ext]]
    coef, *_ = np.linalg.lstsq(old_rows.T, emb[a], rcond=None)
    assert np.allclose(old_rows.T @ coef, emb[a], atol=1e-4)


def test_decide_records_and_applies_both_tolerances() -> None:
    from lifecycle.refresh import RefreshConfig, decide

    cfg = RefreshConfig(tolerance=0.05, churn_tolerance=0.01, min_eval_users=10)
    live = {"ndcg@10": 0.100, "users": 50.0}
    churn = {"live": {"auc": 0.70}, "candidate": {"auc": 0.70}}
    assert decide(live, {"ndcg@10": 0.096}, churn, cfg)[0]  # -4% within 5%
    ok, why = decide(live, {"ndcg@10": 0.094}, churn, cfg)
    assert not ok and "0.0940" in why and "0.1000" in why
    worse_churn = {"live": {"auc": 0.70}, "candidate": {"auc": 0.68}}
    ok, why = decide(live, {"ndcg@10": 0.12}, worse_churn, cfg)
    assert not ok and "churn AUC" in why
    assert not decide({"ndcg@10": 0.1, "users": 5.0}, {"ndcg@10": 0.2}, churn, cfg)[0]
    assert decide(live, {"ndcg@10": 0.1}, {}, cfg)[0]  # churn not measurable: ranking decides


def test_drift_alerts_fire_on_thresholds() -> None:
    from lifecycle.drift import DriftThresholds, alerts

    rep = {
        "new_items": {"share": 0.6},
        "new_users": {"share": 0.1},
        "embedding_drift": {"model": {"mean": 0.05}},
        "rfm_migration": {"moved_share": 0.95},
        "behaviour_migration": {"moved_share": 0.2},
        "churn_calibration": {"ece": 0.01},
    }
    got = alerts(rep, DriftThresholds())
    assert len(got) == 2 and got[0].startswith("new item share 0.600") and "RFM" in got[1]
    assert alerts(rep, DriftThresholds(max_new_item_share=0, max_rfm_migration=0)) == []


def test_window_targets_follow_the_temporal_protocol() -> None:
    from lifecycle.shadow import window_targets
    from towers.sequences import Interactions

    day = 86400
    # user 1: history [1, 2], buys 2 again (seen: not a target) and 3 in the window
    # user 2: no history before the window (not evaluated); user 3: buys 4 after the window
    inter = Interactions.from_lists(
        [[1, 2, 2, 3], [5], [1, 4]],
        n_items=5,
        ts=[[0, day, 5 * day, 6 * day], [5 * day], [0, 9 * day]],
    )
    targets, history = window_targets(inter, 4 * day, 8 * day)
    assert targets.users.tolist() == [1] and targets.of(0).tolist() == [3]
    assert history.seq(1).tolist() == [1, 2] and len(history.seq(2)) == 0
