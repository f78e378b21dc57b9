"""A/B tests in the service: one engine per variant, customers routed by a stable hash.

The experiment (:mod:`outcomes.experiment`) comes from the file named by ``[serve]
experiment`` (or ``STATE/experiment.json`` under ``ecomrec serve --follow-refresh STATE``).
A :class:`VariantRouter` holds ``(experiment, {variant: engine})`` as ONE tuple, replaced
by one reference assignment when the file changes (mtime + inode polled, or
:meth:`VariantRouter.reload` on SIGHUP): a call takes the tuple once, so it finishes on
the engine it started with; new calls see the new shares at once.  Ending a test = a
file with one variant (share 1), or deleting the file: everyone gets the service's own
engine, no restart.

A variant without ``run`` is the service's own engine (what ``--model`` or a followed
refresh serves: swaps by :class:`serving.reload.EngineReloader` reach it).  A variant with
a ``run`` gets its own :class:`~serving.engine.Recommender` (model, history store,
catalogue, index reader pinned to ``index_version`` or following its alias), built off
the request path and kept across reloads while its (run, dataset, index, version) stay
the same.  Memory: each such engine holds its own model, history store and catalogue
(docs/outcomes.md, "A/B tests", measures it); a variant reusing the served dataset
shares its Dataset object.

A file that fails validation keeps the running experiment (logged, ``failures``
counted): a typo never takes traffic away from a running test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from outcomes.experiment import Experiment, Variant, load_experiment

log = logging.getLogger(__name__)

#: The variant name when no experiment runs (the interface's default).
DEFAULT_VARIANT = "default"

EngineFactory = Callable[[Variant], Any]


class VariantRouter:
    """Routes customers to the engine of their variant; follows the experiment file."""

    def __init__(
        self,
        path: str | Path,
        factory: EngineFactory,
        *,
        warmup: Callable[[Any], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.factory = factory
        self.warmup = warmup
        # (experiment or None, {variant name: engine, None = the service's own engine})
        self._state: tuple[Experiment | None, dict[str, Any]] = (None, {})
        self._keys: dict[tuple[str, ...], Any] = {}  # model_key -> engine (reused on reload)
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        self.failures = 0
        self.last_error: str = ""

    @property
    def experiment(self) -> Experiment | None:
        return self._state[0]

    def route(self, customer_id: str, own: Callable[[], Any]) -> tuple[str, Any]:
        """``(variant name, engine)`` for a customer; ``own()`` gives the service's engine
        (called only for a variant without a run, or when no experiment runs)."""
        exp, engines = self._state  # one read: a reload cannot split this call
        if exp is None:
            return DEFAULT_VARIANT, own()
        v = exp.assign(customer_id)
        engine = engines.get(v.name)
        return v.name, (engine if engine is not None else own())

    def check(self) -> bool:
        """Re-read the file when its mtime/inode changed (or it appeared / disappeared);
        True when the routing changed."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return False
        return self._load(stamp)

    def reload(self) -> bool:
        """Load the file now (SIGHUP, admin); see :meth:`_load`."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        return self._load(stamp)

    def _load(self, stamp: tuple[int, int] | None) -> bool:
        """Apply the file (no file = no experiment); on an invalid file or an engine that
        cannot be built, the running routing stays."""
        with self._lock:
            if stamp is None:
                if self._state[0] is not None:
                    log.info("experiment file %s removed: experiment ended", self.path)
                self._swap(None, {}, None)
                return True
            try:
                exp = load_experiment(self.path)
                engines: dict[str, Any] = {}
                keys: dict[tuple[str, ...], Any] = {}
                for v in exp.variants:
                    if not v.run:
                        continue
                    eng = self._keys.get(v.model_key) or keys.get(v.model_key)
                    if eng is None:
                        eng = self.factory(v)
                        if self.warmup is not None:
                            self.warmup(eng)
                    engines[v.name] = eng
                    keys[v.model_key] = eng
            except Exception as e:
                self.failures += 1
                self.last_error = str(e)
                self._stamp = stamp  # do not retry the same bad file every poll
                log.error("experiment %s not applied (still routing as before): %s", self.path, e)
                return False
            self._swap(exp, engines, stamp, keys)
            log.info(
                "experiment %s: %s",
                exp.name,
                ", ".join(f"{v.name}={v.share:g}" for v in exp.variants),
            )
            return True

    def _swap(
        self,
        exp: Experiment | None,
        engines: dict[str, Any],
        stamp: tuple[int, int] | None,
        keys: dict[tuple[str, ...], Any] | None = None,
    ) -> None:
        old = set(map(id, self._keys.values()))
        self._state = (exp, engines)  # the atomic swap
        kept = keys or {}
        dropped = [e for e in self._keys.values() if id(e) in old - set(map(id, kept.values()))]
        self._keys = kept
        self._stamp = stamp
        self.reloads += 1
        for eng in dropped:  # calls already running hold their own reference to it
            index = getattr(eng, "index", None)
            if index is not None:
                timer = threading.Timer(30.0, _close, (index,))
                timer.daemon = True  # never holds the process open at exit
                timer.start()

    def engines(self) -> dict[str, Any]:
        """The engines of the variants with their own run (for warm-up / health)."""
        return dict(self._state[1])

    # --- triggers ------------------------------------------------------------------------
    def watch(self, interval_s: float = 2.0) -> threading.Thread:
        """Poll the file every ``interval_s`` in a daemon thread (stop with :meth:`stop`)."""
        from serving.polling import poll_in_thread

        self._thread = poll_in_thread(
            self.check, interval_s, self._stop, "ecomrec-experiment", "experiment file"
        )
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _close(index: Any) -> None:
    with contextlib.suppress(Exception):  # already closed
        index.close()


def variant_factory(
    cfg: Any,
    *,
    dataset: Any,
    index_cfg: Any,
    metrics: Any = None,
    segments_for: Callable[[Any], Any] | None = None,
    check: Callable[[Any, Any, str], None] | None = None,
) -> EngineFactory:
    """An :data:`EngineFactory` building a :class:`~serving.engine.Recommender` for a
    variant: its run over its dataset (default: the served ``dataset`` object), its index
    (default: ``index_cfg``'s location and alias; pinned to ``index_version`` when given).
    ``check(index, model, location)`` may refuse an index built from another model
    (``ecomrec serve`` passes :func:`serving.cli.check_index_matches_model`)."""

    def build(v: Variant) -> Any:
        from indexing.base import IndexConfig
        from indexing.build import open_store
        from intake.dataset import Dataset
        from serving.assemble import build_recommender, load_parts

        ds = Dataset.load(v.dataset) if v.dataset else dataset
        parts = load_parts(v.run, ds)
        icfg = IndexConfig.from_dict(
            {
                **{k: getattr(index_cfg, k) for k in index_cfg.__dataclass_fields__},
                "location": v.index or index_cfg.location,
                "alias": v.index_alias or index_cfg.alias,
            }
        )
        index = open_store(icfg).open(alias=icfg.alias, version=v.index_version or None)
        if check is not None:
            check(index, parts.model, icfg.location)
        segments = segments_for(ds) if segments_for is not None else None
        return build_recommender(cfg, parts, index, segments, metrics=metrics)

    return build
