"""``ecomrec batch embed-users|assign-segments|embed-items``: sharded jobs on Dask."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``batch`` subcommand."""
    p = sub.add_parser(
        "batch",
        help="sharded batch jobs over all customers/products on Dask (resumable)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("job", choices=["embed-users", "assign-segments", "embed-items"], help="job")
    p.add_argument("--out", required=True, help="output directory (one Parquet file per shard)")
    p.add_argument("--run", default=None, help="trained run directory (embed-users, embed-items)")
    p.add_argument(
        "--sequences", default=None, help="ingest output directory (python -m intake.ingest)"
    )
    p.add_argument("--embeddings", default=None, help="embed-users output (assign-segments)")
    p.add_argument(
        "--segments-model",
        default=None,
        help="segments_model.json or an ecomrec segments export directory",
    )
    p.add_argument(
        "--items", default=None, help="catalogue Parquet (canonical items; default: the model's)"
    )
    p.add_argument("--shard-rows", type=int, default=50_000, help="embed-items rows per shard")
    p.add_argument(
        "--scheduler",
        default=None,
        help="address of a running Dask scheduler (tcp://host:8786); default: a local cluster",
    )
    p.add_argument("--workers", type=int, default=2, help="local cluster worker processes")
    p.add_argument(
        "--in-process", action="store_true", help="no Dask: run the shards in this process"
    )
    p.add_argument("--retries", type=int, default=2, help="retries of a shard whose worker died")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lifecycle.batch import plan_shards, report_dict, run_job

    inputs: dict[str, Any] = {
        "run_dir": args.run,
        "sequences": args.sequences,
        "embeddings": args.embeddings,
        "segments_model": args.segments_model,
        "items": args.items,
        "shard_rows": args.shard_rows,
    }
    plan_shards(args.job, args.out, **inputs)  # bad inputs fail before a cluster starts
    if args.in_process:
        rep = run_job(args.job, args.out, None, **inputs)
    else:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.WARNING)

        if args.scheduler:
            with Client(args.scheduler) as client:
                rep = run_job(args.job, args.out, client, retries=args.retries, **inputs)
        else:
            with (
                LocalCluster(
                    n_workers=args.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                ) as lc,
                Client(lc) as client,
            ):
                rep = run_job(args.job, args.out, client, retries=args.retries, **inputs)
    d = report_dict(rep)
    d.pop("computed_shards")
    print(json.dumps(d, indent=2))
    return 0
