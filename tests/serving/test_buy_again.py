"""A synthetic shop with a planted repeat buyer and a planted churner.

The served Recommend call (real local gRPC server, real embedded Qdrant index) in mode
``buy-again`` must put the repeat buyer's staple first (and the default mode must not
offer it again); the churn score (BG/NBD P(alive), segments.bgnbd) must rank the
churner among the least likely to still be a customer, below the repeat buyer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import polars as pl
import pytest

from tests.serving.conftest import Served, build_index, make_engine, open_reader, train_quick_run

pytestmark = pytest.mark.slow  # a trained model / a served process per module: seconds

WEEK = 7 * 86400
REPEAT_USER, CHURN_USER, STAPLE = 7, 11, 42  # internal ids (1-based)


@pytest.fixture(scope="module")
def planted_shop() -> Any:
    """make_shop, then user 7 buys item 42 every week of the last 20 weeks (plus their usual
    items) and user 11 buys 15 times in the first 10 weeks and never again."""
    from intake.synthetic import SyntheticConfig, make_shop

    ds = make_shop(SyntheticConfig(n_users=200, n_items=100, seed=3, lapse_fraction=0.0))
    ev = ds.events
    t_end = int(ev["ts"].max())
    t0 = int(ev["ts"].min())
    keep = ev.filter(pl.col("user_id") != CHURN_USER)
    rep = pl.DataFrame(
        {
            "user_id": np.full(20, REPEAT_USER, np.int32),
            "item_id": np.full(20, STAPLE, np.int32),
            "ts": t_end - np.arange(20, dtype=np.int64) * WEEK - 3600,
            "event_type": ["purchase"] * 20,
            "quantity": np.full(20, 2, np.int32),
            "price": np.full(20, 5.0),
        }
    )
    rng = np.random.default_rng(0)
    churn = pl.DataFrame(
        {
            "user_id": np.full(15, CHURN_USER, np.int32),
            "item_id": rng.integers(1, 101, 15).astype(np.int32),
            "ts": t0 + np.sort(rng.integers(0, 10 * WEEK, 15)).astype(np.int64),
            "event_type": ["purchase"] * 15,
            "quantity": np.full(15, 1, np.int32),
            "price": np.full(15, 5.0),
        }
    )
    extra = pl.concat([rep, churn]).with_columns(pl.lit(0, pl.Int64).alias("order"))
    events = (
        pl.concat([keep, extra.select(keep.columns)])
        .sort(["user_id", "ts"])
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("order"))
    )
    return dataclasses.replace(ds, events=events)


@pytest.fixture(scope="module")
def served_shop(planted_shop: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from serving.assemble import load_parts

    ds = planted_shop
    out = train_quick_run(ds, tmp_path_factory.mktemp("run_buy_again"), epochs=1)
    parts = load_parts(out, ds)
    index_dir = tmp_path_factory.mktemp("index_buy_again")
    build_index(index_dir, parts)
    reader = open_reader(index_dir)
    s = Served(make_engine(parts, reader))
    yield s
    s.close()
    reader.close()


def test_served_buy_again_finds_the_repeat_buyers_staple(
    served_shop: Served, planted_shop: Any
) -> None:
    ext = planted_shop.users.to_external(REPEAT_USER)
    staple = planted_shop.item_ids.to_external(STAPLE)
    pb = served_shop.pb
    again = served_shop.call("Recommend", pb.RecommendRequest(user_id=ext, k=5, mode="buy-again"))
    assert again.items[0].item_id == staple
    assert "BUY_AGAIN" in again.items[0].reasons
    explore = served_shop.call("Recommend", pb.RecommendRequest(user_id=ext, k=5))
    assert staple not in [i.item_id for i in explore.items]  # default: bought items excluded
    # an explicit exclusion wins over the buy-again mixture
    excl = served_shop.call(
        "Recommend",
        pb.RecommendRequest(user_id=ext, k=5, mode="buy-again", exclude_item_ids=[staple]),
    )
    assert staple not in [i.item_id for i in excl.items]


def test_unknown_mode_is_invalid_argument(served_shop: Served, planted_shop: Any) -> None:
    ext = planted_shop.users.to_external(REPEAT_USER)
    with pytest.raises(grpc.RpcError) as e:
        served_shop.call(
            "Recommend", served_shop.pb.RecommendRequest(user_id=ext, k=5, mode="again")
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mode" in (e.value.details() or "")


def test_churn_score_finds_the_churner(planted_shop: Any) -> None:
    from segments.bgnbd import BGNBD, transaction_summary

    ev = planted_shop.events
    cutoff = (int(ev["ts"].max()) // 86400 + 1) * 86400  # the day after the last purchase
    summ = transaction_summary(ev, cutoff)
    m = BGNBD().fit(summ["frequency"].to_numpy(), summ["recency"].to_numpy(), summ["T"].to_numpy())
    p_alive = m.p_alive(
        summ["frequency"].to_numpy(), summ["recency"].to_numpy(), summ["T"].to_numpy()
    )
    users = summ["user_id"].to_numpy()
    p_churn, p_rep = p_alive[users == CHURN_USER][0], p_alive[users == REPEAT_USER][0]
    assert p_churn < 0.2 < p_rep
    assert p_churn <= np.quantile(p_alive, 0.05)  # among the 5% least likely to be alive


def test_cli_recommend_buy_again_mode(
    served_shop: Served, planted_shop: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ecomrec recommend --mode buy-again` asks the service for the buy-again mixture: the
    repeat buyer's staple comes first with BUY_AGAIN; the default mode does not offer it."""
    import argparse

    from serving.cli import register
    from tests.serving.conftest import API_KEY

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd"))
    ext = planted_shop.users.to_external(REPEAT_USER)
    staple = planted_shop.item_ids.to_external(STAPLE)
    base = ["recommend", "--target", served_shop.handle.target, "--user", ext, "-k", "5"]
    base += ["--api-key", API_KEY]
    args = ap.parse_args([*base, "--mode", "buy-again"])
    assert args.func(args) == 0
    _head, ids, first = (ln.split() for ln in capsys.readouterr().out.splitlines()[:3])
    assert ids[0] == "recommendation_id" and ids[2:] == ["variant", "default"]
    assert first[1] == staple and "BUY_AGAIN" in first[3]
    args = ap.parse_args(base)
    assert args.func(args) == 0
    assert staple not in capsys.readouterr().out.split()
