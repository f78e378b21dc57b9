"""``ecomrec train``: train the two-tower model on a dataset split and report validation/test metrics."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = sub.add_parser("train", help="train the two-tower model (pretraining + fine-tuning)")
    p.add_argument(
        "--dataset", required=True, help="dataset name or path (beauty, online-retail, ...)"
    )
    p.add_argument(
        "--config", default=None, help="TOML run config (default: configs/towers/default.toml)"
    )
    p.add_argument(
        "--out", required=True, help="run directory (checkpoints, manifest, TensorBoard)"
    )
    p.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    p.add_argument(
        "--split",
        default="loo-file",
        help="loo-file | loo-shuffle | temporal (last 30 days of the log are the test window) "
        "| temporal:YYYY-MM-DD (test window start) (default: loo-file)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML literal), e.g. --set user.dropout=0.3",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore last.pt and start over")
    p.add_argument("--no-test", action="store_true", help="skip the test evaluation")
    p.set_defaults(func=_run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["user.dropout=0.3", "seed=1"]`` -> nested dict with TOML-parsed values."""
    import tomllib

    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set wants SECTION.KEY=VALUE, got {it!r}")
        key, val = it.split("=", 1)
        try:
            v = tomllib.loads(f"v = {val}")["v"]
        except tomllib.TOMLDecodeError:
            v = val
        d = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def make_split(ds: Any, spec: str) -> Any:
    """A split of a loaded dataset from a CLI spec."""
    from towers.sequences import Interactions
    from training.splits import default_test_start, leave_one_out, temporal_split

    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    if spec in ("loo-file", "loo-shuffle"):
        return leave_one_out(inter, ties="file" if spec == "loo-file" else "shuffle")
    if spec == "temporal":
        return temporal_split(inter, test_start=default_test_start(inter))
    if spec.startswith("temporal:"):
        return temporal_split(inter, test_start=spec.split(":", 1)[1])
    raise SystemExit(f"unknown split {spec!r}")


def _run(args: argparse.Namespace) -> int:
    from towers.loaders import load_dataset
    from training.trainer import default_config_path
    from training.two_tower import train_and_evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    ds = load_dataset(args.dataset, args.data_dir)
    split = make_split(ds, args.split)
    config = Path(args.config) if args.config else default_config_path()
    out = train_and_evaluate(
        ds,
        split,
        config,
        Path(args.out),
        overrides=parse_overrides(args.set),
        resume=not args.no_resume,
        test=not args.no_test,
        t_start=t0,
    )
    print(json.dumps(out, indent=2, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m training.cli train ...``."""
    parser = argparse.ArgumentParser(prog="ecomrec")
    sub = parser.add_subparsers(required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
