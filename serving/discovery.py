"""The models behind CompleteBasket and SearchProducts, built once per engine.

:func:`discovery_parts` gives :func:`serving.assemble.build_recommender` two
:class:`Lazy` holders: the :class:`towers.complements.ComplementModel` fitted on the served
dataset's purchases and the :class:`towers.product_search.ProductSearch` over its catalogue
text.  They are built on first use (tests and engines that never answer these calls pay
nothing) or up front by :func:`warm` (``ecomrec serve`` does, before health turns
SERVING, so the first call is not slow).  ``ServeConfig.complements`` /
``ServeConfig.product_search`` false: the call answers UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np

from serving.config import ServeConfig
from serving.requests import UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Lazy(Generic[T]):
    """A value built by ``build`` on first :meth:`get` (once, thread-safe); a failed build
    is logged and raised as UnavailableError, and retried on the next call."""

    def __init__(self, name: str, build: Callable[[], T]) -> None:
        self.name = name
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        v = self._value
        if v is not None:
            return v
        with self._lock:
            if self._value is None:
                t = time.perf_counter()
                try:
                    self._value = self._build()
                except Exception as e:
                    log.exception("%s could not be built", self.name)
                    raise UnavailableError(f"{self.name} unavailable: {e}") from e
                log.info("%s built in %.1f s", self.name, time.perf_counter() - t)
            return self._value


def is_ready(holder: Any) -> bool:
    """True when ``holder`` (a :class:`Lazy` or the model itself) needs no build."""
    return holder.ready if isinstance(holder, Lazy) else holder is not None


def resolve(holder: Any) -> Any:
    """A model from an engine attribute: a :class:`Lazy`, the model itself, or None."""
    return holder.get() if isinstance(holder, Lazy) else holder


def discovery_parts(cfg: ServeConfig, parts: Any) -> tuple[Lazy[Any] | None, Lazy[Any] | None]:
    """(complements, product search) holders for ``parts`` (serving.assemble.Loaded)."""
    ds = parts.dataset
    n_items = len(ds.item_ids)
    comp = search = None
    if getattr(cfg, "complements", True):

        def build_complements() -> Any:
            from towers.complements import ComplementModel

            return ComplementModel.fit(ds.events, ds.items, n_items)

        comp = Lazy("complements model", build_complements)
    if getattr(cfg, "product_search", True):

        def build_search() -> Any:
            from towers.product_search import ProductSearch, SearchConfig
            from towers.text_onnx import QueryEncoder

            scfg = SearchConfig(
                personal_weight=cfg.search_personal_weight,
                query_cache=cfg.search_query_cache,
                user_cache=getattr(cfg, "search_user_cache", 4096),
            )
            enc = QueryEncoder(precision=getattr(cfg, "search_query_precision", "fp32"))
            return ProductSearch.from_items(ds.items, n_items, enc.encode, scfg)

        search = Lazy("product search", build_search)
    return comp, search


def warm(engine: Any) -> None:
    """Build the engine's complements model and product search now (errors are logged:
    those calls then answer UNAVAILABLE and retry the build)."""
    for holder in (getattr(engine, "complements", None), getattr(engine, "product_search", None)):
        if isinstance(holder, Lazy):
            with contextlib.suppress(UnavailableError):
                holder.get()
    if getattr(engine, "product_search", None) is not None:
        leg = text_leg(engine)
        if leg is not None:
            leg.state(block=True)  # the text vectors' exact copy (below exact_max_items)


class TextLeg:
    """SearchProducts' vector leg for one engine: the text collection that follows the
    engine's item index (:class:`indexing.text_index.TextIndex`) and its exact in-memory
    copy below ``exact_max_items`` (:class:`indexing.exact.ExactSearch`, the catalogue's
    filter masks), the project's rule for item vectors (serving/retrieval.py)."""

    def __init__(self, index: Any, catalog: Any, max_items: int) -> None:
        from indexing.exact import ExactSearch
        from indexing.text_index import open_text_index

        self.index = open_text_index(index.cfg, index, index.alias)
        self.exact = ExactSearch(catalog, max_items) if max_items > 0 else None
        self._ok: dict[str, tuple[bool, float]] = {}  # text version -> (readable, when)
        self._dense: tuple[Any, np.ndarray] | None = None  # (ExactMatrix, rows by item id)

    def dense(self, m: Any, n_rows: int) -> np.ndarray:
        """(n_rows, 384) float32: the exact copy ``m``'s vectors at their item ids' rows
        (zeros elsewhere), built once per version, so a query's cosine row over the
        catalogue is one product (no per-request gather or scatter)."""
        got = self._dense
        if got is not None and got[0] is m and len(got[1]) == n_rows:
            return got[1]
        keep = m.ids < n_rows
        d = np.zeros((n_rows, m.vectors.shape[1]), np.float32)
        d[m.ids[keep]] = m.vectors[keep]
        self._dense = (m, d)
        return d

    def state(self, *, block: bool = False) -> tuple[str, Any]:
        """("exact", the live text version's exact copy) below ``exact_max_items``;
        ("ann", None) when the text collection answers but has no exact copy (too big, or
        loading in the background); ("none", None) when the live item version has no
        readable text collection (checked again every 10 s): the in-memory fallback."""
        try:
            version = self.index.version
        except Exception:
            return "none", None
        now = time.monotonic()
        ok = self._ok.get(version)
        if ok is None or (not ok[0] and now - ok[1] > 10.0):
            try:
                self.index.manifest()
                ok = (True, now)
            except Exception as e:
                log.warning("SearchProducts: no text collection for %s: %r", version, e)
                ok = (False, now)
            self._ok[version] = ok
            for old in list(self._ok)[:-4]:
                self._ok.pop(old, None)
        if not ok[0]:
            return "none", None
        m = self.exact.matrix(self.index, version, block=block) if self.exact else None
        return ("exact", m) if m is not None else ("ann", None)


_legs: weakref.WeakKeyDictionary[Any, tuple[Any, TextLeg | None]] = weakref.WeakKeyDictionary()
_legs_lock = threading.Lock()


def text_leg(engine: Any) -> TextLeg | None:
    """The engine's :class:`TextLeg` (None when its index is not a Qdrant reader: no text
    collection to follow), one per (engine, index object)."""
    from indexing.store import QdrantReader

    index = getattr(engine, "index", None)
    got = _legs.get(engine)
    if got is not None and got[0] is index:
        return got[1]
    with _legs_lock:
        got = _legs.get(engine)
        if got is not None and got[0] is index:
            return got[1]
        leg = None
        if isinstance(index, QdrantReader):
            try:
                leg = TextLeg(index, engine.catalog, engine.cfg.exact_max_items)
            except Exception as e:  # the in-memory fallback answers
                log.warning("SearchProducts: no text collection reader: %r", e)
        _legs[engine] = (index, leg)
        return leg
