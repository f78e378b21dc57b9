"""Behavioural segments: k by silhouette, stable ids across refreshes, profiles and names."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from segments.behaviour import (
    SegmentConfig,
    SegmentModel,
    cluster_inputs,
    fit_segments,
    profile_segments,
)


def blobs(
    n_per: int = 150, k: int = 5, d: int = 8, seed: int = 0, spread: float = 0.08
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[:k] * 1.0
    x = np.concatenate([c + spread * rng.standard_normal((n_per, d)) for c in centers])
    y = np.repeat(np.arange(k), n_per)
    return x, y


def purity(a: np.ndarray, b: np.ndarray) -> float:
    """Share of points whose cluster's majority planted label is their own."""
    tot = 0
    for s in np.unique(a):
        tot += np.bincount(b[a == s]).max()
    return tot / len(a)


def test_silhouette_picks_the_planted_k() -> None:
    x, y = blobs()
    xx, _ = cluster_inputs(x, None, SegmentConfig())
    m = fit_segments(xx, SegmentConfig(k_min=2, k_max=8))
    assert len(m.ids) == 5
    assert max(m.silhouette, key=lambda k: m.silhouette[k]) == 5
    assert purity(m.assign(xx), y) == 1.0
    # first fit numbers segments by size
    assert sorted(m.ids.tolist()) == list(range(5))


def test_ids_stable_under_permutation_and_perturbation() -> None:
    x, _ = blobs()
    cfg = SegmentConfig(k=5)
    xx, _ = cluster_inputs(x, None, cfg)
    m1 = fit_segments(xx, cfg)
    ids1 = m1.assign(xx)
    rng = np.random.default_rng(7)
    perm = rng.permutation(len(x))
    x2 = x[perm] + 0.02 * rng.standard_normal(x.shape)  # refreshed data: reordered, moved a bit
    xx2, _ = cluster_inputs(x2, None, cfg)
    m2 = fit_segments(xx2, SegmentConfig(k=5, seed=3), previous=m1)
    assert (m2.assign(xx2) == ids1[perm]).all()
    assert m2.next_id == m1.next_id
    # a cold k-means (other seed) on the refreshed data, ids only from Hungarian matching
    from segments.behaviour import match_ids

    cold = fit_segments(xx2, SegmentConfig(k=5, seed=11))
    ids, _ = match_ids(m1, cold.centroids)
    matched = SegmentModel(cfg, cold.centroids, ids, m1.next_id)
    assert (matched.assign(xx2) == ids1[perm]).all()


def test_hungarian_matching_without_warm_start_and_new_cluster_gets_fresh_id() -> None:
    from segments.behaviour import match_ids

    x, y = blobs(k=4)
    cfg = SegmentConfig(k=4)
    xx, _ = cluster_inputs(x, None, cfg)
    m1 = fit_segments(xx, cfg)
    # new centroids in shuffled order plus one new cluster far away
    order = np.array([2, 0, 3, 1])
    new = np.concatenate([m1.centroids[order] + 0.01, np.full((1, xx.shape[1]), -1.0)])
    ids, nxt = match_ids(m1, new)
    assert ids[:4].tolist() == m1.ids[order].tolist()
    assert ids[4] == m1.next_id == 4 and nxt == 5
    # a refresh with more clusters keeps the old ids and adds fresh ones
    x5, _ = blobs(k=5)
    xx5, _ = cluster_inputs(x5, None, cfg)
    m2 = fit_segments(xx5, SegmentConfig(k=5), previous=m1)
    assert set(m1.ids.tolist()) < set(m2.ids.tolist())
    assert max(m2.ids) == 4
    del y


def test_rfm_block_and_model_round_trip() -> None:
    x, _ = blobs(k=3)
    rfm = pl.DataFrame(
        {
            "recency_days": np.arange(len(x), dtype=float),
            "frequency": np.arange(len(x)) % 7 + 1.0,
            "monetary": np.linspace(1, 100, len(x)),
        }
    )
    cfg = SegmentConfig(k=3, with_rfm=True, rfm_weight=0.5)
    xx, stats = cluster_inputs(x, rfm, cfg)
    assert xx.shape == (len(x), x.shape[1] + 3) and stats is not None
    # the RFM block weighs rfm_weight (root-mean-square norm) next to unit-norm embeddings
    assert np.sqrt((xx[:, -3:] ** 2).sum(1).mean()) == pytest.approx(0.5, rel=1e-3)
    m = fit_segments(xx, cfg, rfm_stats=stats)
    m2 = SegmentModel.from_dict(m.to_dict())
    assert (m2.assign(xx) == m.assign(xx)).all()
    # the stored statistics reproduce the same inputs on refresh
    xx2, _ = cluster_inputs(x, rfm, cfg, m2.rfm_stats)
    assert np.allclose(xx, xx2)


def test_profiles_describe_planted_taste(shop) -> None:  # type: ignore[no-untyped-def]
    """Cluster the synthetic shop's customers on their category mix: each segment's top
    category is the planted favourite of most of its members, and names reflect it."""
    ev = shop.events.filter(pl.col("event_type") == "purchase")
    cut = int(ev["ts"].max()) + 1
    cats = shop.items["category"].to_list()
    names = sorted(set(cats))
    item_cat = np.array([0] + [names.index(c) for c in cats])
    users = np.arange(1, shop.n_users + 1)
    mix = np.zeros((shop.n_users + 1, len(names)))
    np.add.at(mix, (ev["user_id"].to_numpy(), item_cat[ev["item_id"].to_numpy()]), 1.0)
    emb = mix[1:]
    fav = shop.extra["planted"]["favourite_category"]
    cfg = SegmentConfig(k=len(names))
    xx, _ = cluster_inputs(emb, None, cfg)
    m = fit_segments(xx, cfg)
    seg = m.assign(xx)
    churn = np.array(shop.extra["planted"]["lapsed"], dtype=float)
    prof = profile_segments(shop, cut, users, seg, None, churn)
    assert sum(p["size"] for p in prof) == shop.n_users
    hits = 0
    for p in prof:
        members = np.flatnonzero(seg == p["segment"])
        majority = max(
            set(fav[i] for i in members), key=lambda c: sum(fav[i] == c for i in members)
        )
        hits += p["top_categories"][0] == majority
        assert majority in p["name"]
        assert p["price_tier"] in ("Budget", "Mid-range", "Premium")
        assert 0.0 <= p["churn_rate"] <= 1.0
    assert hits == len(prof)
    assert len({p["name"] for p in prof}) == len(prof)  # names are unique


def test_nearest_customers_of_a_customer_and_of_a_segment_centroid(tmp_path) -> None:
    import numpy as np
    import polars as pl

    from segments.behaviour import nearest_customers, segment_neighbours

    rng = np.random.default_rng(0)
    # two planted groups around orthogonal directions
    a = np.array([1.0, 0, 0, 0]) + 0.05 * rng.standard_normal((20, 4))
    b = np.array([0, 1.0, 0, 0]) + 0.05 * rng.standard_normal((20, 4))
    emb = np.concatenate([a, b]).astype(np.float32)
    users = np.arange(101, 141)
    nn = nearest_customers(emb, users, emb[0], k=5, exclude=users[:1])
    assert 101 not in nn["user_id"].to_list()
    assert all(u <= 120 for u in nn["user_id"].to_list())  # its own group
    assert nn["cosine"].to_list() == sorted(nn["cosine"].to_list(), reverse=True)
    seg = np.array(["a"] * 20 + ["b"] * 20)
    out = segment_neighbours(emb, users, seg, k=3)
    assert out.height == 6
    assert all(u > 120 for u in out.filter(pl.col("segment") == "b")["user_id"].to_list())
    out.write_csv(tmp_path / "n.csv")
    assert pl.read_csv(tmp_path / "n.csv").height == 6


def test_basket_user_embeddings_ignore_events_after_the_cutoff(tmp_path) -> None:
    import dataclasses

    import numpy as np
    import polars as pl
    import torch

    from ecomrec.config import from_dict
    from intake.synthetic import SyntheticConfig, make_shop
    from segments.behaviour import user_embeddings
    from towers.sequences import Interactions
    from training.basket import BasketRetriever, BasketTrainConfig

    torch.set_num_threads(1)
    ds = make_shop(SyntheticConfig(n_users=60, n_items=30, seed=2))
    inter = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
    r = BasketRetriever(
        from_dict(BasketTrainConfig, {"targets": "all", "epochs": 1, "model": {"dim": 8}})
    )
    r.fit(inter, None)
    r.save(tmp_path / "basket")
    cut = int(np.median(ds.events["ts"].to_numpy()))
    users = np.arange(1, 61)
    e = user_embeddings(ds, cut, users, source="basket", run_dir=tmp_path / "basket")
    assert e.shape == (60, 9)
    np.testing.assert_allclose(
        np.linalg.norm(e[:, :8], axis=1)[np.abs(e[:, :8]).sum(1) > 0], 1.0, atol=1e-5
    )
    # change every event after the cutoff: the embeddings at the cutoff do not move
    late = ds.events.with_columns(
        pl.when(pl.col("ts") >= cut).then(1).otherwise(pl.col("item_id")).alias("item_id")
    )
    e2 = user_embeddings(
        dataclasses.replace(ds, events=late),
        cut,
        users,
        source="basket",
        run_dir=tmp_path / "basket",
    )
    np.testing.assert_allclose(e, e2)
