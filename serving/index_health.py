"""Index health for the server: is the served index searchable, are its files intact?

:class:`IndexMonitor` checks the live index version in the background (and once at
start-up), logs every change of state once, and tells the server handle, which turns
health NOT_SERVING while the index cannot be searched (see ``docs/serving.md``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: ``get_index()`` result while the servicer has no engine yet (nothing to check).
NOT_ATTACHED = object()


def index_version(index: Any) -> str:
    """The live version's name, "" when there is none or it cannot be read."""
    try:
        return str(index.version)
    except Exception:
        return ""


def index_problem(index: Any, *, full: bool = False) -> tuple[str | None, str | None]:
    """(why the index cannot be searched, why its published files are damaged), None = fine.

    Resolves the live version (which loads and checks a new version) and, for the
    embedded backend, compares the published files with their checksums (``full``:
    hash them; else sizes only).  With a private local copy, damaged published files
    do not affect answers: that is the second element.
    """
    if index is None:
        return "no index loaded", None
    try:
        index.manifest()
    except Exception as e:  # any load failure: IndexUnavailableError, engine errors
        return str(e) or type(e).__name__, None
    check = getattr(index, "check_integrity", None)
    if check is None:
        return None, None
    try:
        rep = check(full=full)
    except Exception as e:
        return str(e) or type(e).__name__, None
    if rep.ok:
        return None, None
    msg = f"index version {rep.version} is damaged: {'; '.join(rep.problems[:3])}"
    if getattr(index, "serves_local_copy", False):
        return None, msg
    return msg, None


class IndexMonitor:
    """Background check of the served index: health, ``ecomrec_index_ok`` and error logs.

    Every ``interval_s`` the live version is resolved and its published files' sizes are
    compared with the checksums (every ``full_every`` checks: full hashes).  A change of
    state is logged once (ERROR when broken, INFO when back).  A size-only check never
    clears damage on its own (a file overwritten with bytes of the same size passes it):
    the state goes back to ok only when the full checksums agree.
    """

    def __init__(
        self,
        handle: Any,
        get_index: Callable[[], Any],
        interval_s: float,
        full_every: int = 10,
    ) -> None:
        self.handle = handle
        self.get_index = get_index
        self.interval_s = interval_s
        self.full_every = max(1, full_every)
        self._stop = threading.Event()
        self._last: tuple[str | None, str | None] = (None, None)
        self._n = 0
        self._thread = threading.Thread(target=self._run, name="ecomrec-index-monitor", daemon=True)

    def start(self) -> IndexMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_now(self) -> tuple[str | None, str | None]:
        """One check (also used at start-up); updates health and logs changes."""
        index = self.get_index()
        if index is NOT_ATTACHED:
            return None, None
        full = self._n % self.full_every == 0
        self._n += 1
        problem, published = index_problem(index, full=full)
        if not full and problem is None and published is None and self._last != (None, None):
            # sizes match again: only the checksums can tell that the contents do too
            problem, published = index_problem(index, full=True)
        if problem != self._last[0]:
            if problem is not None:
                log.error(
                    "index could not be opened: %s; answering from segment popularity "
                    "(degraded, INDEX_UNAVAILABLE) until a valid version is published",
                    problem,
                )
            elif self._last[0] is not None:
                log.info("index available again (version %s)", index_version(index))
        if published is not None and published != self._last[1]:
            log.error(
                "%s; this server keeps answering from its checked private copy, but a "
                "restart will refuse the version: rebuild or roll back the index",
                published,
            )
        if published is None and self._last[1] is not None and problem is None:
            log.info(
                "index version %s: the published files match their checksums again",
                index_version(index),
            )
        self._last = (problem, published)
        self.handle.metrics.index_published_ok.set(0 if published else 1)
        self.handle.set_index_ok(problem is None)
        return problem, published

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_now()
            except Exception:  # never let the monitor die silently
                log.exception("index check failed")
