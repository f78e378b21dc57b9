"""Basket completion quality: hide one item of a real invoice, rank it from the rest.

    python benchmarks/complements.py --dataset online-retail --out results/complements_or.json

Protocol (full catalogue, nothing sampled):

* The last ``--test-days`` (30) days of the log are the test month, the ``--valid-days``
  (30) before it the validation month (``training.splits.default_test_start``).
* A case is one invoice of the window (a customer's purchases at one timestamp) with at
  least two distinct items: one item, drawn with ``--seed``, is hidden; the rest is the
  basket.  Items unknown before the window cannot be ranked by anything fitted on the
  past and are counted as misses (they stay in the case list).  Cases whose hidden item is
  a near-duplicate of a basket item (same :func:`towers.complements.title_stem`: the same
  product in another colour/size) are dropped and counted: no method may recommend those.
* Every method ranks every catalogue item except the basket and its near-duplicates;
  ties are broken by popularity, then pessimistically (the hidden item last among equals).
* The customer's history (for the personalised variant) is their purchases strictly
  before the invoice (what the shop's history store holds at that moment; the models
  themselves are fitted before the window).
* Hyper-parameters of every method are chosen on the validation month with models fitted
  on the data before it; the chosen ones are refitted on everything before the test month
  and read on test once.

Methods: ``popularity``; ``assoc-rules`` (max over basket items of the rule confidence or
lift, minimum support chosen); ``item-knn`` (cosine of invoice co-occurrence, neighbours
and shrinkage chosen); ``ease`` (EASE item-item over invoices, l2 chosen);
``ours`` (:class:`towers.complements.ComplementModel`, the model ``CompleteBasket`` serves,
without a customer) and ``ours-personal`` (the same with the customer's history).

Writes JSON ``{"dataset", "protocol", "models": {NAME: {"ndcg@10", "recall@10", ...,
"valid": {...}, "params": {...}}}}`` and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl
import scipy.sparse as sp

from intake.loaders import load_dataset
from towers.complements import ComplementConfig, ComplementModel, invoices, title_stem
from towers.ease import ease_weights
from towers.sequences import Interactions
from training.splits import default_test_start

log = logging.getLogger("benchmarks.complements")
_PERSONAL = ("personal_weight", "own_weight")
METRICS = ("ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr@10")


Scorer = Callable[["Case"], np.ndarray]
Thunk = Callable[[], Scorer]


@dataclass(frozen=True)
class Case:
    user: int
    basket: np.ndarray  # (B,) int64
    hidden: int
    ts: int  # the invoice's time


def make_cases(
    events: pl.DataFrame, start: int, end: int, stems: list[str | None], seed: int, cap: int
) -> tuple[list[Case], int]:
    """Invoices in ``[start, end)`` with >= 2 items, one hidden; (cases, dropped)."""
    inv = invoices(events.filter((pl.col("ts") >= start) & (pl.col("ts") < end)))
    groups = inv.group_by("basket", maintain_order=True).agg(
        pl.col("user_id").first(), pl.col("ts").first(), pl.col("item_id")
    )
    rng = np.random.default_rng(seed)
    cases, dropped = [], 0
    for user, ts, items in zip(
        groups["user_id"].to_list(),
        groups["ts"].to_list(),
        groups["item_id"].to_list(),
        strict=True,
    ):
        items = np.unique(np.asarray(items, np.int64))
        if len(items) < 2:
            continue
        h = int(rng.integers(len(items)))
        hidden, basket = int(items[h]), np.delete(items, h)
        hs = stems[hidden]
        if hs is not None and any(stems[int(i)] == hs for i in basket):
            dropped += 1
            continue
        cases.append(Case(int(user), basket, hidden, int(ts)))
    if len(cases) > cap:
        keep = np.sort(rng.choice(len(cases), cap, replace=False))
        cases = [cases[i] for i in keep]
    return cases, dropped


def evaluate(
    cases: list[Case],
    score: Callable[[Case], np.ndarray],
    exclude: Callable[[Case], np.ndarray],
    tiebreak: np.ndarray,
) -> dict[str, float]:
    """Full-ranking metrics of the hidden item (pessimistic ties after ``tiebreak``)."""
    ranks = np.empty(len(cases), np.int64)
    for n, c in enumerate(cases):
        s = np.nan_to_num(np.asarray(score(c), np.float64), neginf=-np.inf) + 1e-9 * tiebreak
        s[exclude(c)] = -np.inf
        s[0] = -np.inf
        ranks[n] = int((s >= s[c.hidden]).sum()) - 1 if np.isfinite(s[c.hidden]) else 10**9
    out = {}
    for k in (10, 20):
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr@10"] = float(np.where(ranks < 10, 1.0 / (ranks + 1.0), 0.0).mean())
    out["cases"] = len(cases)
    return out


@dataclass
class Fitted:
    """Statistics of one fit window shared by the baselines."""

    x: sp.csr_matrix  # (baskets, N+1) binary
    co: np.ndarray  # (N+1, N+1) co-occurrence, zero diagonal
    count: np.ndarray  # (N+1,) invoices per item


def fit_stats(events: pl.DataFrame, n_items: int) -> Fitted:
    inv = invoices(events)
    b = inv["basket"].to_numpy()
    it = inv["item_id"].to_numpy().astype(np.int64)
    x = sp.csr_matrix((np.ones(len(b), np.float32), (b, it)), shape=(int(b.max()) + 1, n_items + 1))
    x.sum_duplicates()
    x.data[:] = 1.0
    co = (x.T @ x).toarray()
    count = np.diag(co).astype(np.float64).copy()
    np.fill_diagonal(co, 0.0)
    return Fitted(x, co, count)


def run(args: argparse.Namespace) -> dict:
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    n_items = len(ds.item_ids)
    inter = Interactions.from_events(ds.events, len(ds.users), n_items)
    t_test = default_test_start(inter, test_days=args.test_days)
    t_valid = t_test - args.valid_days * 86400
    t_end = int(ds.events["ts"].max()) + 1
    stems: list[str | None] = [None] * (n_items + 1)
    for i, t in zip(ds.items["item_id"].to_list(), ds.items["title"].to_list(), strict=True):
        stems[int(i)] = title_stem(t)
    ev = ds.events
    buys = invoices(ev).sort("user_id", "ts")
    b_user = buys["user_id"].to_numpy()
    b_ts = buys["ts"].to_numpy()
    b_item = buys["item_id"].to_numpy().astype(np.int64)
    starts = np.searchsorted(b_user, np.arange(len(ds.users) + 2))

    def history_before(user: int, ts: int) -> np.ndarray:
        """(H,) distinct items ``user`` bought strictly before ``ts``."""
        a, b = starts[user], starts[user + 1]
        return np.unique(b_item[a:b][b_ts[a:b] < ts])

    phases = {
        "valid": (ev.filter(pl.col("ts") < t_valid), t_valid, t_test),
        "test": (ev.filter(pl.col("ts") < t_test), t_test, t_end),
    }
    cases = {}
    dropped = {}
    for ph, (_, a, b) in phases.items():
        cases[ph], dropped[ph] = make_cases(ev, a, b, stems, args.seed, args.max_cases)
        log.info(
            "%s: %d cases (%d near-duplicate hidden items dropped)", ph, len(cases[ph]), dropped[ph]
        )

    # candidate configurations of every method; each returns a case scorer for a fit
    def grids(f: Fitted, past: pl.DataFrame, now: int) -> dict[str, list[tuple[dict, Thunk]]]:
        """Every method's candidate configurations; each thunk builds its case scorer on
        demand (heavy fits shared through ``memo``), so only what is evaluated is built."""
        memo: dict[Any, Any] = {}

        def once(key: Any, build: Callable[[], Any]) -> Any:
            if key not in memo:
                memo[key] = build()
            return memo[key]

        def conf() -> np.ndarray:  # (N+1, N+1) conf(i -> j)
            return once(
                "conf", lambda: (f.co / np.maximum(f.count[:, None], 1.0)).astype(np.float32)
            )

        def lift() -> np.ndarray:
            return once(
                "lift",
                lambda: (conf() / np.maximum(f.count[None, :] / f.x.shape[0], 1e-12)).astype(
                    np.float32
                ),
            )

        def assoc(measure: str, support: int) -> Scorer:
            m = (conf() if measure == "confidence" else lift()) * (f.co >= support)
            return lambda c: m[c.basket].max(0)

        def knn(k: int, shrink: float) -> Scorer:
            sim = f.co / (np.sqrt(np.outer(f.count, f.count)) + shrink + 1e-12)
            if k < n_items:
                thr = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]
                sim = np.where(sim >= thr, sim, 0.0)
            return lambda c: sim[c.basket].sum(0)

        def ease(l2: float) -> Scorer:
            w = ease_weights(f.x, l2)
            return lambda c: w[c.basket].sum(0)

        def ours(cfg: ComplementConfig, personal: bool) -> Scorer:
            model = once(
                (cfg.ease_l2, cfg.half_life_days),
                lambda: ComplementModel.fit(past, ds.items, n_items, cfg, now=now),
            )
            m = dataclasses.replace(model, cfg=cfg)
            if personal:
                return lambda c: m.score(c.basket, history_before(c.user, c.ts))
            return lambda c: m.score(c.basket)

        out: dict[str, list[tuple[dict, Thunk]]] = {"popularity": [({}, lambda: lambda c: f.count)]}
        out["assoc-rules"] = [
            ({"measure": ms, "min_support": sup}, lambda ms=ms, sup=sup: assoc(ms, sup))
            for sup in (1, 2, 5)
            for ms in ("confidence", "lift")
        ]
        out["item-knn"] = [
            ({"neighbours": k, "shrink": sh}, lambda k=k, sh=sh: knn(k, sh))
            for sh in (0.0, 10.0)
            for k in (20, 100, n_items)
        ]
        out["ease"] = [({"l2": l2}, lambda l2=l2: ease(l2)) for l2 in (10.0, 25.0, 50.0, 200.0)]
        out["ours"], out["ours-personal"] = [], []
        for l2 in args.ours_l2:
            for hl in args.ours_half_life:
                for cw in (0.0, 0.1, 0.3):
                    cfg = ComplementConfig(
                        ease_l2=l2,
                        half_life_days=hl,
                        conf_weight=cw,
                        personal_weight=0.0,
                        own_weight=0.0,
                    )
                    out["ours"].append((dataclasses.asdict(cfg), lambda cfg=cfg: ours(cfg, False)))
                    for pw in (0.1, 0.3):
                        for ow in (0.05, 0.2, 0.5, 1.0):
                            pcfg = dataclasses.replace(cfg, personal_weight=pw, own_weight=ow)
                            out["ours-personal"].append(
                                (dataclasses.asdict(pcfg), lambda pcfg=pcfg: ours(pcfg, True))
                            )
        return out

    # every method excludes the same items: the basket and its near-duplicates
    ref_model = ComplementModel(
        ComplementConfig(),
        sp.csr_matrix((n_items + 1, n_items + 1)),
        sp.csr_matrix((n_items + 1, n_items + 1)),
        np.zeros(n_items + 1),
        tuple(stems),
    )
    excl = {
        ph: {id(c): ref_model.near_duplicates(c.basket) for c in cs} for ph, cs in cases.items()
    }
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    past, a, _ = phases["valid"]
    fv = fit_stats(past, n_items)
    chosen: dict[str, tuple[dict, dict]] = {}
    for name, cands in grids(fv, past, a).items():
        if name == "ours-personal":  # personal weights on top of the chosen `ours` only
            base = {k: v for k, v in chosen["ours"][0].items() if k not in _PERSONAL}
            cands = [
                c for c in cands if {k: v for k, v in c[0].items() if k not in _PERSONAL} == base
            ]
        best: tuple[dict, dict] | None = None
        for params, thunk in cands:
            m = evaluate(cases["valid"], thunk(), lambda c: excl["valid"][id(c)], fv.count)
            log.info("valid %-14s %s ndcg@10 %.4f", name, params, m["ndcg@10"])
            if best is None or m["ndcg@10"] > best[1]["ndcg@10"]:
                best = (params, m)
        assert best is not None
        chosen[name] = best
    valid_s = time.perf_counter() - t0
    past, a, _ = phases["test"]
    ft = fit_stats(past, n_items)
    test_grid = grids(ft, past, a)
    for name, (params, _) in chosen.items():
        thunk = next(t for p, t in test_grid[name] if p == params)
        m = evaluate(cases["test"], thunk(), lambda c: excl["test"][id(c)], ft.count)
        results[name] = {**{k: m[k] for k in METRICS}, "valid": chosen[name][1], "params": params}
        log.info("test  %-14s ndcg@10 %.4f recall@10 %.4f", name, m["ndcg@10"], m["recall@10"])
    baselines = [n for n in results if not n.startswith("ours")]
    best_base = max(baselines, key=lambda n: results[n]["ndcg@10"])
    return {
        "dataset": {"name": ds.name, "items": n_items, "users": len(ds.users)},
        "protocol": {
            "task": "basket completion: one hidden item of a real invoice, full catalogue",
            "valid_start": _day(t_valid),
            "test_start": _day(t_test),
            "cases": {k: len(v) for k, v in cases.items()},
            "near_duplicate_cases_dropped": dropped,
            "max_cases": args.max_cases,
            "seed": args.seed,
            "selection": "every method's hyper-parameters on validation ndcg@10, refit before test",
            "exclusions": "basket items and their near-duplicates (towers.complements.title_stem)",
        },
        "best_baseline": best_base,
        "models": results,
        "valid_seconds": round(valid_s, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _day(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def markdown_table(result: dict) -> str:
    p = result["protocol"]
    lines = [
        f"Basket completion on {result['dataset']['name']} ({result['dataset']['items']} items): "
        f"validation from {p['valid_start']}, test from {p['test_start']}, "
        f"{p['cases']['test']} test invoices (near-duplicate hidden items dropped: "
        f"{p['near_duplicate_cases_dropped']['test']}).",
        "",
        "| model | " + " | ".join(METRICS) + " | valid ndcg@10 | chosen |",
        "|---|" + "---:|" * (len(METRICS) + 1) + "---|",
    ]
    for name, m in result["models"].items():
        params = ", ".join(
            f"{k}={v}" for k, v in m["params"].items() if k not in ("neighbours",) or name != "ours"
        )
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m[k]:.4f}" for k in METRICS)
            + f" | {m['valid']['ndcg@10']:.4f} | {params} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="online-retail", help="dataset name or path")
    ap.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    ap.add_argument("--test-days", type=int, default=30, help="days in the test window")
    ap.add_argument("--valid-days", type=int, default=30, help="days in the validation window")
    ap.add_argument(
        "--max-cases", type=int, default=3000, help="invoices per window (seeded sample)"
    )
    ap.add_argument("--seed", type=int, default=0, help="which item is hidden; the case sample")
    ap.add_argument(
        "--ours-l2", type=float, nargs="+", default=[10.0, 25.0], help="EASE l2 grid of ours"
    )
    ap.add_argument(
        "--ours-half-life",
        type=float,
        nargs="+",
        default=[0.0, 180.0],
        help="recency half-life grid of ours (days, 0 = none)",
    )
    ap.add_argument("--out", default=None, help="JSON output path (markdown table beside it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    table = markdown_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
