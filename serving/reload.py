"""Hot reload of a promoted model + index into a running service, and rollback.

``ecomrec refresh`` commits each promotion to ``STATE/deploy.json`` (``indexing.deploy``):
``live.run`` (model), ``live.dataset`` (the data snapshot it was trained on: history,
catalogue, id maps) and ``live.index_version`` are one consistent set. An
:class:`EngineReloader` builds a complete new :class:`~serving.engine.Recommender` for
that set off the request path (model loaded, index version pinned, encoder warmed up) and
then swaps it into the servicer with one reference assignment: requests already running
finish on the engine they started with, new ones get the new engine, none fails.

Triggers: :meth:`EngineReloader.check` (manifest changed?), :meth:`watch` (a thread that
polls the manifest), :meth:`install_sighup` (``kill -HUP <pid>``). :meth:`rollback`
swaps the previous engine back in memory (instant); ``ecomrec refresh --rollback`` makes
the previous deployment live on disk, which running services then pick up like a promotion.

The index is opened PINNED to the record's version (not following the alias): the model's
item ids and the index's point ids always come from the same catalogue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from indexing.deploy import DEPLOY_FILE, Record

log = logging.getLogger(__name__)

EngineFactory = Callable[[Record], Any]


def engine_from_record(
    rec: Record,
    cfg: Any,
    *,
    segments_for: Callable[[Any], Any] | None = None,
    metrics: Any = None,
) -> Any:
    """A Recommender over a deploy record: model ``rec.run``, dataset snapshot
    ``rec.dataset``, index version ``rec.index_version`` (pinned). ``segments_for(dataset)``
    builds the segment lookup for that dataset's user ids (none by default)."""
    from ecomrec.errors import NotFoundError
    from indexing.base import IndexConfig
    from indexing.build import open_store
    from intake.dataset import Dataset
    from serving.assemble import build_recommender, load_parts

    if not rec.dataset:
        raise NotFoundError(f"deploy record {rec.name!r} has no dataset snapshot to serve from")
    ds = Dataset.load(rec.dataset)
    parts = load_parts(rec.run, ds)
    store = open_store(IndexConfig(location=rec.index_location, alias=rec.index_alias))
    index = store.open(version=rec.index_version)
    segments = segments_for(ds) if segments_for is not None else None
    return build_recommender(cfg, parts, index, segments, metrics=metrics)


class EngineReloader:
    """Watches ``STATE/deploy.json`` and swaps the servicer's engine on a new live record."""

    def __init__(
        self,
        servicer: Any,
        state_dir: str | Path,
        factory: EngineFactory,
        *,
        keep: int = 2,
        warmup: Callable[[Any], None] | None = None,
    ) -> None:
        self.servicer = servicer
        self.path = Path(state_dir) / DEPLOY_FILE
        self.factory = factory
        self.keep = keep
        self.warmup = warmup
        self._lock = threading.Lock()  # one reload at a time
        self._stamp: tuple[int, int] | None = None
        self.current: Record | None = None
        self.previous: list[tuple[Record | None, Any]] = []  # (record, engine), newest last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.failures = 0

    def _read(self) -> Record | None:
        from indexing.deploy import DeployState

        try:
            return DeployState(self.path.parent).live()
        except Exception as e:  # a half-written file cannot happen (os.replace); a bad one can
            log.error("cannot read %s: %s", self.path, e)
            return None

    def check(self) -> bool:
        """Reload when the manifest changed and names another model/index; True if swapped."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return False
        rec = self._read()
        if rec is None:
            return False
        self._stamp = stamp
        same = self.current is not None and (
            (rec.run, rec.index_version) == (self.current.run, self.current.index_version)
        )
        return False if same else self.reload(rec)

    def adopt(self, rec: Record | None = None) -> None:
        """Declare that the engine already attached serves ``rec`` (default: the manifest's
        live record), so the next check only reloads on a change."""
        rec = rec or self._read()
        self.current = rec
        try:
            st = os.stat(self.path)
            self._stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            self._stamp = None

    def reload(self, rec: Record | None = None) -> bool:
        """Build the engine of ``rec`` (default: the live record) and swap it in. On any
        error the running engine stays and False is returned."""
        rec = rec or self._read()
        if rec is None:
            return False
        with self._lock:
            try:
                engine = self.factory(rec)
                if self.warmup is not None:
                    self.warmup(engine)
            except Exception:
                self.failures += 1
                log.exception("reload of %s failed; still serving %s", rec.run, self._name())
                return False
            old = getattr(self.servicer, "_engine", None)
            self.servicer.attach(engine)  # one reference assignment: the atomic swap
            self._push(self.current, old)
            self.current = rec
            self.reloads += 1
            if engine.metrics is not None:
                engine.metrics.set_versions(
                    engine.model_version, engine.index_version(engine.index)
                )
            log.info("serving model %s, index %s", rec.model_version, rec.index_version)
            return True

    def rollback(self) -> bool:
        """Swap the previous engine back in (in memory); False when there is none."""
        with self._lock:
            if not self.previous:
                return False
            rec, engine = self.previous.pop()
            if engine is None:
                return False
            self.servicer.attach(engine)
            log.warning("rolled back to %s", rec.model_version if rec else "the startup engine")
            self.current = rec
            return True

    def _push(self, rec: Record | None, engine: Any) -> None:
        if engine is None:
            return
        self.previous.append((rec, engine))
        while len(self.previous) > self.keep:
            _, dropped = self.previous.pop(0)
            index = getattr(dropped, "index", None)
            if index is not None:
                with contextlib.suppress(Exception):  # already closed
                    index.close()

    def _name(self) -> str:
        return self.current.model_version if self.current else "the startup engine"

    # --- triggers -------------------------------------------------------------------
    def watch(self, interval_s: float = 2.0) -> threading.Thread:
        """Poll the manifest every ``interval_s`` in a daemon thread (stop with :meth:`stop`)."""
        from serving.polling import poll_in_thread

        self._thread = poll_in_thread(
            self.check, interval_s, self._stop, "ecomrec-reload", "deploy manifest"
        )
        return self._thread

    def install_sighup(self) -> None:
        """Reload on SIGHUP (main thread only); the work runs in a thread, not the handler."""

        def on_hup(signum: int, frame: Any) -> None:
            log.info("SIGHUP: reloading from %s", self.path)
            threading.Thread(target=self.reload, name="ecomrec-sighup", daemon=True).start()

        signal.signal(signal.SIGHUP, on_hup)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
