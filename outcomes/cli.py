"""``ecomrec report online`` (wired into ``ecomrec/cli.py`` by ``register``).

    ecomrec report online --event-log PATH --since 2026-12-01 [--until ...] --out DIR

Heavy imports happen inside the handler.
"""

from __future__ import annotations

import argparse


def _online(args: argparse.Namespace) -> int:
    from outcomes.report import run_online_report

    return run_online_report(args)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rep = sub.add_parser("report", help="reports on live traffic: online outcomes per variant")
    rs = rep.add_subparsers(dest="report_command", required=True, metavar="REPORT")
    p = rs.add_parser(
        "online",
        help="impressions, CTR, add-to-cart rate, conversion, revenue per 1,000 "
        "recommendations per variant and model version, with intervals (HTML + JSON)",
    )
    p.add_argument(
        "--event-log",
        required=True,
        help="the service's SQLite event log (serve.toml event_log; its served-recommendation "
        "table is read too), or its NATS JetStream log as nats://host:4222[,nats://...] "
        '(event_backend = "nats"; then give --served-log)',
    )
    p.add_argument(
        "--served-log",
        action="append",
        default=[],
        metavar="DB",
        help="a served-recommendation log (serve.toml served_log) when it is not the event "
        "log's own file; repeat it for every replica's, merged by time (default: the event "
        "log file; required with a NATS log)",
    )
    p.add_argument(
        "--stream",
        default="ECOMREC_EVENTS",
        help="with a NATS --event-log: the JetStream stream (the service's stream; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--since",
        required=True,
        help="first day / instant of recommendations counted (ISO 8601, e.g. 2026-12-01 or "
        "2026-12-01T08:00:00+00:00; UTC when no offset)",
    )
    p.add_argument(
        "--until",
        default=None,
        help="end (exclusive) of recommendations counted (ISO 8601; default: now)",
    )
    p.add_argument("--out", required=True, help="output folder: online.json + online.html")
    p.add_argument(
        "--baseline",
        default=None,
        help="variant the others are compared with (default: 'control', else 'default', "
        "else the variant with the most recommendations)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="confidence level of the intervals",
    )
    p.set_defaults(func=_online)
