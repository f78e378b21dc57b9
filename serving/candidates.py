"""Candidate assembly: from retrieved ids and scores to re-rank input and to answer items.

The catalogue's per-item arrays describe candidates it holds; items the index holds
beyond the catalogue (ids above ``catalog.n_items``) are described by their index
payloads (:class:`~serving.catalog.IndexOnlyItems`).  Never index the catalogue's arrays
with a search result's ids directly: go through :func:`candidates` and :func:`result_items`.
Also here: the popularity fallback, the user context of the re-rank and the buy-again
mixture.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ecomrec.errors import IndexUnavailableError, InvalidArgumentError
from indexing.base import ItemIndex, SearchFilter
from intake.schema import EVENT_TYPE_IDS
from serving import rerank as rr
from serving.catalog import IndexOnlyItems, ItemCatalog, ItemInfo, SegmentPopularity
from serving.history import History
from serving.requests import BUY_AGAIN, ResultItem
from towers.sequences import item_bag

log = logging.getLogger(__name__)


def require_finite(ranked: Sequence[rr.Ranked]) -> None:
    """A damaged index must degrade, never answer NaN/inf scores (issue 14)."""
    for r in ranked:
        if not (np.isfinite(r.score) and np.isfinite(r.relevance)):
            log.error("non-finite score for item %d: the index data is damaged", r.item_id)
            raise IndexUnavailableError("the index returned non-finite scores")


def index_only_info(
    lookup: IndexOnlyItems,
    catalog: ItemCatalog,
    index: ItemIndex | None,
    version: str,
    ids: Sequence[int] | np.ndarray,
) -> dict[int, ItemInfo]:
    """Payload metadata of the ids above the catalogue (none: ``{}``, no index call)."""
    arr = np.asarray(ids, np.int64)
    outside = arr[arr > catalog.n_items]
    if not len(outside) or index is None:
        return {}
    try:
        return lookup.info(index, version, outside.tolist())
    except (InvalidArgumentError, IndexUnavailableError):
        raise
    except Exception as e:
        raise IndexUnavailableError(f"index payload lookup failed: {e}") from e


def candidates(
    catalog: ItemCatalog,
    popularity: SegmentPopularity,
    ids: np.ndarray,
    scores: np.ndarray,
    segment: str | None,
    policy: rr.RerankPolicy,
    extra: dict[int, ItemInfo] | None = None,
) -> rr.Candidates:
    """Candidates from id/score arrays with the catalogue's precomputed per-item arrays;
    ``extra`` describes the candidates above the catalogue (index-only items: no
    popularity in the histories, category/price/boosts from their payloads)."""
    c = catalog
    boost = c.boosts(policy.boosts)
    depth = policy.category_depth
    outside = ids > c.n_items  # (N,) bool: index-only items
    if not outside.any():
        return rr.Candidates(
            item_ids=ids,
            relevance=scores,
            categories=(),
            price=c.price[ids],
            popularity=popularity.scores(segment)[ids],
            category_codes=c.category_codes(depth)[ids],
            boost=boost[ids] if boost is not None else np.zeros(len(ids)),
        )
    extra = extra or {}
    if len(extra) < int(outside.sum()):  # some were deleted since the search: drop them
        keep = ~outside | np.isin(ids, np.fromiter(extra, np.int64, len(extra)))
        ids, scores, outside = ids[keep], scores[keep], outside[keep]
    safe = np.where(outside, 0, ids)  # (N,) catalogue rows (0 = padding for the rest)
    price = c.price[safe].copy()
    pop = popularity.scores(segment)[safe].copy()
    codes = c.category_codes(depth)[safe].copy()
    bst = boost[safe].copy() if boost is not None else np.zeros(len(ids))
    rows = np.flatnonzero(outside)
    infos = [extra[int(ids[r])] for r in rows]
    price[rows] = [x.price for x in infos]
    pop[rows] = 0.0  # no events in the histories the popularity counts come from
    codes[rows] = [c.category_code(x.category, depth) for x in infos]
    if policy.boosts:
        bst[rows] = rr.boost_vector(
            [x.category for x in infos], [x.external_id for x in infos], policy.boosts
        )
    return rr.Candidates(
        item_ids=ids,
        relevance=scores,
        categories=(),
        price=price,
        popularity=pop,
        category_codes=codes,
        boost=bst,
    )


def result_items(
    catalog: ItemCatalog, ranked: Sequence[rr.Ranked], extra: dict[int, ItemInfo] | None = None
) -> tuple[ResultItem, ...]:
    """The answer's items: catalogue rows, or index payloads for ids above the catalogue."""
    c = catalog
    out = []
    for r in ranked:
        info = extra.get(r.item_id) if extra and r.item_id > c.n_items else None
        if info is not None:
            out.append(
                ResultItem(
                    item_id=info.external_id,
                    score=r.score,
                    relevance=r.relevance,
                    reasons=r.reasons,
                    category=info.category or "",
                    price=info.price if np.isfinite(info.price) else 0.0,
                    title=info.title,
                )
            )
            continue
        p = float(c.price[r.item_id])
        out.append(
            ResultItem(
                item_id=c.external_ids[r.item_id],
                score=r.score,
                relevance=r.relevance,
                reasons=r.reasons,
                category=c.categories[r.item_id] or "",
                price=p if np.isfinite(p) else 0.0,
                title=c.titles[r.item_id],
            )
        )
    return tuple(out)


def popular(
    catalog: ItemCatalog,
    popularity: SegmentPopularity,
    segment: str | None,
    k: int,
    flt: SearchFilter,
    reason: str,
) -> list[rr.Ranked]:
    """The segment's (or overall) best sellers passing ``flt``, marked with ``reason``."""
    ids = popularity.top(segment, k, catalog.mask(flt))
    scores = popularity.scores(segment)
    return [rr.Ranked(int(i), float(scores[i]), 0.0, (reason,)) for i in ids]


def user_context(catalog: ItemCatalog, hist: History, policy: rr.RerankPolicy) -> rr.UserContext:
    """Seen categories (as the catalogue's codes at the policy depth) and price centre."""
    codes = catalog.category_codes(policy.category_depth)[hist.items]  # (L,)
    seen = frozenset(int(c) for c in np.unique(codes) if c >= 0)
    prices = catalog.price[hist.items] if len(hist) else np.zeros(0)
    if hist.price is not None and len(hist):
        prices = np.where(np.isfinite(hist.price), hist.price, prices)
    prices = prices[np.isfinite(prices) & (prices > 0)]
    center = rr.median(np.log1p(prices)) if len(prices) else None
    return rr.UserContext(frozenset(), center, seen)


def buy_again(
    catalog: ItemCatalog,
    ranked: Sequence[rr.Ranked],
    hist: History,
    k: int,
    flt: SearchFilter,
    exclude: set[int],
    *,
    weight: float,
    half_life_days: float,
) -> list[rr.Ranked]:
    """Repeat/explore mixture: own items (passing the filters, not excluded) score
    ``weight * rf / max rf`` plus their retrieval score, then the top ``k``."""
    pur = hist.event_type == EVENT_TYPE_IDS["purchase"]
    now = int(hist.ts.max(initial=0)) + 1
    bag = item_bag([hist.items[pur]], [hist.ts[pur]], [now])
    rf = bag.recency_frequency(half_life_days)
    ok = catalog.mask(flt)[bag.items] & ~np.isin(bag.items, list(exclude))
    items, rf = bag.items[ok], rf[ok]
    if len(items) == 0:
        return list(ranked)[:k]
    own = dict(zip(items.tolist(), (weight * rf / rf.max()).tolist(), strict=True))
    out: dict[int, rr.Ranked] = {}
    for r in ranked:
        extra = own.pop(r.item_id, None)
        out[r.item_id] = (
            r
            if extra is None
            else rr.Ranked(r.item_id, r.score + extra, r.relevance, (*r.reasons, BUY_AGAIN))
        )
    for i, s in own.items():
        out[i] = rr.Ranked(int(i), float(s), 0.0, (BUY_AGAIN,))
    return sorted(out.values(), key=lambda r: -r.score)[:k]
