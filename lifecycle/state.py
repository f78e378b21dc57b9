"""The refresh state directory: the deploy manifest (live model + index version + lineage),
the lock that keeps two refreshes from overlapping, and atomic writes.

Layout of ``STATE`` (default ``<index dir>.refresh``)::

    deploy.json        {"live": Record, "history": [Record, ...]}  (os.replace: all or nothing)
    refresh.lock       flock held by the running refresh
    runs/<name>/       promoted (or candidate) run: model.pt, manifest.json, dataset/, onnx/
    reports/<name>/    decision.json, drift.json, drift.html of every refresh
    tmp/               work in progress (removed by the next refresh)

Serving reads ``deploy.json`` (``serving/reload.py``): ``live.run`` + ``live.dataset`` +
``live.index_version`` are one consistent set.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecomrec.errors import DataError, EcomrecError

DEPLOY_FILE = "deploy.json"
LOCK_FILE = "refresh.lock"


class RefreshLockedError(EcomrecError):
    """Another refresh holds the lock of this state directory."""


@dataclass(frozen=True)
class Record:
    """One deployed (or bootstrapped) model + index pair and where it came from."""

    run: str  # run directory (model.pt)
    model_version: str
    index_location: str
    index_alias: str
    index_version: str
    dataset: str | None  # saved Dataset directory the model was trained on (serving history)
    data_from: int | None  # unix seconds: first event of the data this refresh added
    data_until: int  # unix seconds: events with ts < data_until were used
    n_events: int
    parent_run: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    name: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file + fsync + os.replace."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=float, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DeployState:
    """Reads and writes ``STATE/deploy.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def path(self) -> Path:
        return self.root / DEPLOY_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read the deploy manifest: {e}", file=str(self.path)) from e
        if "live" not in data:
            raise DataError("deploy manifest has no 'live' record", file=str(self.path))
        return dict(data)

    def live(self) -> Record:
        return Record.from_dict(self.load()["live"])

    def history(self) -> list[Record]:
        return [Record.from_dict(r) for r in self.load().get("history", [])]

    def promote(self, rec: Record) -> None:
        """Make ``rec`` live; the previous live record goes to the history (lineage)."""
        data = self.load() if self.exists() else {"history": []}
        hist = list(data.get("history", []))
        if "live" in data:
            hist.append(data["live"])
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"live": asdict(rec), "history": hist})

    def rollback(self) -> Record:
        """Make the last history record live again (the current one is dropped from lineage
        into ``rolled_back``)."""
        data = self.load()
        hist = list(data.get("history", []))
        if not hist:
            raise DataError("nothing to roll back to: no earlier deployment", file=str(self.path))
        prev = hist.pop()
        rolled = [*data.get("rolled_back", []), data["live"]]
        write_json_atomic(self.path, {"live": prev, "history": hist, "rolled_back": rolled})
        return Record.from_dict(prev)


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
