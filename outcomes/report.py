"""The online report: ``online_report(...) -> dict`` (online.json) and its HTML page."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any


def online_report(
    event_log: str | Path,
    since: datetime,
    until: datetime | None = None,
    *,
    served_log: str | Path | None = None,
    baseline: str | None = None,
    confidence: float = 0.95,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The report's JSON (docs/outcomes.md); with ``out`` also writes online.json + online.html."""
    raise NotImplementedError("outcomes.report.online_report: attr's next commit")


def run_online_report(args: argparse.Namespace) -> int:
    raise NotImplementedError("ecomrec report online: attr's next commit")
