"""Full-ranking quality benchmark: popularity, personal top, implicit ALS/BPR/kNN, EASE, two-tower.

    python benchmarks/quality.py --dataset beauty --models popularity,als,bpr \\
        --ties file --out results/quality_beauty.json
    python benchmarks/quality.py --dataset online-retail --protocol buy-again \\
        --models personal-top,als,ease,two-tower --out results/or_buy_again.json

Transaction logs (baskets of items per invoice) get a temporal split by default: the last
``--test-days`` days of the log are the test window, the ``--valid-days`` before it
validation (``--test-start`` overrides). ``--protocol new-items`` ranks only items the
customer has not bought (history excluded); ``buy-again`` keeps the history rankable, so
repurchases are targets too (the share of repeat targets is reported).

Writes JSON shaped ``{"dataset": {...}, "protocol": {...}, "models": {NAME: {...}}}`` and a
markdown table next to it (same name, ``.md``). Hyperparameters are chosen on validation
(NDCG@10), never on test; CF models are refit on train+validation before the test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from intake.loaders import load_dataset
from towers.sequences import Interactions
from training.cli import parse_overrides
from training.protocol import is_transaction_log, model_family, run_protocol
from training.splits import Split, Targets, default_test_start, leave_one_out, temporal_split
from training.two_tower import hide_item_content

METRICS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr@10", "coverage@10"]


def make_split(args: argparse.Namespace, inter: Interactions, transaction_log: bool) -> Split:
    """Leave-one-out, or temporal (the default for transaction logs; cutoff from the data)."""
    split_kind = args.split or ("temporal" if transaction_log else "loo")
    buy_again = args.protocol == "buy-again"
    if buy_again and split_kind != "temporal":
        raise SystemExit("--protocol buy-again needs a temporal split")
    if split_kind == "temporal":
        cutoff: str | int = (
            args.test_start
            if args.test_start
            else default_test_start(inter, test_days=args.test_days)
        )
        split = temporal_split(
            inter, cutoff, valid_days=args.valid_days, exclude_seen=not buy_again
        )
        split.protocol["cutoff_from"] = (
            "--test-start"
            if args.test_start
            else (f"data: last {args.test_days} days are the test window")
        )
        split.protocol["repeat_share_test"] = repeat_share(split.test, split.train_valid)
        split.protocol["repeat_share_valid"] = repeat_share(split.valid, split.train)
        return split
    return leave_one_out(inter, ties=args.ties, seed=args.seed)


def repeat_share(targets: Targets, history: Interactions) -> float:
    """Share of (customer, item) targets the customer had already bought (0 under new-items)."""
    lens = np.diff(targets.indptr)
    if lens.sum() == 0:
        return 0.0
    users = np.repeat(targets.users, lens)
    seen = history.to_csr()[users, targets.items.astype(np.int64)]
    return float(np.asarray(seen).ravel().mean())


def markdown_table(result: dict) -> str:
    p = result["protocol"]
    lines = [
        f"**{result['dataset']['dataset']}** — split `{p.get('split')}`"
        + (
            f" (test from {p['test_start']}, valid from {p['valid_start']})"
            if p.get("test_start")
            else ""
        )
        + (f", ties `{p['ties']}`" if p.get("ties") else "")
        + f", protocol `{p.get('protocol', 'new-items')}`"
        + (
            f" (repeat share of test targets {p['repeat_share_test']:.3f})"
            if "repeat_share_test" in p
            else ""
        )
        + (
            ", product content hidden (--no-text)"
            if "hidden" in str(result["dataset"].get("item_content"))
            else ""
        )
        + f", full ranking over {result['dataset']['items']:,} items, test users {int(next(iter(result['models'].values()))['users']):,}",
        "",
        "| model | " + " | ".join(METRICS) + " | valid ndcg@10 | train s | eval s |",
        "|---|" + "---:|" * (len(METRICS) + 3),
    ]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m[k]:.4f}" for k in METRICS)
            + f" | {m['valid']['ndcg@10']:.4f} | {m['train_seconds']:.1f} | {m['eval_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from ecomrec.cli import HelpFormatter  # shows each default once

    class _Fmt(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Fmt)
    ap.add_argument(
        "--dataset",
        default="beauty",
        help="name (beauty, online-retail, ...) or S3-Rec path prefix",
    )
    ap.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    ap.add_argument(
        "--models",
        default="popularity,als,bpr",
        help="comma list: popularity, personal-top, als, bpr, itemknn, ease, "
        "two-tower[:CONFIG.toml|:basket|:sequence]",
    )
    ap.add_argument("--ties", choices=["file", "shuffle"], default="file", help="loo ties")
    ap.add_argument(
        "--split",
        choices=["loo", "temporal"],
        default=None,
        help="default: temporal for transaction logs (baskets), else loo",
    )
    ap.add_argument(
        "--protocol",
        choices=["new-items", "buy-again"],
        default="new-items",
        help="new-items: history excluded; buy-again: repurchases are targets too",
    )
    ap.add_argument(
        "--test-start",
        default=None,
        help="temporal split: first day of the test window (default: from the data)",
    )
    ap.add_argument(
        "--test-days", type=int, default=30, help="temporal default: last N days are test"
    )
    ap.add_argument("--valid-days", type=int, default=30, help="temporal: validation days")
    ap.add_argument("--seed", type=int, default=42, help="seed of shuffled ties")
    ap.add_argument("--out", default=None, help="JSON output path (markdown table beside it)")
    ap.add_argument(
        "--no-text",
        action="store_true",
        help="hide product content (title, brand, category, price): ids only, as for a "
        "dataset folder without an items file",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a value of the sequence tower's run config (TOML literal, as "
        "`ecomrec train --set`), e.g. --set threads=1",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars / info logs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    ds = load_dataset(args.dataset, args.data_dir)
    if args.no_text:
        ds = hide_item_content(ds)
    purchases = ds.events.filter(ds.events["event_type"] == "purchase")
    inter = Interactions.from_events(purchases, ds.n_users, ds.n_items)
    split = make_split(args, inter, is_transaction_log(ds))
    split.protocol["protocol"] = args.protocol
    desc = ds.describe()
    result: dict = {
        "dataset": {k: desc[k] for k in ("dataset", "users", "items", "interactions", "time_range")}
        | {"item_content": "hidden (--no-text)" if args.no_text else "as loaded"},
        "protocol": {
            **split.protocol,
            "ranking": "full catalogue, history items excluded"
            if args.protocol == "new-items"
            else "full catalogue, history items kept (repurchases are targets)",
            "selection": "hyperparameters and epochs chosen on validation ndcg@10",
            "test_history": "train + validation",
            "tower_set": list(args.set),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "models": {},
    }
    tower_overrides = parse_overrides(args.set)
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        name, make, grid = model_family(
            spec, dataset=ds, protocol=args.protocol, tower_overrides=tower_overrides
        )
        r = run_protocol(name, make, grid, split, progress=not args.quiet)
        result["models"][name] = {
            **{k: r.test[k] for k in r.test if k != "eval_seconds"},
            "valid": {k: v for k, v in r.valid.items() if k != "eval_seconds"},
            "config": r.config,
            "grid": r.grid,
            "train_seconds": r.train_seconds,
            "eval_seconds": r.eval_seconds,
        }
        logging.info(
            "%s: test recall@10 %.4f ndcg@10 %.4f", name, r.test["recall@10"], r.test["ndcg@10"]
        )
    import resource

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    table = markdown_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(table)
    return result


if __name__ == "__main__":
    from ecomrec.errors import EcomrecError

    try:
        main()
    except EcomrecError as e:
        raise SystemExit(f"quality.py: error: {e}") from None
