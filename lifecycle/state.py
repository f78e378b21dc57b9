"""The refresh state directory and the lock that keeps two refreshes from overlapping.

The deploy manifest itself (live model + index version + lineage) is
:mod:`indexing.deploy`, shared with the service that reads it.

Layout of ``STATE`` (default ``<index dir>.refresh``)::

    deploy.json        {"live": Record, "history": [Record, ...]}  (os.replace: all or nothing)
    refresh.lock       flock held by the running refresh
    runs/<name>/       promoted (or candidate) run: model.pt, manifest.json, dataset/, onnx/
    reports/<name>/    decision.json, drift.json, drift.html of every refresh
    tmp/               work in progress (removed by the next refresh)

Serving reads ``deploy.json`` (``serving/reload.py``) through :mod:`indexing.deploy`.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ecomrec.errors import EcomrecError

LOCK_FILE = "refresh.lock"


class RefreshLockedError(EcomrecError):
    """Another refresh holds the lock of this state directory."""


@contextmanager
def refresh_lock(root: Path) -> Iterator[None]:
    """Exclusive, non-blocking flock on ``root/refresh.lock`` (released by the kernel when
    the process dies, so a killed refresh never leaves a stale lock)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise RefreshLockedError(
                f"another refresh is running on {root} (lock held by {holder or 'unknown'})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


def link_current(state: Path, target: Path) -> None:
    """Point ``state/current`` at ``target`` (a new symlink renamed over the old one)."""
    tmp_link = state / ".current.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(target.resolve())
    os.replace(tmp_link, state / "current")
