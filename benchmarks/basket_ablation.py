"""One basket-tower variant through the benchmark protocol (validation-chosen epochs, refit
on train + validation, test read once) on a temporal split of a transaction log.

    python benchmarks/basket_ablation.py --dataset online-retail --test-start 2011-11-01 \\
        --set '{"model": {"init": "random"}, "epochs": 8, "lr": 0.001}'
    python benchmarks/basket_ablation.py --dataset online-retail --test-start 2011-11-01 \\
        --set '{"epochs": 1, "lr": 1e-12}'          # the co-purchase initialisation alone

Prints one JSON line (variant, valid and test metrics, seconds); ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from intake.loaders import load_dataset
from towers.sequences import Interactions
from training.protocol import basket_factory, run_protocol
from training.splits import default_test_start, temporal_split


def main(argv: list[str] | None = None) -> dict:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=type("F", (argparse.RawDescriptionHelpFormatter, HelpFormatter), {}),
    )
    ap.add_argument("--dataset", default="online-retail", help="name or path")
    ap.add_argument("--data-dir", default=None, help="data directory ($ECOMREC_DATA_DIR)")
    ap.add_argument("--test-start", default=None, help="test window start (default: data)")
    ap.add_argument("--valid-days", type=int, default=30, help="validation days")
    ap.add_argument(
        "--protocol", choices=["new-items", "buy-again"], default="new-items", help="protocol"
    )
    ap.add_argument("--set", default="{}", help="BasketTrainConfig overrides as JSON")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    over = json.loads(args.set)
    ds = load_dataset(args.dataset, args.data_dir)
    pur = ds.events.filter(ds.events["event_type"] == "purchase")
    inter = Interactions.from_events(pur, ds.n_users, ds.n_items)
    cutoff = args.test_start or default_test_start(inter)
    split = temporal_split(
        inter, cutoff, valid_days=args.valid_days, exclude_seen=args.protocol == "new-items"
    )
    r = run_protocol(
        "two-tower",
        basket_factory(args.protocol, **over),
        [{}],
        split,
        ks=(10, 20),
        progress=False,
    )
    res = {
        "variant": over,
        "protocol": args.protocol,
        "split": split.protocol,
        "valid": r.valid,
        "test": r.test,
        "train_seconds": r.train_seconds,
    }
    print(json.dumps(res, default=float))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
