"""``ecomrec data describe|import|synth|save``: bring a shop's data in and look at it.

The data contract (column names, types, time-zone rule, what gets dropped) is
docs/data.md; :mod:`intake.loaders.contract` implements it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _dataset_arg(p: argparse.ArgumentParser) -> None:
    from intake.loaders.registry import DATASET_HELP

    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder of the bundled datasets (default: $ECOMREC_DATA_DIR)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` and its actions."""
    p = sub.add_parser(
        "data", help="bring a shop's data in (import, synth) and inspect it", formatter_class=_FMT
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    d = dsub.add_parser(
        "describe",
        help="users, items, interactions, sequence lengths, time range, drops",
        formatter_class=_FMT,
    )
    _dataset_arg(d)
    d.add_argument("--json", action="store_true", help="print JSON instead of text")
    d.set_defaults(func=_describe)

    i = dsub.add_parser(
        "import",
        help="validate a shop's events (+ catalogue) in the data contract, write a dataset "
        "folder, print the drop report (docs/data.md)",
        formatter_class=_FMT,
    )
    i.add_argument(
        "--events",
        default=None,
        help="events file: .csv/.tsv (UTF-8), .parquet, or a folder of (partitioned) .parquet",
    )
    i.add_argument(
        "--items",
        default=None,
        help="catalogue file (same formats); without it the products are those in the events",
    )
    i.add_argument(
        "--bundled",
        default=None,
        help="import a bundled dataset instead of --events (beauty, online-retail, cdnow, "
        "cdnow-sample, or an S3-Rec prefix / CDNOW file path)",
    )
    i.add_argument(
        "--data-dir",
        default=None,
        help="folder of the bundled datasets (default: $ECOMREC_DATA_DIR)",
    )
    i.add_argument("--out", required=True, help="dataset folder to write")
    add_contract_arguments(i)
    i.add_argument("--name", default=None, help="dataset name (default: the --out folder name)")
    i.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset folder at --out"
    )
    i.add_argument("--json", action="store_true", help="print the drop report as JSON")
    i.set_defaults(func=_import)

    li = dsub.add_parser(
        "import-live",
        help="add the live event log's events since the dataset's recorded log position to a "
        "history folder and import it (the contract import; docs/events.md), e.g. before "
        "`ecomrec refresh`",
        formatter_class=_FMT,
    )
    where = li.add_mutually_exclusive_group(required=True)
    where.add_argument("--log", default=None, help="the embedded event log (SQLite file)")
    where.add_argument(
        "--nats",
        default=None,
        help="NATS JetStream servers of the distributed log, comma-separated "
        "(nats://nats-0:4222,...)",
    )
    li.add_argument(
        "--nats-stream", default="ECOMREC_EVENTS", help="JetStream stream of the live log"
    )
    li.add_argument(
        "--events",
        required=True,
        help="history folder of .parquet parts; the live events are added to it as "
        "live-<first>-<last>.parquet",
    )
    li.add_argument("--items", default=None, help="catalogue file (as for `data import`)")
    li.add_argument(
        "--out",
        required=True,
        help="dataset folder to write (replaced); its lineage records the consumed position",
    )
    add_contract_arguments(li)
    li.add_argument("--name", default=None, help="dataset name (default: the --out folder name)")
    li.add_argument("--json", action="store_true", help="print the result as JSON")
    li.set_defaults(func=_import_live)

    s = dsub.add_parser(
        "synth",
        help="write a realistic synthetic shop in the data contract (events.csv, catalogue.csv)",
        formatter_class=_FMT,
    )
    s.add_argument("--customers", type=int, default=400, help="number of customers")
    s.add_argument("--products", type=int, default=80, help="number of products")
    s.add_argument("--days", type=int, default=365, help="length of the event log in days")
    s.add_argument("--end", default="2026-06-30", help="last day of the log (UTC, YYYY-MM-DD)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same shop)")
    s.add_argument(
        "--format", choices=["csv", "parquet"], default="csv", help="file format to write"
    )
    s.add_argument(
        "--out",
        required=True,
        help="folder for events.* and catalogue.*; it also works as --dataset",
    )
    s.set_defaults(func=_synth)

    v = dsub.add_parser(
        "save",
        help="load a dataset (any --dataset form) and save it as a dataset folder",
        formatter_class=_FMT,
    )
    _dataset_arg(v)
    v.add_argument("--out", required=True, help="dataset folder to write")
    v.set_defaults(func=_save)


def _describe(args: argparse.Namespace) -> int:
    from intake.loaders import load_dataset

    ds = load_dataset(args.dataset, args.data_dir)
    info = ds.describe()
    info["fingerprint"] = ds.fingerprint()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    q = info["seq_len_quantiles"]
    assert isinstance(q, dict)
    print(f"dataset        {info['dataset']}  (fingerprint {info['fingerprint']['id']})")  # type: ignore[index]
    print(f"users          {info['users']:,} ({info['active_users']:,} with events)")
    print(f"items          {info['items']:,} ({info['items_with_title']:,} with a title)")
    print(f"interactions   {info['interactions']:,}  {info['event_types']}")
    print(
        "seq length     "
        + "  ".join(f"{k} {v:g}" for k, v in q.items())
        + f"  mean {info['seq_len_mean']:.2f}"
    )
    print(f"time range     {info['time_range'][0]} .. {info['time_range'][1]} (UTC)")  # type: ignore[index]
    print(str(ds.report))
    return 0


def add_contract_arguments(p: argparse.ArgumentParser) -> None:
    """The data-contract options (docs/data.md), shared by ``data import`` and the ingest."""
    p.add_argument(
        "--map",
        default=None,
        metavar="CANONICAL=SOURCE,...",
        help="column mapping, e.g. customer_id=CustomerID,product_id=StockCode,"
        "items.title=Description (prefix events./items. to target one file); a column "
        "no file has is an error",
    )
    p.add_argument(
        "--mapping",
        default=None,
        metavar="TOML",
        help="TOML with a [columns] table (canonical = 'Source') and any option below "
        "(timezone, timestamp_format, returns, not_products = [...], ...); flags given "
        "here win",
    )
    p.add_argument(
        "--timezone",
        default=None,
        help="shop time zone for timestamps without an offset (IANA name; default: UTC)",
    )
    p.add_argument(
        "--timestamp-format",
        default=None,
        help="strftime format for text timestamps that are not ISO 8601, e.g. '%%m/%%d/%%Y %%H:%%M'",
    )
    p.add_argument(
        "--unknown-products",
        choices=["drop", "keep"],
        default=None,
        help="events for products not in the catalogue (default: drop, counted)",
    )
    p.add_argument(
        "--event-type",
        default=None,
        metavar="TYPE",
        help="type of rows without one (no event_type column, or an empty cell): view, cart, "
        "purchase or return (default: purchase); e.g. view for a click log",
    )
    p.add_argument(
        "--returns",
        default=None,
        metavar="RULE",
        help="purchase rows that are returns: 'COLUMN OP VALUE', e.g. 'order_id startswith C' "
        "(cancelled invoices) or 'quantity < 0'; OP: startswith endswith contains matches "
        "= != < <= > >=",
    )
    p.add_argument(
        "--not-products",
        default=None,
        metavar="ID,...",
        help="product ids that are not products (postage, fees, adjustments), exactly as "
        "written, e.g. 'POST,DOT,M,C2,BANK CHARGES'; their rows are dropped and counted",
    )
    p.add_argument(
        "--not-products-pattern",
        default=None,
        metavar="REGEX",
        help="more non-product ids: a regular expression matched against the whole id, "
        "e.g. 'gift_.*'",
    )
    p.add_argument(
        "--currency",
        default=None,
        help="the shop's currency (GBP, EUR, ...), kept with the dataset for reports",
    )
    p.add_argument(
        "--now",
        default=None,
        help="ISO date-time for the future-timestamp check (default: the current time)",
    )


def contract_options(args: argparse.Namespace, default_name: str) -> Any:
    """:class:`ContractOptions` from ``--mapping`` TOML, then the flags given (flags win)."""
    from ecomrec.config import load_toml
    from ecomrec.errors import ConfigError
    from intake.loaders.contract import (
        ContractOptions,
        options_from_toml,
        parse_list,
        parse_mapping,
    )

    fields: dict[str, Any] = {}
    if args.mapping:
        fields.update(options_from_toml(load_toml(args.mapping), args.mapping))
    cols = dict(fields.get("columns", ()))
    cols.update(dict(parse_mapping(args.map)))
    fields["columns"] = tuple(cols.items())
    for flag in (
        "timezone",
        "timestamp_format",
        "unknown_products",
        "event_type",
        "returns",
        "not_products_pattern",
        "currency",
    ):
        if getattr(args, flag):
            fields[flag] = getattr(args, flag)
    if args.not_products:
        fields["not_products"] = parse_list(args.not_products)
    if args.now:
        try:
            now = dt.datetime.fromisoformat(args.now)
        except ValueError:
            raise ConfigError(f"--now {args.now!r} is not an ISO date-time") from None
        fields["now"] = int((now if now.tzinfo else now.replace(tzinfo=dt.UTC)).timestamp())
    fields["name"] = getattr(args, "name", None) or fields.get("name") or default_name
    return ContractOptions(**fields)


def _import(args: argparse.Namespace) -> int:
    from ecomrec.errors import ConfigError, DataError
    from intake.loaders import load_dataset
    from intake.loaders.contract import load_contract

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DataError(
            "already exists; choose another --out or pass --overwrite to replace it",
            file=str(out),
        )
    if args.bundled:
        if args.events or args.items:
            raise ConfigError("give either --bundled or --events/--items, not both")
        ds = load_dataset(args.bundled, args.data_dir)
    elif args.events:
        ds = load_contract(args.events, args.items, contract_options(args, out.name))
    else:
        raise ConfigError("give --events FILE (and --items FILE) or --bundled NAME")
    if out.exists() and not (out / "dataset.json").exists():
        if out.is_file() or any(out.iterdir()):
            raise DataError("exists and is not a dataset folder; not replacing it", file=str(out))
        shutil.rmtree(out)
    ds.save(out)
    if args.json:
        print(json.dumps({"report": ds.report.to_dict(), "fingerprint": ds.fingerprint()}))
        return 0
    print(str(ds.report))
    info = ds.describe()
    print(
        f"wrote {out}: {ds.n_users:,} customers, {ds.n_items:,} products, "
        f"{ds.events.height:,} events {info['event_types']}, "
        f"{info['time_range'][0]} .. {info['time_range'][1]} (UTC), "  # type: ignore[index]
        f"fingerprint {ds.fingerprint()['id']}"
    )
    return 0


def _import_live(args: argparse.Namespace) -> int:
    from intake.live_import import import_with_live
    from intake.live_log import EventLog, SqliteEventLog

    event_log: EventLog
    if args.log:
        if not Path(args.log).is_file():
            from ecomrec.errors import DataError

            raise DataError("no event log here", file=args.log)
        event_log = SqliteEventLog(args.log)
    else:
        from intake.live_log_nats import NatsEventLog, NatsLogConfig

        servers = tuple(u.strip() for u in args.nats.split(",") if u.strip())
        event_log = NatsEventLog(NatsLogConfig(servers=servers, stream=args.nats_stream))
    try:
        out = Path(args.out)
        ds, part = import_with_live(
            event_log, args.events, out, args.items, contract_options(args, out.name)
        )
    finally:
        event_log.close()
    result = {
        "position": part.position,
        "after": part.after,
        "live_events": part.events,
        "part": str(part.path) if part.path else None,
        "fingerprint": ds.fingerprint(),
        "report": ds.report.to_dict(),
    }
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    print(str(ds.report))
    print(
        f"wrote {out}: {part.events:,} live events (log positions {part.after + 1}.."
        f"{part.position}), {ds.events.height:,} events in all, "
        f"fingerprint {ds.fingerprint()['id']}"
    )
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ecomrec.errors import ConfigError
    from intake.synthetic import ShopConfig, write_shop

    if args.customers < 1 or args.products < 1 or args.days < 1:
        raise ConfigError("--customers, --products and --days must be >= 1")
    cfg = ShopConfig(
        customers=args.customers,
        products=args.products,
        days=args.days,
        end=args.end,
        seed=args.seed,
    )
    ep, cp = write_shop(cfg, args.out, args.format)
    print(f"wrote {ep} and {cp} (use --dataset {args.out}, or `ecomrec data import`)")
    return 0


def _save(args: argparse.Namespace) -> int:
    from intake.loaders import load_dataset

    ds = load_dataset(args.dataset, args.data_dir)
    ds.save(args.out)
    print(f"saved {ds.name} to {args.out} (fingerprint {ds.fingerprint()['id']})")
    return 0
