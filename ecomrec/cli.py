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
    "lifecycle.forget_cli",  # customers forget (after segments.cli: adds to its `customers`)
    "indexing.cli",  # index
    "serving.cli",  # serve, recommend
    "serving.export_cli",  # export triton
    "serving.dashboard.cli",  # dashboard (web, read-only)
    "lifecycle.batch_cli",  # batch (sharded jobs on Dask)
    "lifecycle.cli",  # refresh
    "outcomes.cli",  # report online
    "ecomrec.demo",  # demo: the main job end to end (runs every package)
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not when the help text already says what the
    default is ("(default: $ECOMREC_DATA_DIR)", "default: the config's") and not for
    ``None`` (an option that is simply not given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        low = text.lower()
        if "default:" in low or "(default" in low or "%(default)" in text or action.default is None:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's --help shows each option's default (once)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        fmt = kwargs.get("formatter_class", HelpFormatter)
        if isinstance(fmt, type) and not issubclass(fmt, HelpFormatter):
            # a package asked for its own formatter (e.g. the plain ArgumentDefaults one):
            # keep it, with the defaults shown once
            fmt = type(f"Once{fmt.__name__}", (HelpFormatter, fmt), {})
        kwargs["formatter_class"] = fmt
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
