"""``ecomrec refresh``: the scheduled continual-refresh job (see docs/lifecycle.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ecomrec.errors import EcomrecError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``refresh`` command."""
    from ecomrec.config import add_config_args

    p = sub.add_parser(
        "refresh",
        help="warm-start a candidate on new events, shadow-evaluate, promote model + index safely",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Exit codes: 0 promoted, 2 bad input (nothing changed), 3 candidate not promoted "
            "(live kept), 4 no new data, 5 promoted with a drift alert, 6 candidate staged for "
            "an online A/B test, or its test still running ([refresh] promote = 'online'), "
            "75 another refresh is running."
        ),
    )
    p.add_argument(
        "--run",
        default=None,
        help="live run directory (bootstraps the state); required but with --decide",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="dataset name or path (all events so far); required but with --decide",
    )
    p.add_argument(
        "--data-dir", default=None, help="data directory; $ECOMREC_DATA_DIR when not given"
    )
    p.add_argument("--index", required=True, help="index directory (embedded Qdrant)")
    add_config_args(
        p,
        tables="[refresh], [drift] and [index] tables (e.g. the deployment's serve.toml; its "
        "[serve] table is ignored)",
        example="refresh.epochs=3",
    )
    p.add_argument("--state", default=None, help="state directory; <index>.refresh when not given")
    p.add_argument(
        "--since",
        default=None,
        help="first refresh only: YYYY-MM-DD, the first day the live model was not trained on",
    )
    p.add_argument("--rollback", action="store_true", help="make the previous deployment live")
    p.add_argument(
        "--event-log",
        default=None,
        help="read the live event log first (overrides refresh.event_log; default: none): the "
        "embedded log's SQLite file or nats://host:4222[,nats://...]; its events after the "
        "position --dataset consumed are imported into --dataset (a folder written by `ecomrec "
        "data import --events FOLDER`) once the refresh has decided (docs/lifecycle.md). While "
        "an online test runs, a SQLite log is also where the online report is computed from "
        "(the answers served since the candidate was staged; docs/outcomes.md)",
    )
    p.add_argument(
        "--events",
        default=None,
        help="with --event-log: the history folder of Parquet parts the live events are added "
        "to (default: the one --dataset was imported from)",
    )
    p.add_argument(
        "--items",
        default=None,
        help="with --event-log: the catalogue file (default: the one --dataset was imported from)",
    )
    p.add_argument(
        "--log-after",
        type=int,
        default=None,
        help="with --event-log, first read of the log only: the log position --dataset's "
        "history already holds (default: what its dataset.json records, else 0)",
    )
    p.add_argument(
        "--decide",
        action="store_true",
        help="only decide the staged candidate's online test (promote / reject / keep "
        "waiting, docs/outcomes.md); exit 2 when nothing is staged",
    )
    p.add_argument(
        "--online-report",
        default=None,
        metavar="JSON",
        help="online.json of `ecomrec report online` (the variants since the test started): "
        "what --decide, or a refresh while a test runs, decides on",
    )
    p.add_argument(
        "--served-log",
        action="append",
        default=[],
        metavar="DB",
        help="with --event-log: a served-recommendation log (serve.served_log) when it is not "
        "in the event log's file; repeat it for every replica's (required with a NATS log; "
        "default: none)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from intake.log_spec import is_nats_spec
    from lifecycle.refresh import EXIT_LOCKED, load_config, result_json
    from lifecycle.state import RefreshLockedError

    try:
        cfg, index_cfg = load_config(args.config, args.set)
        event_log = args.event_log or cfg.event_log
        report = _online_report(args.online_report) if args.online_report else None
        # a NATS log holds no served answers: its report needs the replicas' --served-log
        if report is None and event_log and (not is_nats_spec(event_log) or args.served_log):
            report = _report_from_logs(args, event_log, cfg.event_log_stream)
        if args.decide:
            return _decide(args, cfg, index_cfg, report)
        if not args.run or not args.dataset:
            raise EcomrecError("refresh: --run and --dataset are required (but with --decide)")
        if args.rollback:
            return _rollback(args, index_cfg)
        if event_log:
            res = _refresh_from_log(args, cfg, index_cfg, report)
        else:
            res = _refresh_dataset(args, cfg, index_cfg, report)
    except RefreshLockedError as e:
        print(f"ecomrec: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except EcomrecError:
        raise
    out = result_json(res)
    if args.json:
        print(json.dumps(out, indent=2, default=float))
    else:
        print(f"{res.decision}: {res.reason}")
        if res.report_dir:
            print(f"report: {res.report_dir}/drift.html")
        for a in res.alerts:
            print(f"ALERT: {a}")
    return res.exit_code


def _since(args: argparse.Namespace) -> int | None:
    if not args.since:
        return None
    import datetime as dt

    try:
        d = dt.datetime.fromisoformat(args.since)
    except ValueError as e:
        raise EcomrecError(f"--since {args.since!r}: want YYYY-MM-DD") from e
    return int((d if d.tzinfo else d.replace(tzinfo=dt.UTC)).timestamp())


def _refresh_from_log(
    args: argparse.Namespace, cfg: Any, index_cfg: dict[str, Any], report: Any
) -> Any:
    """``--event-log``: the log's new events into ``--dataset``, then the refresh."""
    from intake.log_spec import open_event_log
    from lifecycle.live_loop import refresh_from_log
    from lifecycle.refresh import default_state_dir

    if not (Path(args.dataset) / "dataset.json").is_file():
        raise EcomrecError(
            f"--dataset {args.dataset}: with an event log, give the dataset folder written by "
            "`ecomrec data import --events FOLDER --out DIR` (it records the history folder "
            "and the log position consumed)"
        )
    event_log, name = open_event_log(
        args.event_log or cfg.event_log, cfg.event_log_stream, "refresh.event_log / --event-log"
    )
    try:
        return refresh_from_log(
            args.run,
            args.dataset,
            args.index,
            event_log,
            log_name=name,
            events=args.events,
            items=args.items,
            config=cfg,
            index_cfg=index_cfg,
            state_dir=args.state or default_state_dir(args.index),
            since=_since(args),
            log_after=args.log_after,
            online_report=report,
        )
    finally:
        event_log.close()


def _refresh_dataset(
    args: argparse.Namespace, cfg: Any, index_cfg: dict[str, Any], report: Any
) -> Any:
    """``--dataset`` as it is: all events so far."""
    from intake.loaders import load_dataset
    from lifecycle.refresh import default_state_dir, refresh

    ds = load_dataset(args.dataset, args.data_dir)
    if ds.report.rows_dropped:
        log.info("drop report: %s", ds.report)
    return refresh(
        args.run,
        ds,
        args.index,
        config=cfg,
        index_cfg=index_cfg,
        state_dir=args.state or default_state_dir(args.index),
        since=_since(args),
        online_report=report,
    )


def _online_report(path: str) -> dict[str, object]:
    from ecomrec.errors import DataError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the online report: {e}", file=path) from e
    if not isinstance(data, dict) or "variants" not in data:
        raise DataError(
            "not an online report (no 'variants'): see `ecomrec report online`", file=path
        )
    return data


def _report_from_logs(
    args: argparse.Namespace, event_log: str, stream: str
) -> dict[str, Any] | None:
    """The online report of the staged test from the service's logs (None: no test)."""
    import datetime as dt

    from lifecycle.online import read_staged
    from lifecycle.refresh import default_state_dir
    from outcomes.report import online_report

    staged = read_staged(Path(args.state or default_state_dir(args.index)))
    if staged is None:
        return None
    since = dt.datetime.fromtimestamp(float(staged["started_at"]), dt.UTC)
    return online_report(
        event_log,
        since,
        served_log=args.served_log or None,
        baseline=staged["baseline"],
        stream=stream,
    )


def _decide(args: argparse.Namespace, cfg: Any, index_cfg: dict[str, Any], report: Any) -> int:
    from ecomrec.errors import NotFoundError
    from indexing.base import IndexConfig
    from lifecycle.online import read_staged
    from lifecycle.refresh import decide_online, default_state_dir, result_json
    from lifecycle.state import refresh_lock

    state = Path(args.state or default_state_dir(args.index))
    icfg = IndexConfig.from_dict({**index_cfg, "location": str(args.index)})
    with refresh_lock(state):
        if read_staged(state) is None:
            raise NotFoundError(f"refresh --decide: no staged candidate in {state}")
        res = decide_online(state, icfg, cfg, report)
    if args.json:
        print(json.dumps(result_json(res), indent=2, default=float))
    else:
        print(f"{res.decision}: {res.reason}")
    return res.exit_code


def _rollback(args: argparse.Namespace, index_cfg: dict[str, object]) -> int:
    from indexing.base import IndexConfig
    from indexing.build import open_store, publish_version
    from indexing.deploy import DeployState
    from lifecycle.refresh import default_state_dir
    from lifecycle.state import refresh_lock

    state = Path(args.state or default_state_dir(args.index))
    with refresh_lock(state):
        rec = DeployState(state).rollback()
        store = open_store(IndexConfig.from_dict({**index_cfg, "location": str(args.index)}))
        try:
            publish_version(store, rec.index_version, rec.index_alias)
        finally:
            store.close()
    print(f"rolled back: live {rec.run}, index {rec.index_version}")
    return 0
