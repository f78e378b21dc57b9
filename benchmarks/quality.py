"""Full-ranking quality benchmark: popularity, implicit ALS/BPR/kNN, two-tower.

    python benchmarks/quality.py --dataset beauty --models popularity,als,bpr \\
        --ties file --out results/quality_beauty.json

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

from towers.loaders import load_dataset
from towers.sequences import Interactions
from training.protocol import model_family, run_protocol
from training.splits import Split, leave_one_out, temporal_split
from training.two_tower import hide_item_content

METRICS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr@10", "coverage@10"]
# Online Retail default temporal split: last ~5.5 weeks are test, the 30 days before validation.
TEMPORAL_DEFAULTS = {"online-retail": "2011-11-01"}


def make_split(args: argparse.Namespace, inter: Interactions, dataset_name: str) -> Split:
    split_kind = args.split or ("temporal" if dataset_name in TEMPORAL_DEFAULTS else "loo")
    if split_kind == "temporal":
        cutoff = args.test_start or TEMPORAL_DEFAULTS.get(dataset_name)
        if cutoff is None:
            raise SystemExit("--test-start is required for a temporal split of this dataset")
        return temporal_split(inter, cutoff, valid_days=args.valid_days)
    return leave_one_out(inter, ties=args.ties, seed=args.seed)


def markdown_table(result: dict) -> str:
    p = result["protocol"]
    lines = [
        f"**{result['dataset']['dataset']}** — split `{p.get('split')}`"
        + (f", ties `{p['ties']}`" if p.get("ties") else "")
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
    class _Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
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
        help="comma list: popularity, als, bpr, itemknn, ease, two-tower[:CONFIG.toml]",
    )
    ap.add_argument(
        "--ties",
        choices=["file", "shuffle"],
        default="file",
        help="leave-one-out order of same-timestamp events",
    )
    ap.add_argument(
        "--split",
        choices=["loo", "temporal"],
        default=None,
        help="split kind (default: temporal for online-retail, else leave-one-out)",
    )
    ap.add_argument(
        "--test-start", default=None, help="temporal split: first day of the test window"
    )
    ap.add_argument("--valid-days", type=int, default=30, help="temporal split: validation window")
    ap.add_argument("--seed", type=int, default=42, help="seed of the shuffled-ties split")
    ap.add_argument("--out", default=None, help="JSON output path (markdown table beside it)")
    ap.add_argument(
        "--no-text",
        action="store_true",
        help="hide product content (title, brand, category, price): ids only, as for a "
        "dataset folder without an items file",
    )
    ap.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    ds = load_dataset(args.dataset, args.data_dir)
    if args.no_text:
        ds = hide_item_content(ds)
    purchases = ds.events.filter(ds.events["event_type"] == "purchase")
    inter = Interactions.from_events(purchases, ds.n_users, ds.n_items)
    split = make_split(args, inter, ds.name)
    desc = ds.describe()
    result: dict = {
        "dataset": {k: desc[k] for k in ("dataset", "users", "items", "interactions", "time_range")}
        | {"item_content": "hidden (--no-text)" if args.no_text else "as loaded"},
        "protocol": {
            **split.protocol,
            "ranking": "full catalogue, history items excluded",
            "selection": "hyperparameters and epochs chosen on validation ndcg@10",
            "test_history": "train + validation",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "models": {},
    }
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        name, make, grid = model_family(spec, dataset=ds)
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
    from towers.errors import EcomrecError

    try:
        main()
    except EcomrecError as e:
        raise SystemExit(f"quality.py: error: {e}") from None
