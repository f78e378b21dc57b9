"""The loop closes: ``ecomrec refresh --event-log`` reads the live event log itself.

A refresh with an event log (docs/lifecycle.md, "Reading the live log"), under the state's
lock:

1. the dataset folder (``--dataset``, written by ``ecomrec data import --events FOLDER`` or
   ``data import-live``) names its history folder of Parquet parts, its catalogue and its
   contract options (``dataset.json`` ``extra``), and the log position it consumed last
   (``extra.live_log.position``; 0 for a dataset that never consumed the log);
2. the log's events after that position are added to the history folder as one part and
   the folder is imported with the contract code (:func:`intake.live_import.import_live`:
   the same validation, cleaning and id maps as ``data import``, so the same events give the
   same fingerprint); the customers forgotten in the dataset folder stay forgotten;
3. the refresh runs on that dataset (:func:`lifecycle.refresh.refresh`'s steps); its
   decision record, the promoted run's manifest and the deploy record carry
   ``live_log = {log, from_position, to_position, events, part}``;
4. only once the refresh has decided (promoted or not) is the dataset folder replaced
   (atomically, :meth:`Dataset.save`): that write is the commit of the consumed position,
   and the next refresh reads after it. A refresh that fails leaves the folder, and so the
   position, as it was; the part it wrote is dropped and exported again next time.

Nothing new in the log (and a deployment already recorded) -> ``no-new-data`` (exit 4)
without training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ecomrec.errors import ConfigError
from indexing.base import IndexConfig
from indexing.deploy import DeployState, write_json_atomic
from intake.dataset import Dataset
from intake.live_import import consumed_position, import_live, recorded_options
from intake.live_log import EventLog
from lifecycle.refresh import (
    EXIT_NO_NEW_DATA,
    RefreshConfig,
    RefreshResult,
    _refresh_locked,
    decide_online,
    default_state_dir,
)
from lifecycle.state import refresh_lock

log = logging.getLogger(__name__)


def refresh_from_log(
    run: str | Path,
    dataset_dir: str | Path,
    index: str | Path,
    event_log: EventLog,
    *,
    log_name: dict[str, Any] | None = None,
    events: str | Path | None = None,
    items: str | Path | None = None,
    config: RefreshConfig | None = None,
    index_cfg: dict[str, Any] | None = None,
    state_dir: str | Path | None = None,
    since: int | None = None,
    log_after: int | None = None,
    online_report: dict[str, Any] | None = None,
) -> RefreshResult:
    """One refresh on the dataset at ``dataset_dir`` plus the log's events it has not
    consumed yet (see the module docstring). ``events`` / ``items``: the history folder and
    catalogue, by default those the dataset was imported from. ``log_after``: for a dataset
    that never consumed the log, the position its history already holds (a history export
    that overlaps events the shop also sent to the log); refused once a position is
    recorded. While an online test runs (a staged candidate), the refresh only decides it on
    ``online_report`` and the log is not read (its events wait for the next refresh)."""
    cfg = config or RefreshConfig()
    state = Path(state_dir) if state_dir else default_state_dir(index)
    icfg = IndexConfig.from_dict({**(index_cfg or {}), "location": str(index)})
    dsdir = Path(dataset_dir)
    with refresh_lock(state):
        if (state / "staged.json").exists():  # an online test runs: decide it, train nothing
            return decide_online(state, icfg, cfg, online_report)
        current = Dataset.load(dsdir)
        options = recorded_options(current)
        history = Path(events) if events else _recorded_path(current, "events_file", dsdir)
        if not history.is_dir():
            raise ConfigError(
                f"{history}: the history of dataset {dsdir} must be a folder of Parquet parts "
                "to add live events to (`ecomrec data import --events FOLDER`); give it with "
                "--events"
            )
        cat = items if items else current.extra.get("items_file")
        catalogue = Path(str(cat)) if cat else None
        after = consumed_position(dsdir)
        if log_after is not None:
            if isinstance(current.extra.get("live_log"), dict):
                raise ConfigError(
                    f"--log-after {log_after}: dataset {dsdir} already records the log "
                    f"position it consumed ({after}); --log-after is for its first refresh"
                )
            if log_after < 0:
                raise ConfigError(f"--log-after {log_after}: want a log position >= 0")
            after = log_after
        head = event_log.position()
        if head < after:
            raise ConfigError(
                f"the event log is at position {head}, but dataset {dsdir} already holds it "
                f"up to {after}: another (or a reset) log? ({log_name})"
            )
        deploy = DeployState(state)
        if head == after and deploy.exists():
            return _no_new_data(deploy, state, after, log_name)
        ds, part = import_live(event_log, history, catalogue, options, after)
        from intake.tombstones import Tombstones

        ds, _ = Tombstones.read(dsdir).apply(ds)  # forgotten customers stay forgotten
        lineage = {
            "log": log_name or {},
            "from_position": after,
            "to_position": part.position,
            "events": part.events,
            "part": part.path.name if part.path else None,
        }
        ds.extra["live_log"] = {**dict(ds.extra["live_log"]), "log": log_name or {}}  # type: ignore[call-overload]
        log.info(
            "refresh: %d live events (positions %d..%d) from %s",
            part.events, after + 1, part.position, log_name,
        )  # fmt: skip
        res = _refresh_locked(Path(run), ds, icfg, cfg, state, since, live_log=lineage)
        # the refresh decided: commit the consumed position (a failure above leaves it)
        ds.save(dsdir)
        return res


def _recorded_path(ds: Dataset, key: str, dsdir: Path) -> Path:
    value = ds.extra.get(key)
    if not value:
        raise ConfigError(f"dataset {dsdir} records no {key}; give the history with --events")
    return Path(str(value))


def _no_new_data(
    deploy: DeployState, state: Path, position: int, log_name: dict[str, Any] | None
) -> RefreshResult:
    live = deploy.live()
    reason = f"no new event in the live log after position {position}"
    dec = {
        "decision": "no-new-data",
        "reason": reason,
        "live_run": live.run,
        "live_model_version": live.model_version,
        "data_until": live.data_until,
        "live_log": {
            "log": log_name or {},
            "from_position": position,
            "to_position": position,
            "events": 0,
            "part": None,
        },
    }
    report_dir = state / "reports" / f"refresh-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_dir / "decision.json", dec)
    log.info("refresh: %s", reason)
    return RefreshResult("no-new-data", EXIT_NO_NEW_DATA, reason, report_dir, None, {}, {}, [])
