"""Compare finished runs on one validation sample: the same users, the same targets.

Runs trained with different ``valid_users`` validate on different users, so their own
``valid`` numbers do not compare. This scores every run's best checkpoint on the held-out
users of ``training.splits.sample_validation(split, FRACTION, MIN, SEED)``. Those users'
validation items are in neither run's training data, so the comparison stays on
validation and the test is never read.

    python benchmarks/validation_sample.py --dataset beauty --no-text \
        --runs results/runs/ids_vs10,results/runs/ids_vs02 --out results/validation_sample_ids.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intake.loaders import load_dataset
from training.cli import make_split
from training.evaluation import evaluate
from training.splits import sample_validation
from training.two_tower import TwoTowerRetriever, hide_item_content


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=type("F", (argparse.RawDescriptionHelpFormatter, HelpFormatter), {}),
    )
    ap.add_argument("--dataset", default="beauty", help="dataset name or path")
    ap.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    ap.add_argument("--split", default="loo-file", help="split spec, as `ecomrec train --split`")
    ap.add_argument("--no-text", action="store_true", help="the runs were trained with --no-text")
    ap.add_argument("--runs", required=True, help="comma list of finished run directories")
    ap.add_argument("--fraction", type=float, default=0.2, help="validation sample fraction")
    ap.add_argument("--min-users", type=int, default=2000, help="validation sample minimum")
    ap.add_argument("--seed", type=int, default=42, help="validation sample seed")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    ds = load_dataset(args.dataset, args.data_dir)
    if args.no_text:
        ds = hide_item_content(ds)
    v = sample_validation(make_split(ds, args.split), args.fraction, args.min_users, args.seed)
    out: dict[str, dict[str, float]] = {}
    for run in [r for r in args.runs.split(",") if r]:
        r = TwoTowerRetriever.load(Path(run))
        m = evaluate(r.score, v.valid, v.train, ks=(10, 20), progress=False)
        out[run] = m
        print(
            f"{run}: valid ndcg@10 {m['ndcg@10']:.4f} recall@10 {m['recall@10']:.4f} "
            f"({int(m['users'])} users)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
