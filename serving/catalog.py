"""Item metadata serving needs without the index: category, price, title, stock, popularity.

Used for response enrichment, re-ranking features and the index-down fallback
(per-segment popularity lists filtered with the request's filters).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from ecomrec.errors import NotFoundError
from indexing.base import ItemIndex, SearchFilter
from intake.schema import EVENT_TYPE_IDS
from serving.rerank import Boost, boost_vector, category_key, popularity_scores


def category_prefixes(category: str | None) -> list[str]:
    """Every prefix of every ``" | "``-separated ``" > "`` path (the index's ``category_path``)."""
    if not category:
        return []
    out: list[str] = []
    for path in str(category).split(" | "):
        parts = [p.strip() for p in path.split(">") if p.strip()]
        for i in range(1, len(parts) + 1):
            pre = " > ".join(parts[:i])
            if pre not in out:
                out.append(pre)
    return out


@dataclass(frozen=True)
class ItemCatalog:
    """Per-item arrays indexed by internal item id (row 0 is padding)."""

    external_ids: tuple[str, ...]  # (n_items + 1,), "" at 0
    titles: tuple[str, ...]
    categories: tuple[str | None, ...]
    price: np.ndarray  # (n_items + 1,) float64, NaN unknown
    in_stock: np.ndarray  # (n_items + 1,) bool
    paths: tuple[frozenset[str], ...]
    # derived per-item arrays, built once on first use (category codes, boosts)
    _derived: dict[Any, np.ndarray] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )
    _derived_lock: threading.Lock = field(
        default_factory=threading.Lock, compare=False, repr=False, hash=False
    )
    # category key -> code per depth (the catalogue's keys, then keys of index-only items)
    _code_maps: dict[int, dict[str, int]] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )
    _text_codes: dict[tuple[str | None, int], int] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )

    @property
    def n_items(self) -> int:
        return len(self.external_ids) - 1

    def _cached(self, key: Any, build: Any) -> np.ndarray:
        got = self._derived.get(key)
        if got is None:
            with self._derived_lock:
                got = self._derived.get(key)
                if got is None:
                    got = self._derived[key] = build()
        return got

    def category_codes(self, depth: int) -> np.ndarray:
        """(n_items + 1,) int64 code of each item's :func:`~serving.rerank.category_key` at
        ``depth`` (equal keys, equal codes; -1 = unknown), computed once per depth."""

        def build() -> np.ndarray:
            code_of: dict[str, int] = {}
            keys = (category_key(c, depth) for c in self.categories)
            codes = np.array(
                [code_of.setdefault(k, len(code_of)) if k else -1 for k in keys], np.int64
            )
            self._code_maps[depth] = code_of
            return codes

        return self._cached(("codes", depth), build)

    def category_code(self, category: str | None, depth: int) -> int:
        """The code :meth:`category_codes` gives ``category`` at ``depth``, for an item the
        catalogue does not hold (a key no catalogue item has gets a new code; -1 = unknown)."""
        got = self._text_codes.get((category, depth))  # few distinct texts: one lookup
        if got is not None:
            return got
        key = category_key(category, depth)
        if not key:
            got = -1
        else:
            self.category_codes(depth)  # builds the catalogue's key -> code map once
            code_of = self._code_maps[depth]
            with self._derived_lock:
                got = code_of.setdefault(key, len(code_of))
        if len(self._text_codes) < 100_000:
            self._text_codes[(category, depth)] = got
        return got

    def boosts(self, boosts: tuple[Boost, ...]) -> np.ndarray | None:
        """(n_items + 1,) float64 summed boost of each item (None when there are none)."""
        if not boosts:
            return None
        return self._cached(
            ("boost", boosts),
            lambda: boost_vector(self.categories, self.external_ids, boosts),
        )

    @classmethod
    def from_items(cls, items: pl.DataFrame, n_items: int | None = None) -> ItemCatalog:
        """From a canonical items frame (``intake.schema.ITEMS_SCHEMA``)."""
        n = int(items["item_id"].cast(pl.Int64).max() or 0) if n_items is None else n_items  # type: ignore[arg-type]
        ext = [""] * (n + 1)
        titles = [""] * (n + 1)
        cats: list[str | None] = [None] * (n + 1)
        price = np.full(n + 1, np.nan)
        stock = np.ones(n + 1, bool)
        stock[0] = False
        has_stock = "in_stock" in items.columns
        for row in items.iter_rows(named=True):
            i = int(row["item_id"])
            if not 1 <= i <= n:
                continue
            ext[i] = str(row["external_id"])
            titles[i] = row.get("title") or ""
            cats[i] = row.get("category")
            if row.get("price") is not None:
                price[i] = float(row["price"])
            if has_stock and row["in_stock"] is not None:
                stock[i] = bool(row["in_stock"])
        paths = tuple(frozenset(category_prefixes(c)) for c in cats)
        return cls(tuple(ext), tuple(titles), tuple(cats), price, stock, paths)

    def mask(self, flt: SearchFilter | None) -> np.ndarray:
        """(n_items + 1,) bool: items that pass ``flt`` (same semantics as the index)."""
        m = np.ones(self.n_items + 1, bool)
        m[0] = False
        if flt is None:
            return m
        if flt.categories:
            want = set(flt.categories)
            m &= np.array([bool(p & want) for p in self.paths])
        if flt.price_min is not None or flt.price_max is not None:
            p = self.price
            ok = np.isfinite(p)
            if flt.price_min is not None:
                ok &= p >= flt.price_min
            if flt.price_max is not None:
                ok &= p <= flt.price_max
            m &= ok
        if flt.in_stock is not None:
            m &= self.in_stock == flt.in_stock
        if flt.exclude_ids:
            m[np.asarray(flt.exclude_ids, np.int64)] = False
        return m


class SegmentPopularity:
    """Popularity of every item within each segment (and overall), from the histories."""

    def __init__(self, overall: np.ndarray, by_segment: Mapping[str, np.ndarray]) -> None:
        self.overall_counts = overall
        self.by_segment_counts = dict(by_segment)
        self._overall = popularity_scores(overall)
        self._scores = {k: popularity_scores(v) for k, v in by_segment.items()}
        self._order = {k: np.argsort(-v, kind="stable") for k, v in by_segment.items()}
        self._overall_order = np.argsort(-overall, kind="stable")

    @classmethod
    def from_histories(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        n_items: int,
        segment_of: Mapping[int, str],
        event_type: np.ndarray | None = None,
    ) -> SegmentPopularity:
        """Count events (``users[i]`` did ``items[i]``); returns are not counted."""
        keep = np.ones(len(items), bool)
        if event_type is not None:
            keep = np.asarray(event_type) != EVENT_TYPE_IDS["return"]
        users, items = np.asarray(users)[keep], np.asarray(items)[keep]
        overall = np.bincount(items, minlength=n_items + 1).astype(np.int64)
        overall[0] = 0
        seg_names = sorted(set(segment_of.values()))
        by: dict[str, np.ndarray] = {}
        if seg_names:
            code = {s: i for i, s in enumerate(seg_names)}
            seg_idx = np.array([code.get(segment_of.get(int(u), ""), -1) for u in users], np.int64)
            for s, i in code.items():
                c = np.bincount(items[seg_idx == i], minlength=n_items + 1).astype(np.int64)
                c[0] = 0
                by[s] = c
        return cls(overall, by)

    def scores(self, segment: str | None) -> np.ndarray:
        """(n_items + 1,) popularity in [0, 1] within ``segment`` (overall when unknown)."""
        if segment is not None and segment in self._scores:
            return self._scores[segment]
        return self._overall

    def top(self, segment: str | None, k: int, mask: np.ndarray | None = None) -> np.ndarray:
        """The ``k`` most popular items of ``segment`` passing ``mask`` (then overall ones)."""
        order = self._order.get(segment or "", self._overall_order)
        counts = self.by_segment_counts.get(segment or "", self.overall_counts)
        keep = counts[order] > 0
        if mask is not None:
            keep &= mask[order]
        ranked = order[keep][:k]
        if len(ranked) < k:
            rest = self._overall_order[self._overall_order != 0]
            if mask is not None:
                rest = rest[mask[rest]]
            rest = rest[~np.isin(rest, ranked)]
            ranked = np.concatenate([ranked, rest[: k - len(ranked)]])
        return ranked.astype(np.int64)


@dataclass(frozen=True)
class ItemInfo:
    """What serving shows and re-ranks by for an item the catalogue does not hold."""

    external_id: str
    category: str | None
    price: float  # NaN unknown
    in_stock: bool
    title: str = ""

    @classmethod
    def from_payload(cls, item_id: int, payload: Mapping[str, Any]) -> ItemInfo:
        """From an index payload (``indexing.build.item_payloads``' fields)."""
        price = payload.get("price")
        return cls(
            external_id=str(payload.get("external_id") or item_id),
            category=payload.get("category") or None,
            price=float(price) if isinstance(price, int | float) else float("nan"),
            in_stock=bool(payload.get("in_stock", 1)),
            title=str(payload.get("title") or ""),
        )


class IndexOnlyItems:
    """Items the index holds beyond the serving catalogue (ids above ``catalog.n_items``:
    a shop catalogue larger than the training data, items added to the index after the
    model was trained).

    Their metadata comes from the index payloads of just the ids a request needs (one
    retrieve per request for the ids not cached), cached per index version in a bounded
    LRU: nothing catalogue-sized is built, per request or at start-up.
    """

    def __init__(self, max_cached: int = 200_000) -> None:
        self.max_cached = max_cached
        self._cache: OrderedDict[str, OrderedDict[int, ItemInfo]] = OrderedDict()
        self._lock = threading.Lock()
        self.fetched = 0  # ids read from the index (cache misses)
        self.hits = 0

    def info(self, index: ItemIndex, version: str, ids: Sequence[int]) -> dict[int, ItemInfo]:
        """``{id: ItemInfo}`` for ``ids``; ids the index no longer holds (deleted since the
        search) are left out."""
        out: dict[int, ItemInfo] = {}
        with self._lock:
            cache = self._cache.get(version)
            if cache is not None:
                self._cache.move_to_end(version)
                for i in ids:
                    got = cache.get(i)
                    if got is not None:
                        cache.move_to_end(i)
                        out[i] = got
            self.hits += len(out)
        missing = [int(i) for i in ids if i not in out]
        if not missing:
            return out
        try:
            payloads = index.get_payloads(missing)
        except NotFoundError:  # deleted between the search and now: keep the rest
            missing = sorted(index.existing_ids(missing))
            payloads = index.get_payloads(missing) if missing else []
        new = {i: ItemInfo.from_payload(i, p) for i, p in zip(missing, payloads, strict=True)}
        out.update(new)
        with self._lock:
            self.fetched += len(new)
            cache = self._cache.setdefault(version, OrderedDict())
            self._cache.move_to_end(version)
            cache.update(new)
            while len(cache) > self.max_cached:
                cache.popitem(last=False)
            while len(self._cache) > 2:  # the previous version may still be answering
                self._cache.popitem(last=False)
        return out


def lookup_external(catalog: ItemCatalog, ids: Sequence[int]) -> list[str]:
    """External ids of internal item ids."""
    return [catalog.external_ids[int(i)] for i in ids]
