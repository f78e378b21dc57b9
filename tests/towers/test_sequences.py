"""The shared feature path: truncation, padding, gaps, batch vs single."""

from __future__ import annotations

import numpy as np

from towers.sequences import Interactions, batch_for_users, gap_buckets, pad_batch


def test_pad_batch_keeps_most_recent_and_right_pads() -> None:
    b = pad_batch([np.array([1, 2, 3, 4, 5]), np.array([7])], max_len=3)
    assert b.items.tolist() == [[3, 4, 5], [7, 0, 0]]
    assert b.lengths.tolist() == [3, 1]
    assert (b.event_type[1, 1:] == 0).all() and (b.gap[1, 1:] == 0).all()


def test_batch_equals_single_rows(shop) -> None:  # type: ignore[no-untyped-def]
    inter = Interactions.from_events(shop.events, shop.n_users, shop.n_items)
    users = np.array([1, 5, 9, 42])
    batch = batch_for_users(inter, users, max_len=8)
    for r, u in enumerate(users):
        one = batch_for_users(inter, np.array([u]), max_len=8)
        n = int(one.lengths[0])
        assert batch.items[r, :n].tolist() == one.items[0, :n].tolist()
        assert batch.gap[r, :n].tolist() == one.gap[0, :n].tolist()


def test_gap_buckets_monotone() -> None:
    ts = np.array([0, 0, 30, 4000, 90000, 90000 + 40 * 86400])
    g = gap_buckets(ts)
    assert g[0] == g[1] == 1  # first event and same instant
    assert (np.diff(g[1:]) >= 0).all() and g[-1] > g[3]


def test_interactions_order_csr_and_append(shop) -> None:  # type: ignore[no-untyped-def]
    inter = Interactions.from_events(shop.events, shop.n_users, shop.n_items)
    assert inter.lengths()[0] == 0 and inter.lengths().sum() == shop.events.height
    for u in (1, 2, 3):
        assert (np.diff(inter.seq_ts(u)) >= 0).all()
    m = inter.to_csr()
    assert m.shape == (shop.n_users + 1, shop.n_items + 1)
    assert m[1].indices.tolist() == sorted(set(inter.seq(1).tolist()))
    more = inter.append(np.array([2, 2]), np.array([7, 8]), np.array([10**10, 10**10 + 1]))
    assert more.seq(2).tolist() == [*inter.seq(2).tolist(), 7, 8]
    assert more.seq(3).tolist() == inter.seq(3).tolist()
