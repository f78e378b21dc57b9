"""The deploy record: which model run and index version are live, and their lineage.

``STATE/deploy.json`` = ``{"live": Record, "history": [Record, ...], "rolled_back": [...]}``,
written whole with fsync + ``os.replace`` (all or nothing).  It is the contract between
its writer, ``ecomrec refresh`` (:mod:`lifecycle.refresh`), and its reader, a service
following the refreshes (``serving/reload.py``): ``live.run`` + ``live.dataset`` +
``live.index_version`` are one consistent set.  It lives here, low in the import order,
so that both sides see one definition.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecomrec.errors import DataError

DEPLOY_FILE = "deploy.json"


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
    # ecomrec refresh --event-log: {log, from_position, to_position, events, part} consumed
    live_log: dict[str, Any] | None = None

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
