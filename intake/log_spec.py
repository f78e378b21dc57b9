"""Which event log a command names: ``nats://host:4222[,nats://...]`` (the JetStream log of
:mod:`intake.live_log_nats`) or the path of the embedded SQLite log (:mod:`intake.live_log`).
``ecomrec refresh --event-log``, ``report online --event-log`` and ``refresh --decide`` open
their log here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecomrec.errors import DataError
from intake.live_log import EventLog, SqliteEventLog

NATS_SCHEMES = ("nats://", "tls://")


def is_nats_spec(spec: str) -> bool:
    """Whether ``spec`` names NATS servers (``nats://host:4222[,nats://...]``), not a file."""
    return spec.strip().startswith(NATS_SCHEMES)


def open_event_log(
    spec: str, stream: str = "ECOMREC_EVENTS", what: str = "--event-log"
) -> tuple[EventLog, dict[str, Any]]:
    """The log ``spec`` names and how a lineage or report names it:
    ``nats://host:4222[,nats://...]`` (the JetStream log, stream ``stream``) or the path of
    the embedded SQLite log, which must exist (a reader never creates an empty log);
    ``what`` names the option in the error."""
    spec = spec.strip()
    if is_nats_spec(spec):
        from intake.live_log_nats import NatsEventLog, NatsLogConfig

        servers = tuple(u.strip() for u in spec.split(",") if u.strip())
        nats = NatsEventLog(NatsLogConfig(servers=servers, stream=stream))
        return nats, {"stream": stream, "servers": list(servers)}
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"no event log here ({what})", file=spec)
    return SqliteEventLog(path), {"path": str(path.resolve())}
