"""``CompleteBasket``: complementary products for a cart or a product page.

The servicer validates the request into a :class:`BasketQuery` (:func:`validate_basket`),
then :func:`complete_basket` scores the whole catalogue with the engine's
:class:`towers.complements.ComplementModel` (``engine.complements``), applies the
request's filters with the engine's catalogue (the index's filter semantics) and names
the reasons.  With a known customer the model adds their stored purchases (their own
co-purchase neighbourhood and the items they buy).

Rules a shop can rely on (docs/complements.md):

* never a basket item, nor a near-duplicate of one (same
  :func:`towers.complements.title_stem`: the same product in another colour or size);
* basket ids the model does not know are ignored and returned in ``unknown_item_ids``;
  when none is known the call is NOT_FOUND; an empty basket is INVALID_ARGUMENT;
* items without co-purchase evidence rank by popularity (reason ``POPULAR``), so ``k``
  items come back whenever ``k`` items pass the filters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecomrec.errors import InvalidArgumentError, NotFoundError
from indexing.base import SearchFilter
from indexing.exact import top_rows
from serving import validation as val
from serving.catalog import ItemCatalog
from serving.config import ServeConfig
from serving.discovery import resolve
from serving.requests import RequestContext, ResultItem, UnavailableError
from towers.complements import entries

log = logging.getLogger(__name__)

BOUGHT_TOGETHER = "BOUGHT_TOGETHER"
FOR_YOU = "FOR_YOU"
BOUGHT_BEFORE = "BOUGHT_BEFORE"
POPULAR = "POPULAR"


@dataclass(frozen=True)
class BasketQuery:
    """A validated CompleteBasket request (internal ids)."""

    request_id: str
    basket: tuple[int, ...]
    unknown: tuple[str, ...]  # external ids the model does not know
    user: int | None
    k: int
    filters: SearchFilter
    exclude: tuple[int, ...]


@dataclass(frozen=True)
class ProductsResult:
    """The answer of CompleteBasket / SearchProducts (no protobuf)."""

    request_id: str
    items: tuple[ResultItem, ...]
    model_version: str
    unknown: tuple[str, ...]
    degraded: bool
    degraded_reasons: tuple[str, ...]


def validate_basket(req: Any, cfg: ServeConfig, users: Any, items: Any) -> BasketQuery:
    """Check a ``CompleteBasketRequest``: 1..max_exclude_ids item ids; unknown ones are
    ignored (all unknown: NOT_FOUND); an unknown customer is simply not personalised."""
    rid = val.check_request_id(req.request_id, cfg)
    ids = list(req.item_ids)
    if not ids:
        raise InvalidArgumentError("item_ids", "give at least one item (the basket is empty)")
    if len(ids) > cfg.max_exclude_ids:
        raise InvalidArgumentError("item_ids", f"at most {cfg.max_exclude_ids} ids")
    known: list[int] = []
    unknown: list[str] = []
    for i, ext in enumerate(ids):
        val._check_id(f"item_ids[{i}]", ext, cfg, required=True)
        got = items.get(ext)
        if got is None:
            unknown.append(ext)
        else:
            known.append(int(got))
    if not known:
        raise NotFoundError(f"item_ids: no known item among {', '.join(map(repr, unknown[:10]))}")
    user_ext = val._check_id("user_id", req.user_id, cfg)
    return BasketQuery(
        request_id=rid,
        basket=tuple(dict.fromkeys(known)),
        unknown=tuple(dict.fromkeys(unknown)),
        user=users.get(user_ext) if user_ext else None,
        k=val.check_k(req.k, cfg),
        filters=val.check_filters(req.filters, cfg),
        exclude=val.check_exclude(req.exclude_item_ids, items, cfg),
    )


def top_k(scores: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """(<= k,) int64 ids of the best finite scores among ``mask``, best first; equal
    scores in id order (deterministic, like a stable sort of the whole array)."""
    s = np.where(mask, scores, -np.inf)
    ok = int(np.count_nonzero(s > -np.inf))
    k = min(k, ok)
    if k <= 0:
        return np.zeros(0, np.int64)
    part = top_rows(s, k)  # >= k rows holding the k largest (a strided sample's cut)
    kth = np.partition(s[part], len(part) - k)[len(part) - k]  # the k-th largest score
    cand = np.flatnonzero(s >= kth)
    return cand[np.lexsort((cand, -s[cand]))][:k].astype(np.int64)


def result_item(
    catalog: ItemCatalog, item: int, score: float, relevance: float, reasons: Sequence[str]
) -> ResultItem:
    p = float(catalog.price[item])
    return ResultItem(
        item_id=catalog.external_ids[item],
        score=float(score),
        relevance=float(relevance),
        reasons=tuple(reasons),
        category=catalog.categories[item] or "",
        price=p if np.isfinite(p) else 0.0,
        title=catalog.titles[item],
    )


def complete_basket(engine: Any, q: BasketQuery, ctx: RequestContext) -> ProductsResult:
    """The top ``q.k`` complements of ``q.basket`` (see the module docstring)."""
    model = resolve(getattr(engine, "complements", None))
    if model is None:
        raise UnavailableError("this deployment has no complements model")
    t = time.perf_counter()
    ctx.check("history")
    history: np.ndarray = np.zeros(0, np.int64)
    if q.user is not None:
        history = engine.history.get(q.user).purchased()
    t = ctx.timed("history", t)
    ctx.check("score")
    co, assoc, personal = model.parts(q.basket, history)
    cfg = model.cfg
    scores = co + cfg.conf_weight * assoc + personal + 1e-6 * model.popularity  # (N+1,)
    catalog: ItemCatalog = engine.catalog
    mask = catalog.mask(q.filters)  # (N+1,) the index's filter semantics
    mask[model.near_duplicates(q.basket)] = False
    if q.exclude:
        mask[np.asarray(q.exclude, np.int64)] = False
    top = top_k(scores, mask, q.k)
    t = ctx.timed("score", t)
    strongest = _strongest(model, q.basket, top)
    own = set(history.tolist())
    out = []
    for j, w in zip(top.tolist(), strongest, strict=True):
        reasons: list[str] = []
        evidence = co[j] + cfg.conf_weight * assoc[j]
        if evidence > 0:
            reasons.append(BOUGHT_TOGETHER)
        if personal[j] > 0:
            reasons.append(BOUGHT_BEFORE if j in own else FOR_YOU)
        if not reasons:
            reasons.append(POPULAR)
        if w > 0 and evidence > 0:
            reasons.append(f"with:{catalog.external_ids[w]}")
        out.append(result_item(catalog, j, scores[j], evidence, reasons))
    ctx.timed("rerank", t)
    return ProductsResult(q.request_id, tuple(out), engine.model_version, q.unknown, False, ())


def _strongest(model: Any, basket: Sequence[int], top: np.ndarray) -> list[int]:
    """For each answer item, the basket item with the largest co-purchase weight to it
    (0 when none)."""
    if not len(top):
        return []
    b = np.asarray(list(basket), np.int64)
    w = entries(model.weights, b, top)  # (B, k)
    best = w.argmax(axis=0)
    return [int(b[i]) if w[i, c] > 0 else 0 for c, i in enumerate(best)]
