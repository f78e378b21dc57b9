"""Baselines served as towers (ALS fold-in, EASE low rank), the validation comparison in
``ecomrec train``, id-only catalogues, and a leakage guard on the test inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from intake.synthetic import SyntheticConfig, make_shop
from towers.factor import FactorTower, factor_tower_from_baseline
from towers.inference import batch_tensors, load_run, served_kind
from towers.sequences import Interactions, batch_for_users
from training.baselines import ALS, EASE, ALSConfig, EASEConfig
from training.fallback import FallbackConfig, compare_and_select
from training.splits import leave_one_out
from training.two_tower import TwoTowerRetriever, hide_item_content

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "ecomrec" / "configs" / "towers" / "quick.toml"


@pytest.fixture(scope="module")
def shop() -> Any:
    return make_shop(SyntheticConfig(n_users=300, n_items=120, seed=3))


@pytest.fixture(scope="module")
def inter(shop: Any) -> Interactions:
    return Interactions.from_events(shop.events, len(shop.users), len(shop.item_ids))


def _scores(fm: FactorTower, inter: Interactions, users: np.ndarray) -> np.ndarray:
    t = batch_tensors(batch_for_users(inter, users, fm.cfg.max_len))
    with torch.no_grad():
        u = fm.encode(t["items"], t["event_type"], t["gap"], t["lengths"])
        return (u @ fm.item_vectors().T).numpy()  # (B, N+1) cosine


def test_als_fold_in_equals_implicit_normal_equations(inter: Interactions) -> None:
    """The served ALS user vector is implicit's own least-squares user factor (parity)."""
    from implicit.cpu.als import user_factor

    als = ALS(ALSConfig(factors=16, regularization=0.5, alpha=5.0, iterations=5))
    als.fit(inter)
    fm = factor_tower_from_baseline(als, max_len=200)
    y = als.item_factors.astype(np.float64)
    cui = (inter.to_csr(binary=False) * 5.0).tocsr()
    users = np.arange(1, 41)
    t = batch_tensors(batch_for_users(inter, users, 200))
    got = fm.user_factors(t["items"], t["lengths"]).numpy()
    want = np.stack([user_factor(y, y.T @ y, cui, int(u), 0.5, 16) for u in users])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_lifted_cosine_ranks_like_the_dot_product(inter: Interactions) -> None:
    """Index order (cosine of the lifted vectors) == the baseline's own dot-product order;
    at full rank the EASE tower reproduces EASE's scores (up to a per-user scale)."""
    ease = EASE(EASEConfig(l2=50.0))
    ease.fit(inter)
    fm = factor_tower_from_baseline(ease, ease_rank=10_000)  # >= N: exact SVD
    users = np.arange(1, 61)
    got = _scores(fm, inter, users)[:, 1:]
    want = ease.score(users, inter)[:, 1:]
    for g, w in zip(got, want, strict=True):
        scale = np.dot(g, w) / np.dot(w, w)
        np.testing.assert_allclose(g, scale * w, atol=1e-5)
        assert list(np.argsort(-g)[:10]) == list(np.argsort(-w)[:10])


def test_lean_ease_equals_the_baseline(inter: Interactions) -> None:
    """The float32 in-place fit (towers.ease, used by the EASE baseline) equals the float64
    closed form."""
    x = inter.to_csr(binary=True).toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + 80.0 * np.eye(x.shape[1]))
    want = -p / np.diag(p)[None, :]
    np.fill_diagonal(want, 0.0)
    want[0, :] = want[:, 0] = 0.0
    ease = EASE(EASEConfig(l2=80.0))
    ease.fit(inter)
    np.testing.assert_allclose(ease.weights, want, atol=2e-5)


def test_compare_keeps_the_tower_when_it_wins(
    shop: Any, inter: Interactions, tmp_path: Path
) -> None:
    """The tower's planted validation score just above / just below the best baseline's:
    the choice flips with it (a rule that always kept the tower, or always a baseline,
    fails one side)."""
    split = leave_one_out(inter)
    cfg = FallbackConfig(als_alphas=(10.0,), ease_l2=(100.0,), ease_rank=32)

    def compare(tower_ndcg: float, name: str) -> tuple[dict[str, Any], Any]:
        return compare_and_select(
            cfg, split, {"ndcg@10": tower_ndcg}, shop.item_ids.external_ids, tmp_path / name, "v"
        )

    rec, _ = compare(0.0, "probe")
    assert set(rec["candidates"]) == {"two-tower", "als", "ease"}
    base = {k: c["valid"]["ndcg@10"] for k, c in rec["candidates"].items() if k != "two-tower"}
    assert all(0 < v < 1.0 for v in base.values()) and base["als"] != base["ease"]
    best = max(base, key=lambda k: base[k])
    rec, served = compare(base[best] + 1e-4, "above")
    assert served is None and rec["served"]["kind"] == "two-tower"
    assert not (tmp_path / "above" / "served").exists()
    rec, served = compare(base[best] - 1e-4, "below")
    assert served is not None and rec["served"]["kind"] == best
    assert (tmp_path / "below" / rec["served"]["path"]).exists()


def test_id_only_catalogue_is_detected_and_equals_a_missing_items_file(tmp_path: Path) -> None:
    """``--no-text`` and a dataset folder without ``_items.csv`` train the same id-only model."""
    from intake.loaders import load_dataset

    rng = np.random.default_rng(0)
    lines, rows = [], []
    for u in range(1, 81):
        seq = rng.integers(1, 31, int(rng.integers(4, 9)))
        lines.append(" ".join(map(str, [u, *seq.tolist()])))
    for i in range(1, 31):
        rows.append(
            {"item_id": i, "title": f"product {i}", "brand": f"b{i % 3}", "categories": "x"}
        )
    full, bare = tmp_path / "full", tmp_path / "bare"
    for d in (full, bare):
        d.mkdir()
        (d / "Shop.txt").write_text("\n".join(lines) + "\n")
    pl.DataFrame(rows).write_csv(full / "Shop_items.csv")
    a = hide_item_content(load_dataset(str(full / "Shop")))
    b = load_dataset(str(bare / "Shop"))
    assert "title" in load_dataset(str(full / "Shop")).items.columns
    vecs = []
    for ds, name in ((a, "a"), (b, "b")):
        i2 = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
        split = leave_one_out(i2)
        r = TwoTowerRetriever.for_dataset(
            ds,
            QUICK,
            tmp_path / name,
            {"pretrain": {"epochs": 1}, "no_content": {"epochs": 2}, "threads": 1},
        )
        r.fit(split.train, split.valid, resume=False)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["item_features"] == ["id"]
        assert r.cfg.pretrain.epochs == 2  # the [no_content] settings applied
        assert len(manifest["stages"]["pretrain"]["history"]) == 2
        vecs.append(load_run(tmp_path / name).item_vectors())
    np.testing.assert_array_equal(vecs[0], vecs[1])


def test_test_event_never_reaches_the_model(shop: Any, tmp_path: Path) -> None:
    """Perturb every user's test item and time: the tower's inputs at test time (and its
    trained weights) are byte-identical, also when training takes in the validation items
    of users outside the validation sample."""
    from training.evaluation import evaluate

    def run(events: pl.DataFrame, out: Path) -> tuple[list[bytes], bytes]:
        ds = type(shop)(**{**vars(shop), "events": events})
        i2 = Interactions.from_events(ds.events, len(ds.users), len(ds.item_ids))
        split = leave_one_out(i2)
        r = TwoTowerRetriever.for_dataset(
            ds,
            QUICK,
            out,
            {
                "item": {"use_text": False},
                "pretrain": {"epochs": 1},
                "threads": 1,
                # validation on a sample: the others' validation items are trained on
                "valid_users": 0.3,
                "valid_users_min": 10,
            },
        )
        vsplit = r.validation_split(split)
        assert 0 < len(vsplit.valid) < len(split.valid)
        r.fit(vsplit.train, vsplit.valid, resume=False)
        assert r.model is not None
        seen: list[bytes] = []

        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            seen.extend(a.detach().numpy().tobytes() for a in args if torch.is_tensor(a))

        h = r.model.user_tower.register_forward_pre_hook(hook)
        evaluate(r.score, split.test, split.train_valid, ks=(10,))
        h.remove()
        weights = b"".join(v.numpy().tobytes() for v in r.model.state_dict().values())
        return seen, weights

    ev = shop.events.with_row_index("_row")
    last = ev.sort(["user_id", "ts", "_row"]).group_by("user_id", maintain_order=True).last()
    rows = last["_row"].to_numpy()
    rng = np.random.default_rng(7)
    new_items = rng.integers(1, len(shop.item_ids) + 1, len(rows)).astype(np.int32)
    items = ev["item_id"].to_numpy().copy()
    ts = ev["ts"].to_numpy().copy()
    items[rows] = new_items
    ts[rows] += 86_400 * 30
    pert = ev.drop("_row").with_columns(
        pl.Series("item_id", items, dtype=ev["item_id"].dtype),
        pl.Series("ts", ts, dtype=ev["ts"].dtype),
    )
    assert (pert["item_id"].to_numpy() != shop.events["item_id"].to_numpy()).sum() > len(rows) // 2
    a_in, a_w = run(shop.events, tmp_path / "a")
    b_in, b_w = run(pert, tmp_path / "b")
    assert a_w == b_w
    assert len(a_in) > 0 and a_in == b_in


@pytest.mark.slow
def test_baseline_fallback_end_to_end_grpc(shop: Any, tmp_path: Path) -> None:
    """``ecomrec train`` on a shop where a baseline beats the (deliberately starved) tower:
    the run serves the baseline; index build + gRPC Recommend return its exact ranking."""
    from tests.serving.conftest import Served, build_index, make_engine, open_reader
    from training.cli import main

    ds_dir = tmp_path / "shop"
    shop.save(ds_dir)
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--dataset",
            str(ds_dir),
            "--config",
            str(QUICK),
            "--out",
            str(run),
            "--set",
            "pretrain.epochs=1",
            "--set",
            "pretrain.lr=1e-6",
            "--set",
            "threads=1",
            "--set",
            "fallback.enabled=true",
            "--set",
            "fallback.als_alphas=[10.0]",
            "--set",
            "fallback.ease_l2=[100.0]",
            "--set",
            "fallback.ease_rank=64",
        ]
    )
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    kind = res["served"]["kind"]
    assert kind in ("als", "ease") and served_kind(run) == kind
    comp = res["candidates"]  # training.protocol.select_model's table
    tower = comp["sequence-tower"]
    assert comp[kind]["role"] == "served" and tower["role"] == "candidate"
    assert comp[kind]["valid_ndcg@10"] > tower["valid_ndcg@10"]
    assert comp[kind]["test_ndcg@10"] > tower["test_ndcg@10"]
    assert res["test"]["ndcg@10"] == comp[kind]["test_ndcg@10"]  # the served model's test

    from ecomrec.errors import ModelError
    from intake.loaders import load_dataset
    from serving.assemble import load_parts
    from towers.export import export_onnx

    with pytest.raises(ModelError, match="baseline"):
        export_onnx(run, tmp_path / "onnx")

    ds = load_dataset(str(ds_dir))
    parts = load_parts(run, ds)
    assert isinstance(parts.model.model, FactorTower)
    idx = tmp_path / "index"
    build_index(idx, parts)
    reader = open_reader(idx)
    s = Served(make_engine(parts, reader))
    try:
        users = parts.history.users()[:5]
        for u in users.tolist():
            h = parts.history.get(u)
            ext = ds.users.to_external(u)
            r = s.call("Recommend", s.pb.RecommendRequest(user_id=ext, k=5, skip_rerank=True))
            # independent exact ranking: the baseline's dot products over the full history
            fm = parts.model.model
            t = batch_tensors(batch_for_users(parts.history.inter, np.array([u]), 10_000))
            uf = fm.user_factors(t["items"], t["lengths"])[0].numpy()
            sc = fm.items_f.numpy() @ uf
            sc[0] = -np.inf
            sc[h.purchased()] = -np.inf
            want = [ds.item_ids.to_external(int(i)) for i in np.argsort(-sc)[:5]]
            assert [i.item_id for i in r.items] == want
            assert r.model_version.endswith(kind)
    finally:
        s.close()
        reader.close()
