"""Splits (leave-one-out, ties, temporal) and full-ranking metrics on planted answers."""

from __future__ import annotations

import numpy as np
import pytest

from towers.sequences import Interactions
from training.evaluation import evaluate, metrics_from_topk, rank_topk
from training.splits import Targets, leave_one_out, temporal_split


def _inter() -> Interactions:
    return Interactions.from_lists([[1, 2, 3, 4], [2, 3, 4, 5], [5, 1]], n_items=6)


def test_leave_one_out_targets_and_histories() -> None:
    s = leave_one_out(_inter())
    assert s.test.users.tolist() == [1, 2] and s.test.first().tolist() == [4, 5]
    assert s.valid.first().tolist() == [3, 4]
    assert s.train.seq(1).tolist() == [1, 2] and s.train_valid.seq(1).tolist() == [1, 2, 3]
    assert s.train.seq(3).tolist() == [5, 1]  # too short: stays in training


def test_shuffled_ties_only_permute_same_timestamp() -> None:
    inter = Interactions.from_lists(
        [[1, 2, 3, 4, 5, 6]] * 50, n_items=6, ts=[[1, 1, 1, 2, 3, 3]] * 50
    )
    s = leave_one_out(inter, ties="shuffle", seed=0)
    # the last event is one of the two ts=3 items, never an earlier one
    assert set(s.test.first().tolist()) == {5, 6}
    assert set(s.valid.first().tolist()) == {5, 6}
    f = leave_one_out(inter, ties="file")
    assert set(f.test.first().tolist()) == {6}
    again = leave_one_out(inter, ties="shuffle", seed=0)
    assert np.array_equal(again.test.items, s.test.items)


def test_temporal_split_has_no_leakage() -> None:
    day = 86400
    inter = Interactions.from_lists(
        [[1, 2, 3, 4], [2, 5, 6]],
        n_items=6,
        ts=[[0, 10 * day, 40 * day, 70 * day], [5 * day, 45 * day, 80 * day]],
    )
    s = temporal_split(inter, test_start=60 * day, valid_days=30)
    assert (s.train.ts < 30 * day).all() and (s.train_valid.ts < 60 * day).all()
    assert s.valid.users.tolist() == [1, 2] and s.valid.items.tolist() == [3, 5]
    assert s.test.users.tolist() == [1, 2] and s.test.items.tolist() == [4, 6]


def test_metrics_hand_computed() -> None:
    top = np.array([[4, 1, 2], [1, 2, 3], [9, 8, 7]])
    t = Targets(np.array([1, 2, 3]), np.array([0, 1, 3, 4]), np.array([1, 3, 2, 7], np.int32))
    m = metrics_from_topk(top, t, (1, 3), n_items=10)
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@3"] == pytest.approx((1 + 1 + 1) / 3)  # user2: 2 of 2 targets
    ndcg_u1 = 1 / np.log2(3)
    ndcg_u2 = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    ndcg_u3 = 1 / np.log2(4)
    assert m["ndcg@3"] == pytest.approx((ndcg_u1 + ndcg_u2 + ndcg_u3) / 3)
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)


def test_evaluate_oracle_random_and_exclusion() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 500
    seqs = [
        rng.choice(np.arange(1, n_items + 1), 6, replace=False).tolist() for _ in range(n_users)
    ]
    s = leave_one_out(Interactions.from_lists(seqs, n_items))
    target = dict(zip(s.test.users.tolist(), s.test.first().tolist()))

    def oracle(users: np.ndarray, hist: Interactions) -> np.ndarray:
        out = np.zeros((len(users), n_items + 1), np.float32)
        out[np.arange(len(users)), [target[int(u)] for u in users]] = 1
        return out

    assert evaluate(oracle, s.test, s.train_valid)["ndcg@10"] == pytest.approx(1.0)

    def random(users: np.ndarray, hist: Interactions) -> np.ndarray:
        return rng.random((len(users), n_items + 1)).astype(np.float32)

    r = evaluate(random, s.test, s.train_valid, ks=(50,))["recall@50"]
    assert 0.03 < r < 0.2  # ~50/495

    def history_lover(users: np.ndarray, hist: Interactions) -> np.ndarray:
        out = np.zeros((len(users), n_items + 1), np.float32)
        for i, u in enumerate(users):
            out[i, hist.seq(int(u))] = 10
        return out

    # with exclusion the history items never occupy the top ranks; without, they fill them
    users = s.test.users[:20]
    scores = history_lover(users, s.train_valid)
    ex = rank_topk(scores, users, s.train_valid, 5, exclude_seen=True)
    kept = rank_topk(scores, users, s.train_valid, 5, exclude_seen=False)
    for i, u in enumerate(users):
        hist = set(s.train_valid.seq(int(u)).tolist())
        assert not hist & set(ex[i].tolist())
        assert set(kept[i].tolist()) == hist
