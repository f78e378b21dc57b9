"""``ecomrec customers forget``: the live log, the dataset folder, derived files and the
stored user vectors (``lifecycle.forget``). Registered under the ``customers`` command that
``segments.cli`` creates (this module may import both intake and indexing; segments may
not import indexing)."""

from __future__ import annotations

import argparse


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError(f"{parser.prog} has no subcommands")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``forget`` to the ``customers`` command (when segments' CLI registered it)."""
    customers = sub.choices.get("customers")
    if customers is None:  # segments' CLI could not be imported: no `customers` command
        return
    p = _subcommands(customers).add_parser(
        "forget",
        help="remove a customer from the live log, the dataset folder, derived files and "
        "the user-vector collection (docs/events.md); prints a receipt, exit 1 if a trace "
        "is still found",
    )
    p.add_argument("customer", metavar="ID", help="external customer id (as in the events)")
    p.add_argument(
        "--dataset", required=True, help="the saved dataset folder (ecomrec data import --out)"
    )
    p.add_argument(
        "--event-log", default=None, help="the embedded live event log file (serve's event_log)"
    )
    p.add_argument(
        "--nats", default=None, help="NATS servers of the replicated log, comma-separated"
    )
    p.add_argument(
        "--artifacts",
        nargs="*",
        default=[],
        help="derived folders to clean and search: segments/export outputs, batch outputs",
    )
    p.add_argument(
        "--key",
        action="append",
        default=[],
        help="a pseudonymisation key in use (segments export salt, serve's pseudonym_salt); "
        "repeatable",
    )
    p.add_argument(
        "--index",
        default=None,
        help="the index holding the user-vector collection (`ecomrec index build --users`): "
        "an embedded directory (searched for traces too) or a Qdrant URL; not given: user "
        "vectors are not touched",
    )
    p.add_argument("--users-alias", default="users", help="the user collection's alias in --index")
    p.set_defaults(func=_forget)


def _forget(args: argparse.Namespace) -> int:
    from intake.live_log import EventLog, SqliteEventLog
    from lifecycle.forget import forget_everywhere, user_index_config

    user_index = user_index_config(args.index or "")
    event_log: EventLog | None = None
    if args.event_log:
        event_log = SqliteEventLog(args.event_log)
    elif args.nats:
        from intake.live_log_nats import NatsEventLog, NatsLogConfig

        event_log = NatsEventLog(NatsLogConfig(servers=tuple(args.nats.split(","))))
    try:
        receipt = forget_everywhere(
            args.customer,
            args.dataset,
            event_log=event_log,
            artifacts=args.artifacts,
            keys=args.key,
            user_index=user_index,
            users_alias=args.users_alias,
        )
    finally:
        if event_log is not None:
            event_log.close()
    print("\n".join(receipt.lines()))
    return 1 if receipt.leftover else 0
