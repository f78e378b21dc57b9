"""Two-tower ablations, cold start and the Online Retail comparison, on one split per run.

    # ablation table (baselines + two-tower variants) on Beauty, leave-one-out, file ties
    python benchmarks/ablation.py --dataset beauty --out results/ablation_beauty.json
    # a subset of variants, each capped at 4 epochs per stage (cheaper, same split)
    python benchmarks/ablation.py --dataset beauty --variants pretrain,no-content --max-epochs 4 \\
        --out results/ablation_small.json
    # cold start: 10% of the items never seen in training; Recall@10 on their test interactions
    python benchmarks/ablation.py --experiment coldstart --dataset beauty --out results/cold_beauty.json
    # Online Retail, temporal split: two-tower vs ALS vs popularity
    python benchmarks/ablation.py --experiment retail --out results/retail.json

Every two-tower variant is the default config plus the overrides listed in VARIANTS;
the model and epoch are chosen on validation NDCG@10, the test is read once. Writes
JSON and a markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from intake.loaders import load_dataset
from towers.sequences import Interactions
from training.evaluation import evaluate
from training.splits import Split, Targets, leave_one_out, temporal_split

log = logging.getLogger("ablation")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "ecomrec" / "configs" / "towers" / "default.toml"

# name -> (overrides, init from the "pretrain" variant's stage-1 checkpoint)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    # stage 1 only: next-item full softmax (the default)
    "pretrain": ({}, False),
    # stage 2 only from random init: contrastive in-batch + sampled negatives, logQ
    "no-pretraining": (
        {"pretrain": {"enabled": False}, "contrastive": {"enabled": True, "mode": "full"}},
        False,
    ),
    # stage 1 then stage 2, three fine-tuning modes (stage 2 starts from "pretrain")
    "pretrain+ft-full": (
        {
            "pretrain": {"enabled": False},
            "contrastive": {"enabled": True, "mode": "full", "lr": 0.0003},
        },
        True,
    ),
    "pretrain+ft-lora": (
        {
            "pretrain": {"enabled": False},
            "contrastive": {"enabled": True, "mode": "lora", "lr": 0.001, "lora_r": 8},
        },
        True,
    ),
    "pretrain+ft-frozen": (
        {
            "pretrain": {"enabled": False},
            "contrastive": {"enabled": True, "mode": "frozen", "frozen_layers": 1, "lr": 0.0003},
        },
        True,
    ),
    # no content features: id embeddings only (classic SASRec-style with cosine/temperature)
    "no-content": (
        {
            "item": {
                "use_text": False,
                "use_brand": False,
                "use_category": False,
                "use_price": False,
            }
        },
        False,
    ),
    # content only: no id embeddings (every item is "cold")
    "content-only": ({"item": {"use_id": False}}, False),
    # bidirectional tower with masked-item pretraining (BERT4Rec-style)
    "bidirectional": (
        {"user": {"attention": "bidirectional"}, "pretrain": {"objective": "masked"}},
        False,
    ),
}
BASELINES = ("popularity", "als", "bpr")
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run_baseline(name: str, split: Split, ds: Any) -> dict[str, Any]:
    from training.protocol import model_family, run_protocol

    fam, make, grid = model_family(name, ds)
    r = run_protocol(fam, make, grid, split, progress=False)
    return {
        "test": r.test,
        "valid": r.valid,
        "train_seconds": r.train_seconds,
        "trainable_params": None,
        "config": r.config,
    }


def run_variant(
    name: str,
    ds: Any,
    split: Split,
    out_root: Path,
    base: dict[str, Any],
    max_epochs: int | None,
    config: Path,
) -> dict[str, Any]:
    from training.two_tower import train_and_evaluate

    over, from_pretrain = VARIANTS[name]
    over = _merge(base, over)
    if max_epochs:
        over = _merge(
            over, {"pretrain": {"epochs": max_epochs}, "contrastive": {"epochs": max_epochs}}
        )
    if from_pretrain:
        init = out_root / "pretrain" / "pretrain.pt"
        if not init.exists():
            raise SystemExit(f"variant {name} needs the 'pretrain' variant first ({init})")
        over = _merge(over, {"init_checkpoint": str(init)})
    t0 = time.perf_counter()
    res = train_and_evaluate(ds, split, config, out_root / name, overrides=over, resume=False)
    stages = res["stages"]
    chosen = res["chosen_stage"]
    return {
        "test": res["test"],
        "valid": res["valid"],
        "train_seconds": time.perf_counter() - t0,
        "seconds_to_best": res["seconds_to_best"],
        "trainable_params": stages[chosen]["trainable_params"],
        "best_epoch": stages[chosen]["best_epoch"] + 1,
        "epochs_run": stages[chosen]["epochs_run"],
        "chosen_stage": chosen,
        "stages": stages,
        "peak_rss_mb": res["peak_rss_mb"],
    }


def markdown(title: str, rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| model | "
        + " | ".join(METRICS)
        + " | valid ndcg@10 | train s | trainable params | best epoch |",
        "|---|" + "---:|" * (len(METRICS) + 4),
    ]
    nan = float("nan")
    for name, r in rows.items():
        t = r.get("test", {})
        tp = r.get("trainable_params")
        cells = [f"{t.get(k, nan):.4f}" for k in METRICS]
        cells.append(f"{r.get('valid', {}).get('ndcg@10', nan):.4f}")
        cells.append(f"{r.get('train_seconds', nan):.0f}")
        cells.append(f"{tp:,}" if tp else "-")
        cells.append(str(r.get("best_epoch", "-")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, result: dict[str, Any], table: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    out.with_suffix(".md").write_text(table)


def _users_slice(ds: Any, max_users: int | None) -> Interactions:
    """Interactions of users 1..max_users (all users when None); the catalogue is unchanged."""
    import polars as pl

    if not max_users:
        return Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    ev = ds.events.filter(pl.col("user_id") <= max_users)
    return Interactions.from_events(ev, min(max_users, ds.n_users), ds.n_items)


def ablation(args: argparse.Namespace) -> None:
    ds = load_dataset(args.dataset, args.data_dir)
    inter = _users_slice(ds, args.max_users)
    split = leave_one_out(inter, ties=args.ties)
    out_root = Path(args.runs) / f"ablation-{ds.name}-{args.max_users or 'all'}"
    rows: dict[str, dict[str, Any]] = {}
    if args.out.exists():  # continue a partial table
        rows = json.loads(args.out.read_text()).get("rows", {})
    base: dict[str, Any] = {"threads": args.threads, "progress": False}
    if args.batch_size or args.lr:
        stage: dict[str, Any] = {}
        if args.batch_size:
            stage["batch_size"] = args.batch_size
        if args.lr:
            stage["lr"] = args.lr
        base.update({"pretrain": dict(stage), "contrastive": dict(stage)})
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        if name in rows and not args.redo:
            continue
        log.info("=== %s", name)
        if name in BASELINES:
            rows[name] = run_baseline(name, split, ds)
        elif name in VARIANTS:
            rows[name] = run_variant(name, ds, split, out_root, base, args.max_epochs, args.config)
        else:
            raise SystemExit(
                f"unknown variant {name!r}; known: {', '.join([*BASELINES, *VARIANTS])}"
            )
        result = {
            "dataset": ds.name,
            "protocol": split.protocol,
            "max_epochs": args.max_epochs,
            "max_users": args.max_users,
            "rows": rows,
        }
        title = (
            f"{ds.name}, {split.name}, full ranking over {ds.n_items:,} items"
            + (f", users 1..{args.max_users} only" if args.max_users else "")
            + (f", each stage capped at {args.max_epochs} epochs" if args.max_epochs else "")
        )
        _write(args.out, result, markdown(title, rows))
        log.info(
            "%s: test ndcg@10 %.4f recall@10 %.4f",
            name,
            rows[name]["test"]["ndcg@10"],
            rows[name]["test"]["recall@10"],
        )


def _drop_items(inter: Interactions, cold: np.ndarray) -> Interactions:
    return inter.filter(~np.isin(inter.items, cold))


def coldstart(args: argparse.Namespace) -> None:
    """Hold 10% of items out of training entirely; Recall@10 on test interactions with them."""
    from training.baselines import Popularity
    from training.two_tower import TwoTowerRetriever

    ds = load_dataset(args.dataset, args.data_dir)
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    if args.split == "loo":
        full = leave_one_out(inter, ties=args.ties)
    else:
        full = temporal_split(inter, args.split)
    rng = np.random.default_rng(0)
    cold = np.sort(rng.choice(np.arange(1, ds.n_items + 1), size=ds.n_items // 10, replace=False))
    train = _drop_items(full.train, cold)
    train_valid = _drop_items(full.train_valid, cold)
    is_cold = np.zeros(ds.n_items + 1, bool)
    is_cold[cold] = True

    def only_cold(t: Targets) -> Targets:
        lens = np.diff(t.indptr)
        rows = np.repeat(np.arange(len(t)), lens)
        keep = is_cold[t.items]
        n = np.bincount(rows[keep], minlength=len(t))
        indptr = np.zeros(len(t) + 1, np.int64)
        indptr[1:] = np.cumsum(n)
        sub = Targets(t.users, indptr, t.items[keep])
        return sub.subset(n > 0)

    test_cold = only_cold(full.test)
    valid_warm = full.valid.subset(~is_cold[full.valid.items[full.valid.indptr[:-1]]])
    over = {"threads": args.threads, "progress": False, "item": {"id_dropout": args.id_dropout}}
    if args.max_epochs:
        over["pretrain"] = {"epochs": args.max_epochs}
    t0 = time.perf_counter()
    r = TwoTowerRetriever.for_dataset(ds, args.config, Path(args.runs) / f"cold-{ds.name}", over)
    r.fit(train, valid_warm)
    tt = time.perf_counter() - t0
    pop = Popularity()
    pop.fit(train_valid)
    rows: dict[str, dict[str, Any]] = {}
    for name, model in (("two-tower (text path)", r), ("popularity", pop)):
        m = evaluate(model.score, test_cold, train_valid, ks=(10, 20))

        # ranking restricted to the cold items (how well content separates new products)
        def restricted(u: np.ndarray, h: Interactions, _m: Any = model) -> np.ndarray:
            s = _m.score(u, h).astype(np.float32)
            s[:, ~is_cold] = -np.inf
            return s

        mc = evaluate(restricted, test_cold, train_valid, ks=(10,))
        rows[name] = {
            "test": m,
            "cold_only_recall@10": mc["recall@10"],
            "cold_only_ndcg@10": mc["ndcg@10"],
        }
    rows["random among cold items"] = {"cold_only_recall@10": 10 / len(cold)}
    result = {
        "dataset": ds.name,
        "cold_items": len(cold),
        "test_users": len(test_cold),
        "train_seconds": tt,
        "id_dropout": args.id_dropout,
        "rows": rows,
    }
    lines = [
        f"**cold start, {ds.name}**: {len(cold):,} items (10%) never seen in training, "
        f"{len(test_cold):,} test users whose target is one of them",
        "",
        "| model | recall@10 (full catalogue) | ndcg@10 | recall@10 among cold items |",
        "|---|---:|---:|---:|",
    ]
    for name, v in rows.items():
        t = v.get("test", {})
        lines.append(
            f"| {name} | {t.get('recall@10', float('nan')):.4f} | "
            f"{t.get('ndcg@10', float('nan')):.4f} | {v['cold_only_recall@10']:.4f} |"
        )
    _write(args.out, result, "\n".join(lines) + "\n")


def retail(args: argparse.Namespace) -> None:
    """Online Retail, temporal split: two-tower (text item tower) vs ALS vs popularity."""
    ds = load_dataset("online-retail", args.data_dir)
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    split = temporal_split(inter, args.test_start, valid_days=30)
    rows: dict[str, dict[str, Any]] = {}
    for b in ("popularity", "als"):
        rows[b] = run_baseline(b, split, ds)
    from training.two_tower import train_and_evaluate

    over: dict[str, Any] = {"threads": args.threads, "progress": False}
    if args.max_epochs:
        over["pretrain"] = {"epochs": args.max_epochs}
    t0 = time.perf_counter()
    res = train_and_evaluate(
        ds, split, args.config, Path(args.runs) / "retail-two-tower", overrides=over, resume=False
    )
    ch = res["chosen_stage"]
    rows["two-tower"] = {
        "test": res["test"],
        "valid": res["valid"],
        "train_seconds": time.perf_counter() - t0,
        "trainable_params": res["stages"][ch]["trainable_params"],
        "best_epoch": res["stages"][ch]["best_epoch"] + 1,
    }
    result = {"dataset": ds.name, "protocol": split.protocol, "rows": rows}
    _write(args.out, result, markdown(f"online-retail, temporal split at {args.test_start}", rows))


def serving_cost(args: argparse.Namespace) -> None:
    """What serving a baseline through the tower path costs: EASE exact vs its rank-r
    factor tower, ALS with its trained user factors vs the history fold-in (validation
    and test NDCG@10, vector width, encode time per user)."""
    from towers.factor import factor_tower_from_baseline
    from training.baselines import ALS, EASE, ALSConfig, EASEConfig
    from training.fallback import factor_scorer

    ds = load_dataset(args.dataset, args.data_dir)
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    split = (
        temporal_split(inter, args.test_start, valid_days=30)
        if ds.name == "online-retail"
        else leave_one_out(inter, ties=args.ties)
    )
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, valid_model: Any, test_model: Any, extra: dict) -> None:
        t0 = time.perf_counter()
        v = evaluate(valid_model, split.valid, split.train, ks=(10,), progress=False)
        t = evaluate(test_model, split.test, split.train_valid, ks=(10,), progress=False)
        rows[name] = {
            "valid": v,
            "test": t,
            "eval_seconds": time.perf_counter() - t0,
            **extra,
        }
        log.info("%s valid %.4f test %.4f", name, v["ndcg@10"], t["ndcg@10"])

    users = split.test.users[:2000]
    for lam in [float(x) for x in args.ease_l2.split(",")]:
        fitted = {}
        for part, data in (("valid", split.train), ("test", split.train_valid)):
            m = EASE(EASEConfig(l2=lam))
            t0 = time.perf_counter()
            m.fit(data)
            fitted[part] = (m, time.perf_counter() - t0)
        n1 = split.train.n_items + 1
        add(
            f"ease l2={lam:g} exact",
            fitted["valid"][0].score,
            fitted["test"][0].score,
            {"dim": n1, "fit_seconds": fitted["valid"][1], "bytes": 4 * n1 * n1},
        )
        for r in [int(x) for x in args.ranks.split(",")]:
            fv = factor_tower_from_baseline(fitted["valid"][0], ease_rank=r)
            ft = factor_tower_from_baseline(fitted["test"][0], ease_rank=r)
            t0 = time.perf_counter()
            factor_scorer(ft)(users, split.train_valid)
            per_user_ms = (time.perf_counter() - t0) / len(users) * 1e3
            add(
                f"ease l2={lam:g} rank {r} (served)",
                factor_scorer(fv),
                factor_scorer(ft),
                {"dim": ft.dim, "bytes": 4 * 2 * n1 * ft.dim, "score_ms_per_user": per_user_ms},
            )
            del fv, ft
    for alpha in (10.0, 40.0):
        fitted2 = {}
        for part, data in (("valid", split.train), ("test", split.train_valid)):
            a = ALS(ALSConfig(factors=128, regularization=1.0, alpha=alpha))
            a.fit(data)
            fitted2[part] = a
        add(
            f"als a={alpha:g} trained user factors",
            fitted2["valid"].score,
            fitted2["test"].score,
            {"dim": 128},
        )
        fv = factor_tower_from_baseline(fitted2["valid"])
        ft = factor_tower_from_baseline(fitted2["test"])
        t0 = time.perf_counter()
        factor_scorer(ft)(users, split.train_valid)
        per_user_ms = (time.perf_counter() - t0) / len(users) * 1e3
        add(
            f"als a={alpha:g} fold-in (served)",
            factor_scorer(fv),
            factor_scorer(ft),
            {"dim": ft.dim, "score_ms_per_user": per_user_ms},
        )
    result = {"dataset": ds.name, "protocol": split.protocol, "rows": rows}
    lines = [
        f"**serving cost, {ds.name}** ({split.protocol.get('split')})",
        "",
        "| retriever | valid ndcg@10 | test ndcg@10 | test recall@10 | vector dim | "
        "score ms/user (full catalogue) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in rows.items():
        ms = v.get("score_ms_per_user")
        lines.append(
            f"| {name} | {v['valid']['ndcg@10']:.4f} | {v['test']['ndcg@10']:.4f} | "
            f"{v['test']['recall@10']:.4f} | {v['dim']} | "
            + (f"{ms:.3f} |" if ms is not None else "- |")
        )
    _write(args.out, result, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--experiment",
        choices=["ablation", "coldstart", "retail", "serving-cost"],
        default="ablation",
        help="which experiment",
    )
    p.add_argument("--ease-l2", default="100,500", help="serving-cost: EASE lambdas")
    p.add_argument("--ranks", default="64,256", help="serving-cost: served EASE ranks")
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--variants", default=",".join([*BASELINES, *VARIANTS]))
    p.add_argument("--ties", default="file", choices=["file", "shuffle"])
    p.add_argument("--split", default="loo", help="coldstart: loo or a temporal test start date")
    p.add_argument("--test-start", default="2011-11-01", help="retail: temporal test start")
    p.add_argument("--max-epochs", type=int, default=None, help="cap epochs per stage")
    p.add_argument("--batch-size", type=int, default=None, help="ablation: batch size, both stages")
    p.add_argument("--lr", type=float, default=None, help="ablation: base learning rate")
    p.add_argument(
        "--max-users", type=int, default=None, help="ablation: users 1..N only (cheaper)"
    )
    p.add_argument("--id-dropout", type=float, default=0.3, help="coldstart: item.id_dropout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(ROOT / "results" / "runs"))
    p.add_argument("--redo", action="store_true", help="rerun rows already in --out")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    {
        "ablation": ablation,
        "coldstart": coldstart,
        "retail": retail,
        "serving-cost": serving_cost,
    }[args.experiment](args)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
