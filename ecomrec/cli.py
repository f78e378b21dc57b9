"""``ecomrec`` console script.

Each package owns its subcommands in ``<package>/cli.py`` (``register(subparsers)``);
this module only collects them. A package whose optional dependencies are missing is
reported when its command is used, not at start-up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ecomrec.errors import EcomrecError

# (module, description) in help order; each module exposes register(subparsers).
COMMAND_MODULES = [
    "intake.cli",  # data
    "training.cli",  # train
    "segments.cli",  # segments, campaign, churn
    "indexing.cli",  # index
    "serving.cli",  # serve, recommend
    "serving.export_cli",  # export triton
    "lifecycle.batch_cli",  # batch (sharded jobs on Dask)
    "lifecycle.cli",  # refresh
    "ecomrec.demo",  # demo: the main job end to end (runs every package)
]


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's --help shows each option's default."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ecomrec", description="Know your customers and recommend to each of them.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue  # that package has no CLI yet
            raise
        mod.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc = args.func(args)
    except EcomrecError as e:
        print(f"ecomrec: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)
