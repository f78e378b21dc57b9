"""Issue 24: one protocol and model selection for `ecomrec train` and benchmarks/quality.py;
the basket tower served like every other family; products without a trained vector never
stop an index build.

The planted invoice shop (tests/training/shops.py): themes of 4 products bought in order,
one theme per invoice, so the next purchase follows the LATEST invoice; ids only, with
catalogue products never bought.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.training.shops import next_theme, planted_invoice_shop

ROOT = Path(__file__).resolve().parents[2]
# small and fast: the basket tower at D 32 (one grid point), ALS/EASE one grid point each
ARGS = [
    "--config", "quick",
    "--set", "threads=1",
    "--set", "fallback.enabled=true",
    "--set", "fallback.als_alphas=[10.0]",
    "--set", "fallback.ease_l2=[50.0]",
    "--set", "basket.dims=[32]",
    "--set", "basket.epochs=10",
    "--set", "basket.lr=0.01",
    "--set", "basket.patience=2",
]  # fmt: skip
N_UNSEEN = 6


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_invoice_shop(tmp_path_factory.mktemp("shop"), n_unseen=N_UNSEEN)


@pytest.fixture(scope="module")
def basket_run(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`ecomrec train` on the planted shop (the printed table is returned too)."""
    import contextlib
    import io

    import torch

    from ecomrec.cli import main

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run") / "basket"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--dataset", str(shop), "--out", str(run), *ARGS]) == 0
    return run, buf.getvalue()


@pytest.mark.slow
def test_train_and_quality_benchmark_choose_the_same(
    shop: Path, basket_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Same split, same served family, same test NDCG@10 from `ecomrec train` and
    benchmarks/quality.py (a separate process); the basket tower wins on validation."""
    run, table = basket_run
    res = json.loads((run / "results.json").read_text())
    out = tmp_path / "q.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--dataset", str(shop),
         *ARGS, "--quiet", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads(out.read_text())
    # the same split: temporal, cutoff from the data (a transaction log)
    assert res["split"]["split"] == "temporal" and "transaction log" in res["split"]["rule"]
    for k in ("valid_start", "test_start", "test_end", "valid_users", "test_users"):
        assert q["protocol"][k] == res["split"][k], k
    # the same family and winner, chosen on validation
    assert res["family"] == q["protocol"]["family"] == "basket"
    assert res["served"]["kind"] == "basket" and q["served"] == "basket-tower"
    cands = res["candidates"]
    assert cands["basket-tower"]["role"] == "served"
    best_valid = max(c["valid_ndcg@10"] for n, c in cands.items() if n != "popularity")
    assert cands["basket-tower"]["valid_ndcg@10"] == best_valid
    # the same test numbers (training is seeded; 2% where it is random)
    for name, c in cands.items():
        assert q["models"][name]["ndcg@10"] == pytest.approx(c["test_ndcg@10"], rel=0.02), name
    assert res["test"]["ndcg@10"] == pytest.approx(q["models"]["basket-tower"]["ndcg@10"], rel=0.02)
    # the table a user sees: served model, protocol, what it beats
    assert table.startswith("served model: basket-tower")
    assert "protocol: temporal" in table
    for name in ("basket-tower", "als", "ease", "popularity", "co-bought-last"):
        assert any(ln.startswith(name) for ln in table.splitlines()), name
    assert not table.lstrip().startswith("{")
    # the references lose to the served model
    assert cands["co-bought-last"]["test_ndcg@10"] < cands["basket-tower"]["test_ndcg@10"]
    assert cands["popularity"]["test_ndcg@10"] < cands["basket-tower"]["test_ndcg@10"]


def _served(run: Path, shop: Path, idx: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """`ecomrec index build` of the run, then a real gRPC server over it."""
    from ecomrec.cli import main
    from intake.loaders import load_dataset
    from serving.assemble import load_parts
    from tests.serving.conftest import Served, make_engine, open_reader

    capsys.readouterr()
    assert main(["index", "build", "--index", str(idx), "--model", str(run),
                 "--dataset", str(shop)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"{N_UNSEEN} catalogue products have no trained vector" in printed
    ds = load_dataset(str(shop))
    parts = load_parts(run, ds)
    reader = open_reader(idx)
    (man,) = [  # the item collection's version (not a text collection's: item_version)
        m
        for m in (json.loads(p.read_text()) for p in idx.rglob("manifest.json"))
        if "item_version" not in m["provenance"]
    ]
    assert man["provenance"]["left_out_no_vector"] == N_UNSEEN
    assert man["count"] == ds.n_items - N_UNSEEN
    return ds, parts, reader, Served(make_engine(parts, reader, exact_max_items=0))


def test_basket_run_serves_planted_items_over_grpc(
    shop: Path, basket_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The basket tower (the winner) goes through `index build` (the never-bought products
    left out and counted), a real gRPC server, Recommend (the planted next theme, the
    served tower's exact order) and the buy-again mode."""
    import torch

    from towers.basket import BasketServed
    from towers.inference import batch_tensors, served_kind
    from towers.sequences import batch_for_users

    run, _ = basket_run
    assert served_kind(run) == "basket"
    ds, parts, reader, s = _served(run, shop, tmp_path / "index", capsys)
    assert isinstance(parts.model.model, BasketServed)
    unseen = {ds.item_ids.to_external(i) for i in range(ds.n_items - N_UNSEEN + 1, ds.n_items + 1)}
    try:
        inter = parts.history.inter
        hits, checked = 0, 0
        for u in range(1, 41):
            h = parts.history.get(u)
            r = s.call("Recommend", s.pb.RecommendRequest(user_id=f"C{u}", k=4, skip_rerank=True))
            got = [i.item_id for i in r.items]
            assert len(got) == 4 and not set(got) & unseen
            assert r.model_version.endswith("-basket")
            # independent exact ranking by the served tower (index path, exact_max_items=0)
            m = parts.model.model
            with torch.no_grad():
                t = batch_tensors(batch_for_users(inter, np.array([u]), m.max_len))
                sc = (m.encode(t["items"], t["event_type"], t["gap"], t["lengths"])
                      @ m.item_table().T)[0].numpy()  # fmt: skip
            sc[0] = -np.inf
            sc[m.item_tower.known.numpy() == 0] = -np.inf
            sc[h.purchased()] = -np.inf
            want = [ds.item_ids.to_external(int(i)) for i in np.argsort(-sc)[:4]]
            assert set(got) == set(want), (u, got, want)
            # the lift keeps the tower's own score order: scale * (u . E_out[j] + b_j)
            from towers.basket import bag_from_batch

            bag = bag_from_batch(t["items"].numpy(), t["event_type"].numpy(), t["gap"].numpy())
            with torch.no_grad():
                raw = m.tower.scores(m.tower.bag_tensors(bag), repeat=False)[0].numpy()
            raw[np.isinf(sc)] = -np.inf
            assert np.argsort(-raw)[:4].tolist() == np.argsort(-sc)[:4].tolist()
            # the planted answer: the theme after the latest invoice's
            seq, ts = inter.seq(u), inter.seq_ts(u)
            last = int(seq[(ts == ts.max()) & (seq <= 48)][0])  # a theme product (not noise)
            nxt = {ds.item_ids.to_external(i) for i in next_theme(last)} - {
                ds.item_ids.to_external(int(i)) for i in h.purchased()
            }
            if nxt:
                checked += 1
                hits += bool(nxt & set(got))
        assert hits >= 0.8 * checked, (hits, checked)
        # buy-again: the customer's own products come back, marked
        r = s.call("Recommend", s.pb.RecommendRequest(user_id="C1", k=8, mode="buy-again"))
        own = {ds.item_ids.to_external(int(i)) for i in parts.history.get(1).purchased()}
        marked = [i.item_id for i in r.items if "BUY_AGAIN" in i.reasons]
        assert marked and set(marked) <= own
    finally:
        s.close()
        reader.close()


@pytest.mark.slow
def test_id_only_sequence_run_with_unseen_products_serves(
    shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shop without product text whose catalogue holds products never bought: the
    sequence tower (ids only) trains, the index build leaves those products out (counted)
    instead of stopping on a zero vector, and gRPC Recommend answers."""
    from ecomrec.cli import main

    run = tmp_path / "seq"
    argv = ["train", "--dataset", str(shop), "--out", str(run), "--family", "sequence"]
    assert main([*argv, "--config", "quick", "--set", "threads=1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["served"]["kind"] == "two-tower" and res["family"] == "sequence"
    ds, _parts, reader, s = _served(run, shop, tmp_path / "index", capsys)
    unseen = {ds.item_ids.to_external(i) for i in range(ds.n_items - N_UNSEEN + 1, ds.n_items + 1)}
    try:
        for u in (1, 2, 3):
            r = s.call("Recommend", s.pb.RecommendRequest(user_id=f"C{u}", k=5))
            assert len(r.items) == 5 and not {i.item_id for i in r.items} & unseen
    finally:
        s.close()
        reader.close()


@pytest.mark.slow
def test_refresh_refits_the_served_basket_tower(shop: Path, tmp_path: Path) -> None:
    """`ecomrec refresh` of a run serving the basket tower: the same recipe refit on the
    new data, shadow-evaluated against the live model, promoted as a basket run with a new
    index version (the never-bought products left out again)."""
    import polars as pl

    from ecomrec.cli import main
    from intake.dataset import Dataset
    from intake.loaders import load_dataset
    from lifecycle.refresh import RefreshConfig, refresh
    from towers.basket import BasketServed
    from towers.inference import load_run, served_kind

    full = load_dataset(str(shop))
    t1 = (int(full.events["ts"].max()) // 86400 - 60) * 86400  # type: ignore[operator]
    old = Dataset(
        full.name,
        full.events.filter(pl.col("ts") < t1),
        full.items,
        full.users,
        full.item_ids,
        full.report,
    )
    old.save(tmp_path / "old")
    run = tmp_path / "live"
    assert main(["train", "--dataset", str(tmp_path / "old"), "--out", str(run), *ARGS]) == 0
    assert served_kind(run) == "basket"
    cfg = RefreshConfig(
        eval_days=30, tolerance=1.0, churn_tolerance=1.0, export_onnx=False, min_eval_users=5
    )
    res = refresh(run, full, tmp_path / "index", config=cfg, since=t1)
    assert res.decision == "promoted", res.reason
    assert res.record is not None
    new = Path(res.record.run)
    assert served_kind(new) == "basket" and new != run
    tm = load_run(new)
    assert isinstance(tm.model, BasketServed)
    dec = json.loads((res.report_dir / "decision.json").read_text())  # type: ignore[operator]
    assert dec["refresh"].startswith("refit (basket")
    assert dec["ndcg@10"]["candidate"] > 0.3  # the planted next theme is learnt again
    man = json.loads((new / "manifest.json").read_text())
    assert man["lineage"]["parent_run"] == str(run.resolve())
    # the served record keeps the recipe (refit again by the next refresh)
    assert man["served"]["epochs"] >= 0 and man["served"]["params"]["model"]["dim"] == 32


def _events(rows: list[tuple[int, int, int]], kind: str = "purchase") -> Any:
    import polars as pl

    u, i, t = zip(*rows, strict=True)
    return pl.DataFrame(
        {
            "user_id": list(u),
            "item_id": list(i),
            "ts": list(t),
            "event_type": [kind] * len(rows),
            "order": list(range(len(rows))),
        }
    )


def test_split_rule_follows_the_data_shape() -> None:
    """Day-granular single events (reviews) -> leave-one-out; events with times of day ->
    temporal (event log); baskets -> temporal (transaction log)."""
    from types import SimpleNamespace

    from training.protocol import make_split, split_rule

    day = 86400
    reviews = [(u, 1 + (u + k) % 9, k * 3 * day) for u in range(1, 30) for k in range(5)]
    clicks = [(u, i, t + 3600 * 5 + 17) for u, i, t in reviews]
    baskets = [(u, 1 + (u + k + j) % 9, k * 3 * day + 3600) for u in range(1, 30)
               for k in range(5) for j in range(3)]  # fmt: skip
    for rows, want in ((reviews, "loo"), (clicks, "temporal"), (baskets, "temporal")):
        ds = SimpleNamespace(events=_events(rows), n_users=29, n_items=9)
        kind, why = split_rule(ds)
        assert kind == want, why
    assert "transaction log" in split_rule(SimpleNamespace(events=_events(baskets)))[1]
    # a short log caps the windows at a sixth of its span (here 2 days of 12)
    ds = SimpleNamespace(events=_events(clicks), n_users=29, n_items=9)
    sp = make_split(ds, "auto")
    assert sp.protocol["split"] == "temporal" and "last 2 days" in sp.protocol["cutoff_from"]
    assert make_split(ds, "loo-file").protocol["split"] == "leave-one-out"


def test_co_bought_last_ranks_the_latest_baskets_partners() -> None:
    """The reference rule: items bought together with the user's latest basket first."""
    from towers.sequences import Interactions
    from training.protocol import CoBoughtLast

    day = 86400
    # 1 and 2 are always bought together, 3 with 4; 5 is popular alone
    seqs = [[1, 2], [3, 4], [1, 2], [5], [5], [5]]
    ts = [[0, 0], [0, 0], [0, 0], [0], [day], [2 * day]]
    m = CoBoughtLast()
    m.fit(Interactions.from_lists(seqs, 5, ts=ts))
    hist = Interactions.from_lists([[3, 1]], 5, ts=[[0, day]])  # latest basket: item 1
    s = m.score(np.array([1]), hist)[0]
    s[[0, 1, 3]] = -np.inf  # padding and own items
    assert int(np.argmax(s)) == 2
