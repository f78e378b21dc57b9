"""A daemon thread that calls ``check()`` every few seconds until told to stop: what the
deploy-record follower (serving/reload.py) and the A/B experiment file (serving/variants.py)
run to pick up changes without a restart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def poll_in_thread(
    check: Callable[[], object], interval_s: float, stop: threading.Event, name: str, what: str
) -> threading.Thread:
    """Start a daemon thread running ``check()`` every ``interval_s`` until ``stop`` is set.

    A failing check is logged (``"<what> check failed"``) and the next one runs: the watcher
    never dies.
    """

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                check()
            except Exception:  # never let the watcher die
                log.exception("%s check failed", what)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
