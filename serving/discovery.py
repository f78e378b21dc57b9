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
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
            from towers.product_search import ProductSearch
            from towers.text_onnx import QueryEncoder

            return ProductSearch.from_items(ds.items, n_items, QueryEncoder().encode)

        search = Lazy("product search", build_search)
    return comp, search


def warm(engine: Any) -> None:
    """Build the engine's complements model and product search now (errors are logged:
    those calls then answer UNAVAILABLE and retry the build)."""
    for holder in (getattr(engine, "complements", None), getattr(engine, "product_search", None)):
        if isinstance(holder, Lazy):
            with contextlib.suppress(UnavailableError):
                holder.get()
