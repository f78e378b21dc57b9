"""``ecomrec data ...``: inspect and convert datasets."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect and convert datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser(
        "describe", help="users, items, interactions, sequence lengths, time range, drops"
    )
    d.add_argument(
        "--dataset", required=True, help="name (beauty, online-retail, cdnow, synthetic) or path"
    )
    d.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(func=_describe)
    s = dsub.add_parser("save", help="load a dataset and save it in the canonical Parquet form")
    s.add_argument("--dataset", required=True)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_save)


def _describe(args: argparse.Namespace) -> int:
    from towers.loaders import load_dataset

    ds = load_dataset(args.dataset, args.data_dir)
    info = ds.describe()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    q = info["seq_len_quantiles"]
    assert isinstance(q, dict)
    print(f"dataset        {info['dataset']}")
    print(f"users          {info['users']:,} ({info['active_users']:,} with events)")
    print(f"items          {info['items']:,} ({info['items_with_title']:,} with a title)")
    print(f"interactions   {info['interactions']:,}  {info['event_types']}")
    print(
        "seq length     "
        + "  ".join(f"{k} {v:g}" for k, v in q.items())
        + f"  mean {info['seq_len_mean']:.2f}"
    )
    print(f"time range     {info['time_range'][0]} .. {info['time_range'][1]}")  # type: ignore[index]
    print(str(ds.report))
    return 0


def _save(args: argparse.Namespace) -> int:
    from towers.loaders import load_dataset

    ds = load_dataset(args.dataset, args.data_dir)
    ds.save(args.out)
    print(f"saved {ds.name} to {args.out}")
    return 0
