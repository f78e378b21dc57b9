"""Offline effect of segment-aware re-ranking: NDCG@10, category diversity and coverage,
with and without re-ranking, overall and per RFM segment.

Leave-one-out split; the tower (quick config unless ``--model``) is trained on the
training sequences; each test user's history is ``train_valid``; candidates are the
top ``--candidates`` items by exact cosine (history excluded, as the service does);
re-ranking uses ``ecomrec/configs/serving/rerank.toml`` with the user's RFM segment and
popularity within that segment.

    python benchmarks/rerank_quality.py --dataset beauty --out results/rerank_beauty.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ndcg(rank: int | None) -> float:
    return 0.0 if rank is None else 1.0 / float(np.log2(rank + 2))


def _diversity(keys: list[str]) -> float:
    """Intra-list diversity: share of item pairs in different categories."""
    n = len(keys)
    if n < 2:
        return 0.0
    same = sum(1 for i in range(n) for j in range(i + 1, n) if keys[i] == keys[j])
    return 1.0 - same / (n * (n - 1) / 2)


def title_categories(items: Any) -> Any:
    """A stand-in category for catalogues without one (Online Retail): the title's last word."""
    import polars as pl

    return items.with_columns(
        pl.col("title")
        .fill_null("")
        .str.to_lowercase()
        .str.extract(r"([a-z]+)\W*$", 1)
        .alias("category")
    )


def evaluate(
    ds: Any, run_dir: Path, n_users: int, n_cand: int, k: int, seed: int, policies_path: Path
) -> dict[str, Any]:
    from segments.rfm import rfm_table
    from serving import rerank as rr
    from serving.catalog import ItemCatalog, SegmentPopularity
    from serving.history import History, to_batch
    from towers.inference import load_run
    from towers.sequences import Interactions
    from training.splits import leave_one_out

    tm = load_run(run_dir)
    tm.model.eval()
    enc = tm.user_encoder()
    n_items = len(ds.item_ids)
    inter = Interactions.from_events(ds.events, len(ds.users), n_items)
    split = leave_one_out(inter)
    hist = split.train_valid
    items = ds.items
    if items["category"].null_count() == items.height:
        items = title_categories(items)
    catalog = ItemCatalog.from_items(items, n_items)
    policies = rr.RerankPolicies.load(policies_path)
    # RFM segments at the test cutoff (events before each user's test item are what we know;
    # a global cutoff at the last training event keeps it simple and leak-free for RFM)
    test_users = np.asarray(split.test.users)
    test_items = np.asarray(split.test.items)[
        np.asarray(split.test.indptr)[:-1]
    ]  # first held-out item
    cutoff = int(hist.ts.max()) + 1
    ev = ds.events
    table, _ = rfm_table(ev.filter(ev["ts"] < cutoff), cutoff, ds.items)
    seg_of = dict(zip(table["user_id"].to_list(), table["rfm_segment"].to_list(), strict=True))
    pop = SegmentPopularity.from_histories(
        hist.user_of_row(), hist.items.astype(np.int64), n_items, seg_of, hist.event_type
    )
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_users), size=min(n_users, len(test_users)), replace=False)
    vn = tm.item_vectors()  # (N+1, D)
    rows: dict[str, dict[str, list[float]]] = {}
    recs: dict[str, set[int]] = {"raw": set(), "reranked": set()}
    for s in range(0, len(pick), 256):
        idx = pick[s : s + 256]
        hs = [
            History(
                hist.seq(int(u)).astype(np.int64),
                hist.seq_ts(int(u)),
                hist.seq_event_type(int(u)).astype(np.int64),
            )
            for u in test_users[idx]
        ]
        u_vec = enc.encode(to_batch(hs, tm.max_len))  # (b, D)
        scores = u_vec @ vn.T  # (b, N+1)
        scores[:, 0] = -np.inf
        for row, j in enumerate(idx):
            u = int(test_users[j])
            target = int(test_items[j])
            h = hs[row]
            sc = scores[row]
            sc[np.unique(h.items)] = -np.inf
            cand = np.argpartition(-sc, n_cand)[:n_cand]
            cand = cand[np.argsort(-sc[cand], kind="stable")]
            seg = seg_of.get(u)
            _, policy = policies.for_segments(seg)
            c = rr.Candidates(
                item_ids=cand.astype(np.int64),
                relevance=sc[cand].astype(np.float32),
                categories=[catalog.categories[i] for i in cand],
                price=catalog.price[cand],
                popularity=pop.scores(seg)[cand],
                external_ids=[catalog.external_ids[i] for i in cand],
            )
            cats = frozenset(
                rr.category_key(catalog.categories[int(i)], policy.category_depth)
                for i in np.unique(h.items)
            ) - {""}
            prices = catalog.price[h.items]
            prices = prices[np.isfinite(prices) & (prices > 0)]
            ctx = rr.UserContext(cats, float(np.median(np.log1p(prices))) if len(prices) else None)
            for name, ranked in (
                ("raw", rr.relevance_only(c, k)),
                ("reranked", rr.rerank(c, ctx, policy, k)),
            ):
                ids = [r.item_id for r in ranked]
                rank = ids.index(target) if target in ids else None
                keys = [rr.category_key(catalog.categories[i], policy.category_depth) for i in ids]
                for group in ("all", seg or "unknown"):
                    d = rows.setdefault(group, {})
                    d.setdefault(f"{name}_ndcg", []).append(_ndcg(rank))
                    d.setdefault(f"{name}_hit", []).append(0.0 if rank is None else 1.0)
                    d.setdefault(f"{name}_diversity", []).append(_diversity(keys))
                recs[name].update(ids)
    out: dict[str, Any] = {"per_segment": {}}
    for group, d in sorted(rows.items(), key=lambda kv: (kv[0] != "all", kv[0])):
        m = {key: float(np.mean(v)) for key, v in d.items()}
        m["users"] = len(d["raw_ndcg"])
        m["ndcg_change_pct"] = (
            100.0 * (m["reranked_ndcg"] / m["raw_ndcg"] - 1.0) if m["raw_ndcg"] > 0 else 0.0
        )
        out["per_segment"][group] = m
    out["coverage"] = {name: len(v) / n_items for name, v in recs.items()}
    out["model_version"] = tm.model_version
    return out


def write_table(res: dict[str, Any], path: Path) -> None:
    lines = [
        f"Re-ranking on {res['dataset']} ({res['users']} test users, top-{res['k']} from {res['candidates']} candidates; "
        f"coverage raw {res['coverage']['raw']:.3f} -> re-ranked {res['coverage']['reranked']:.3f})",
        "",
        "| segment | users | NDCG@10 raw | NDCG@10 re-ranked | change | diversity raw | diversity re-ranked |",
        "|---|---|---|---|---|---|---|",
    ]
    for g, m in res["per_segment"].items():
        lines.append(
            f"| {g} | {m['users']} | {m['raw_ndcg']:.4f} | {m['reranked_ndcg']:.4f} | {m['ndcg_change_pct']:+.1f}% | "
            f"{m['raw_diversity']:.3f} | {m['reranked_diversity']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default=None, help="run trained on the leave-one-out training split")
    ap.add_argument("--work", default="artifacts/demo")
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument(
        "--policies", default=str(ROOT / "ecomrec" / "configs" / "serving" / "rerank.toml")
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch

    torch.set_num_threads(1)
    from ecomrec.demo import train_quick
    from intake.loaders import load_dataset

    ds = load_dataset(a.dataset, a.data_dir)
    run_dir = (
        Path(a.model)
        if a.model
        else train_quick(a.dataset, Path(a.work) / f"run-{ds.name}", data_dir=a.data_dir)
    )
    res = evaluate(ds, run_dir, a.users, a.candidates, a.k, a.seed, Path(a.policies))
    res.update({"dataset": a.dataset, "users": a.users, "candidates": a.candidates, "k": a.k})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    write_table(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
