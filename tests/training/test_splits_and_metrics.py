"""Splits (leave-one-out, ties, temporal) and full-ranking metrics on planted answers."""

from __future__ import annotations

import numpy as np
import pytest

from towers.sequences import Interactions
from training.evaluation import evaluate, metrics_from_topk, rank_topk
from training.splits import Targets, leave_one_out, sample_validation, temporal_split


def _inter() -> Interactions:
    return Interactions.from_lists([[1, 2, 3, 4], [2, 3, 4, 5], [5, 1]], n_items=6)


def test_leave_one_out_targets_and_histories() -> None:
    s = leave_one_out(_inter())
    assert s.test.users.tolist() == [1, 2] and s.test.first().tolist() == [4, 5]
    assert s.valid.first().tolist() == [3, 4]
    assert s.train.seq(1).tolist() == [1, 2] and s.train_valid.seq(1).tolist() == [1, 2, 3]
    assert s.train.seq(3).tolist() == [5, 1]  # too short: stays in training


def test_sampled_validation_trains_on_the_other_users_validation_items() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 30, rng.integers(3, 9)).tolist() for _ in range(200)]
    s = leave_one_out(Interactions.from_lists(seqs, n_items=30))
    v = sample_validation(s, 0.25, 10, seed=1)
    held = set(v.valid.users.tolist())
    assert len(held) == 50 and held <= set(s.valid.users.tolist())
    for i, u in enumerate(s.valid.users.tolist()):
        if u in held:  # classic: train prefix, validation item held out
            assert v.train.seq(u).tolist() == s.train.seq(u).tolist()
            j = int(np.flatnonzero(v.valid.users == u)[0])
            assert v.valid.of(j).tolist() == s.valid.of(i).tolist()
        else:  # trained on its validation item too (never on its test item)
            assert v.train.seq(u).tolist() == s.train_valid.seq(u).tolist()
    assert v.test is s.test and v.train_valid is s.train_valid
    assert v.protocol["valid_sample"] == {"users": 50, "of": 200, "fraction": 0.25, "seed": 1}
    again = sample_validation(s, 0.25, 10, seed=1)
    assert np.array_equal(again.valid.users, v.valid.users)
    # the minimum wins over a small fraction; a sample of everyone is the classic split
    assert len(sample_validation(s, 0.01, 40).valid) == 40
    assert sample_validation(s, 0.5, 500) is s and sample_validation(s, 1.0, 1) is s
    t = temporal_split(
        Interactions.from_lists(
            seqs, n_items=30, ts=[[i * 86400 for i in range(len(q))] for q in seqs]
        ),
        test_start=6 * 86400,
        valid_days=2,
    )
    assert sample_validation(t, 0.25, 10) is t  # leave-one-out only


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
