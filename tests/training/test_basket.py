"""Transaction-log pieces: item bags, personal top, the data-driven cutoff, the buy-again
protocol and the basket two-tower model on a planted co-purchase shop."""

from __future__ import annotations

import numpy as np
import pytest

from towers.sequences import Interactions, bag_for_users, item_bag
from training.baselines import PersonalTop, PersonalTopConfig
from training.evaluation import evaluate
from training.splits import default_test_start, temporal_split

DAY = 86400


def test_item_bag_counts_invoices_and_ages() -> None:
    # item 3 twice in one invoice (counts once), again 10 days later; item 5 once; event at
    # ``now`` or later is not in the bag
    bag = item_bag(
        [np.array([3, 3, 5, 3, 7])], [np.array([0, 0, 0, 10 * DAY, 20 * DAY])], [20 * DAY]
    )
    assert bag.items.tolist() == [3, 5]
    assert bag.count.tolist() == [2, 1]
    assert bag.age_s.tolist() == [10 * DAY, 20 * DAY]
    rf = bag.recency_frequency(half_life_days=10.0)
    np.testing.assert_allclose(rf, [2 * 0.5, 0.25])


def test_default_test_start_is_the_last_30_days() -> None:
    inter = Interactions.from_lists([[1, 2, 3]], 3, ts=[[0, 50 * DAY + 3600, 100 * DAY + 7200]])
    t0 = default_test_start(inter, test_days=30)
    assert t0 == 70 * DAY  # midnight 30 days before the last event's day


def test_personal_top_ranks_own_items_by_recency_weighted_frequency() -> None:
    # user 1: item 2 bought 3 times long ago, item 4 once yesterday; popular item 6
    seqs = [[2, 2, 2, 4], [6, 6], [6, 1]]
    ts = [[0, DAY, 2 * DAY, 99 * DAY], [0, DAY], [0, DAY]]
    inter = Interactions.from_lists(seqs, 6, ts=ts)
    m = PersonalTop(PersonalTopConfig(half_life_days=7.0))
    m.fit(inter)
    s = m.score(np.array([1]), inter)[0]
    assert np.argsort(-s)[:3].tolist() == [4, 2, 6]  # recent beats frequent-but-old; then popular
    m = PersonalTop(PersonalTopConfig(half_life_days=1000.0))
    m.fit(inter)
    assert np.argmax(m.score(np.array([1]), inter)[0]) == 2  # long memory: frequency wins


def test_buy_again_protocol_keeps_repurchases_as_targets() -> None:
    # customers bought item 1 (resp. 4) twice early, something else later, then item 1
    # (resp. 4 and a new 6) again in the test window
    seqs = [[1, 1, 2, 3, 1], [4, 4, 5, 7, 4, 6]]
    ts = [
        [0, 5 * DAY, 10 * DAY, 30 * DAY, 50 * DAY],
        [0, 5 * DAY, 10 * DAY, 30 * DAY, 50 * DAY, 50 * DAY],
    ]
    inter = Interactions.from_lists(seqs, 7, ts=ts)
    new = temporal_split(inter, 40 * DAY, valid_days=20)
    again = temporal_split(inter, 40 * DAY, valid_days=20, exclude_seen=False)
    assert new.test.items.tolist() == [6]  # new items only
    assert [again.test.of(i).tolist() for i in range(2)] == [[1], [4, 6]]
    m = PersonalTop()
    m.fit(again.train_valid)
    r = evaluate(m.score, again.test, again.train_valid, ks=(1,), exclude_seen=False)
    assert r["recall@1"] == pytest.approx(0.75)  # the repurchases are found first


@pytest.fixture(scope="module")
def copurchase_shop() -> tuple[Interactions, np.ndarray]:
    """Items come in planted pairs (2k-1, 2k): a customer who bought one buys its partner
    in a later invoice. 300 customers, 40 items, 3 invoices each."""
    rng = np.random.default_rng(0)
    seqs, tss, partner = [], [], np.zeros(41, np.int64)
    for k in range(1, 21):
        partner[2 * k - 1], partner[2 * k] = 2 * k, 2 * k - 1
    for _ in range(300):
        a, b = rng.integers(1, 41, 2)
        seqs.append([a, b, partner[a], partner[b]])
        tss.append([0, 0, 20 * DAY, 20 * DAY])
    return Interactions.from_lists(seqs, 40, ts=tss), partner


@pytest.mark.slow
def test_basket_tower_learns_co_purchase_and_round_trips(copurchase_shop, tmp_path) -> None:
    import torch

    from ecomrec.config import from_dict
    from training.basket import BasketRetriever, BasketTrainConfig

    torch.set_num_threads(1)
    inter, partner = copurchase_shop
    for init in ("ease", "random"):
        cfg = from_dict(
            BasketTrainConfig,
            {"epochs": 15, "lr": 0.01, "model": {"dim": 32, "init": init, "ease_l2": 10.0}},
        )
        r = BasketRetriever(cfg)
        r.fit(inter, None)
        # a customer who bought item a (only) gets a's partner first among new items
        hist = Interactions.from_lists([[a] for a in range(1, 41)], 40)
        s = r.score(np.arange(1, 41), hist)
        s[np.arange(40), np.arange(1, 41)] = -np.inf
        s[:, 0] = -np.inf
        hit = np.mean(np.argmax(s, 1) == partner[1:])
        assert hit > 0.9, (init, hit)
    r.save(tmp_path / "m")
    r2 = BasketRetriever.load(tmp_path / "m")
    np.testing.assert_allclose(r2.score(np.arange(1, 41), hist), r.score(np.arange(1, 41), hist))
    bag = bag_for_users(hist, np.array([3]))
    assert bag.items.tolist() == [3]


def test_buy_again_mixture_is_chosen_on_validation_and_finds_staples() -> None:
    """Every customer rebuys a staple at every invoice and also buys one random new item:
    the repeat share chosen on validation is > 0 and the staple ranks first."""
    import torch

    from ecomrec.config import from_dict
    from training.basket import BasketRetriever, BasketTrainConfig

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    seqs, tss = [], []
    for _ in range(150):
        staple = int(rng.integers(1, 31))
        s, t = [], []
        for week in range(12):
            s += [staple, int(rng.integers(1, 31))]
            t += [week * 7 * DAY] * 2
        seqs.append(s)
        tss.append(t)
    inter = Interactions.from_lists(seqs, 30, ts=tss)
    split = temporal_split(inter, 70 * DAY, valid_days=14, exclude_seen=False)
    cfg = from_dict(
        BasketTrainConfig, {"targets": "all", "epochs": 2, "model": {"dim": 16, "ease_l2": 10.0}}
    )
    r = BasketRetriever(cfg)
    r.fit(split.train, split.valid)
    assert r.mix > 0
    s = r.score(split.test.users, split.train_valid)
    staples = np.array([seqs[u - 1][0] for u in split.test.users])
    assert np.mean(np.argmax(s[:, 1:], 1) + 1 == staples) > 0.95


def test_transaction_log_is_detected_from_the_data_shape() -> None:
    from types import SimpleNamespace

    import polars as pl

    from training.protocol import is_transaction_log

    def ds(items_per_basket: int, ts_step: int, invoice: bool = False) -> SimpleNamespace:
        n = 60
        ev = pl.DataFrame(
            {
                "user_id": [1 + i // 30 for i in range(n)],
                "item_id": list(range(1, n + 1)),
                "ts": [
                    1_600_000_000 // 86400 * 86400 + (i // items_per_basket) * ts_step
                    for i in range(n)
                ],
                "event_type": ["purchase"] * n,
            }
        )
        return SimpleNamespace(
            events=ev.with_columns(pl.lit("5367").alias("InvoiceNo")) if invoice else ev
        )

    assert is_transaction_log(ds(10, 3600))  # invoices of 10 items, times of day
    assert is_transaction_log(ds(2, 3600))  # small baskets, times of day
    assert not is_transaction_log(ds(2, 86400))  # same-day reviews (day-granular)
    assert is_transaction_log(ds(4, 86400))  # big baskets even without times
    assert not is_transaction_log(ds(1, 3600))  # one item per event: a stream
    assert is_transaction_log(ds(1, 3600, invoice=True))  # the Online Retail columns
