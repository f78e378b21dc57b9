"""Full-ranking quality benchmark: a thin wrapper over ``training.protocol`` (the split
rule and model selection ``ecomrec train`` runs: same split, same candidates, same winner).

    python benchmarks/quality.py --dataset online-retail --out results/or.json
    python benchmarks/quality.py --dataset beauty --models tower,als,ease,popularity,bpr \\
        --split loo-file --out results/quality_beauty.json
    python benchmarks/quality.py --dataset online-retail --protocol buy-again \\
        --models personal-top,als,ease,tower --out results/or_buy_again.json

``--split auto`` (default) is ``training.protocol.split_rule``: temporal with the cutoff
from the data for transaction logs and event logs with times of day (the last
``--test-days`` days are the test window, the ``--valid-days`` before it validation),
leave-one-out for day-granular review sequences. ``--models auto`` is what ``ecomrec
train`` compares: the family's tower (``--family``: the basket tower on transaction logs,
else the sequence transformer), the run config's ``[fallback]`` baselines (ALS/EASE in
their served form), popularity and the "co-bought with the last item" rule. Any baseline
of ``training.protocol.model_family`` may be added by name. ``--protocol buy-again``
keeps the history rankable, so repurchases are targets too.

Writes JSON shaped ``{"dataset": {...}, "protocol": {...}, "served": NAME, "models":
{NAME: {...}}}`` and a markdown table next to it (same name, ``.md``). Every choice is
made on validation (NDCG@10), never on test; CF models are refit on train+validation
before the test.
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

from intake.loaders import load_dataset
from training.cli import parse_overrides, resolve_config
from training.protocol import TOWER, make_split, select_model, selection_text
from training.trainer import default_config_path
from training.two_tower import hide_item_content

METRICS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr@10", "coverage@10"]


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
        + f", full ranking over {result['dataset']['items']:,} items, test users "
        + f"{int(next(iter(result['models'].values()))['users']):,}; served: "
        + f"**{result['served'] or 'none (no tower, ALS or EASE compared)'}** (chosen on "
        + "validation)",
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


def _models(spec: str, family: str) -> tuple[list[str] | None, str, str | None]:
    """``--models`` -> (candidate list for select_model or None = auto, family, the
    sequence tower's config named as ``two-tower:CONFIG.toml`` or None)."""
    if spec == "auto":
        return None, family, None
    out, config = [], None
    for m in (x.strip() for x in spec.split(",") if x.strip()):
        name, _, arg = m.partition(":")
        if name in ("two-tower", TOWER):
            out.append(TOWER)
            if arg in ("basket", "sequence"):
                family = arg
            elif arg:
                family, config = "sequence", arg
        else:
            out.append(m)
    return out, family, config


def main(argv: list[str] | None = None) -> dict:
    from ecomrec.cli import HelpFormatter  # shows each default once

    class _Fmt(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Fmt)
    ap.add_argument(
        "--dataset", default="beauty", help="name (beauty, online-retail, ...) or a path"
    )
    ap.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    ap.add_argument(
        "--models",
        default="auto",
        help="auto (what `ecomrec train` compares) or a comma list: tower (= two-tower"
        "[:basket|:sequence]), als, ease, popularity, co-bought-last, personal-top, bpr, "
        "itemknn",
    )
    ap.add_argument(
        "--family",
        choices=["auto", "sequence", "basket"],
        default="auto",
        help="the tower family (auto: basket on transaction logs)",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="the sequence tower's run config (its [fallback] lists the baselines), as "
        "`ecomrec train --config` (default: default)",
    )
    ap.add_argument("--ties", choices=["file", "shuffle"], default="file", help="loo ties")
    ap.add_argument(
        "--split",
        default="auto",
        help="auto | temporal | temporal:YYYY-MM-DD | loo | loo-file | loo-shuffle",
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
        help="override a run config value (TOML literal, as `ecomrec train --set`; "
        "basket.* for the basket tower, e.g. basket.dims=[64]), e.g. --set threads=1",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars / info logs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    ds = load_dataset(args.dataset, args.data_dir)
    if args.no_text:
        ds = hide_item_content(ds)
    split_spec = args.split
    if split_spec == "loo":
        split_spec = f"loo-{args.ties}"
    split = make_split(
        ds,
        split_spec,
        protocol=args.protocol,
        test_start=args.test_start,
        test_days=args.test_days,
        valid_days=args.valid_days,
        ties=args.ties,
        seed=args.seed,
    )
    models, family, tower_config = _models(args.models, args.family)
    named = args.config or tower_config
    config = resolve_config(named) if named else default_config_path()
    sel = select_model(
        ds,
        split,
        family=family,
        config=config,
        overrides=parse_overrides(args.set),
        models=models,
        progress=not args.quiet,
    )
    desc = ds.describe()
    result: dict = {
        "dataset": {k: desc[k] for k in ("dataset", "users", "items", "interactions", "time_range")}
        | {"item_content": "hidden (--no-text)" if args.no_text else "as loaded"},
        "protocol": {
            **split.protocol,
            "ranking": "full catalogue, history items excluded"
            if args.protocol == "new-items"
            else "full catalogue, history items kept (repurchases are targets)",
            "selection": "hyperparameters, epochs and the served model chosen on validation "
            "ndcg@10",
            "test_history": "train + validation",
            "family": sel.family,
            "config": str(config),
            "tower_set": list(args.set),
        },
        "served": sel.served,
        "skipped": sel.skipped,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "models": {
            name: {
                **{k: r.test[k] for k in r.test if k != "eval_seconds"},
                "valid": {k: v for k, v in r.valid.items() if k != "eval_seconds"},
                "config": r.config,
                "grid": r.grid,
                "train_seconds": r.train_seconds,
                "eval_seconds": r.eval_seconds,
            }
            for name, r in sel.results.items()
        },
    }
    import resource

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    table = markdown_table(result)
    print(table)
    print(selection_text(sel))
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
