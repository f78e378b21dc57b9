"""Campaign audiences and per-customer plans from user and item vectors.

* Audience by text: the text is embedded into the item space (``TrainedModel.embed_text``
  for a tower run; the same MiniLM encoder as the text user vectors otherwise) and the
  nearest customers by cosine are returned, optionally restricted to a segment.
* Audience by products: the query is the mean of the given items' vectors.
* Plan: each customer's top products (not bought before) with a reason naming the past
  purchase the product is most similar to.
* Offline check (:func:`theme_precision`): for product themes, the share of the N
  targeted customers who buy a matching product in the window after the cutoff, for
  the embedding audience (alone, and mixed with the customer's activity) vs RFM-segment
  targeting, most-active-customer ("popularity") targeting and a keyword-history rule.

User-vector search goes through :class:`UserVectorSearch`; :class:`ExactUserSearch` is an
exact numpy implementation (the Qdrant user collection of ``indexing`` can implement the
same protocol; it did not exist when this was written).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from ecomrec.errors import DataError, InvalidArgumentError, NotFoundError
from intake.dataset import Dataset
from segments.rfm import SEGMENTS

log = logging.getLogger(__name__)

DAY = 86400

# theme name -> (query text, regex over lower-cased product titles defining a "match")
DEFAULT_THEMES: dict[str, tuple[str, str]] = {
    "christmas": ("christmas decorations", r"christmas"),
    "lunch bags": ("lunch bag", r"lunch bag"),
    "tea time": ("teacup and saucer, teapot", r"teacup|teapot|tea set"),
    "candles": ("candle holders and tea lights", r"candle|t-light|tealight"),
    "baking": ("cake cases and baking tins", r"cake case|baking|cake tin"),
    "garden": ("garden tools and plant pots", r"garden|plant pot|flower pot"),
}


class UserVectorSearch(Protocol):
    """Nearest customers to a query vector (cosine), optionally restricted by a mask."""

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(user ids (k',), scores (k',)) best first; ``allowed`` is a (n,) bool row mask."""
        ...


class ExactUserSearch:
    """Exact cosine search over an in-memory (n, D) user-vector matrix."""

    def __init__(self, users: np.ndarray, vectors: np.ndarray) -> None:
        if len(users) != len(vectors):
            raise InvalidArgumentError("vectors", "one vector per user required")
        self.users = np.asarray(users, dtype=np.int64)
        v = np.asarray(vectors, dtype=np.float32)
        self.vectors = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # (n, D)

    def scores(self, query: np.ndarray) -> np.ndarray:
        """(n,) cosine of every user with ``query`` (D,)."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        return np.asarray(self.vectors @ q)

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise InvalidArgumentError("k", "must be >= 1")
        s = self.scores(query)
        if allowed is not None:
            s = np.where(allowed, s, -np.inf)
        n_ok = int(np.isfinite(s).sum())
        k = min(k, n_ok)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.lexsort((self.users[top], -s[top]))]
        return self.users[top], s[top].astype(np.float32)


def query_from_items(item_ids: Sequence[int], item_vectors: np.ndarray) -> np.ndarray:
    """(D,) normalised mean of the items' vectors (``item_vectors`` indexed by item id)."""
    ids = np.asarray(item_ids, dtype=np.int64)
    if len(ids) == 0:
        raise InvalidArgumentError("items", "give at least one item")
    if ids.min() < 1 or ids.max() >= len(item_vectors):
        raise NotFoundError(f"item ids must be within 1..{len(item_vectors) - 1}")
    q = item_vectors[ids].astype(np.float64).mean(0)
    return np.asarray(q / max(float(np.linalg.norm(q)), 1e-12), dtype=np.float32)


def segment_mask(table: pl.DataFrame, segment: str | None) -> np.ndarray | None:
    """(n,) rows of ``table`` in ``segment``: an RFM segment name, a behavioural segment
    name or a behavioural segment id; None means everyone."""
    if segment is None:
        return None
    if segment in SEGMENTS and "rfm_segment" in table.columns:
        return np.asarray(table["rfm_segment"].to_numpy() == segment)
    if "segment_name" in table.columns and segment in set(table["segment_name"].to_list()):
        return np.asarray(table["segment_name"].to_numpy() == segment)
    if segment.isdigit() and "segment_id" in table.columns:
        m = table["segment_id"].to_numpy() == int(segment)
        if m.any():
            return np.asarray(m)
    raise NotFoundError(f"unknown segment {segment!r} (RFM segments: {', '.join(SEGMENTS)})")


@dataclass
class Plan:
    """Top products of one customer with a reason each."""

    user_id: int
    items: list[int]
    scores: list[float]
    reasons: list[str]


def plan_for_users(
    users: np.ndarray,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    bought: dict[int, np.ndarray],
    titles: dict[int, str],
    k: int = 5,
    candidates: np.ndarray | None = None,
) -> list[Plan]:
    """Each user's top-``k`` unbought candidate items by cosine to the user vector, with the
    reason "similar to <the past purchase the item is closest to>".

    ``item_vectors`` (N+1, D) is indexed by item id (row 0 unused); ``bought[u]`` the user's
    past item ids; ``candidates`` the item ids allowed (default: all with a vector).
    """
    iv = item_vectors.astype(np.float32)
    iv = iv / np.maximum(np.linalg.norm(iv, axis=1, keepdims=True), 1e-12)
    cand = (
        np.asarray(candidates, dtype=np.int64)
        if candidates is not None
        else np.flatnonzero(np.abs(item_vectors).sum(1) > 0)
    )
    cand = cand[cand > 0]
    cv = iv[cand]  # (C, D)
    out = []
    for u, vec in zip(np.asarray(users).tolist(), user_vectors):
        q = vec / max(float(np.linalg.norm(vec)), 1e-12)
        s = cv @ q  # (C,)
        past = np.asarray(bought.get(int(u), np.zeros(0, np.int64)), dtype=np.int64)
        if len(past):
            s = np.where(np.isin(cand, past), -np.inf, s)
        kk = min(k, int(np.isfinite(s).sum()))
        top = np.argsort(-s, kind="stable")[:kk]
        items = cand[top]
        reasons = []
        for it in items.tolist():
            if len(past):
                sim = iv[past] @ iv[it]  # (P,)
                j = int(past[int(np.argmax(sim))])
                reasons.append(f"similar to '{titles.get(j, str(j))}' (cos {float(sim.max()):.2f})")
            else:
                reasons.append("matches the customer's profile")
        out.append(Plan(int(u), items.tolist(), [float(x) for x in s[top]], reasons))
    return out


def bought_before(ds: Dataset, cutoff_ts: int, users: np.ndarray) -> dict[int, np.ndarray]:
    """Distinct item ids each user purchased before the cutoff."""
    g = (
        ds.events.filter((pl.col("ts") < int(cutoff_ts)) & (pl.col("event_type") == "purchase"))
        .filter(pl.col("user_id").is_in(np.asarray(users).tolist()))
        .group_by("user_id")
        .agg(pl.col("item_id").unique())
    )
    return {int(u): np.asarray(i, dtype=np.int64) for u, i in g.iter_rows()}


# --------------------------------------------------------------------------- offline check
def _theme_items(ds: Dataset, pattern: str) -> np.ndarray:
    rx = re.compile(pattern)
    t = ds.items.select("item_id", "title").filter(pl.col("title").is_not_null())
    return np.asarray(
        [i for i, title in t.iter_rows() if rx.search(str(title).lower())], dtype=np.int64
    )


def precision_at(ranked_users: np.ndarray, positives: set[int], n: int) -> float:
    """Share of the first ``n`` users that are positives."""
    top = np.asarray(ranked_users)[:n]
    return float(np.mean([int(u) in positives for u in top.tolist()])) if len(top) else 0.0


def theme_precision(
    ds: Dataset,
    table: pl.DataFrame,
    user_vectors: np.ndarray,
    embed_text: Callable[[list[str]], np.ndarray],
    cutoff_ts: int,
    horizon_days: int,
    *,
    themes: dict[str, tuple[str, str]] | None = None,
    n: int = 200,
) -> pl.DataFrame:
    """Audience precision@n per theme and targeting method on the window after the cutoff.

    ``table`` holds the customers at the cutoff (``user_id``, ``rfm_segment``, ``monetary``,
    ``frequency``) aligned with ``user_vectors``. Positives: customers who purchase a
    product whose title matches the theme's regex in ``[cutoff, cutoff + horizon)``.
    """
    themes = themes or DEFAULT_THEMES
    users = table["user_id"].to_numpy().astype(np.int64)
    search = ExactUserSearch(users, user_vectors)
    start, end = int(cutoff_ts), int(cutoff_ts) + horizon_days * DAY
    window = ds.events.filter(
        (pl.col("ts") >= start) & (pl.col("ts") < end) & (pl.col("event_type") == "purchase")
    )
    past = ds.events.filter((pl.col("ts") < start) & (pl.col("event_type") == "purchase"))
    # RFM targeting: best segments first (SEGMENTS order), then by monetary
    seg_rank = {s: i for i, s in enumerate(SEGMENTS)}
    rfm_order = users[
        np.lexsort(
            (
                users,
                -table["monetary"].to_numpy(),
                np.array([seg_rank[s] for s in table["rfm_segment"].to_list()]),
            )
        )
    ]
    activity = past.group_by("user_id").len()
    act = dict(zip(activity["user_id"].to_list(), activity["len"].to_list()))
    pop_order = users[np.lexsort((users, -np.array([act.get(int(u), 0) for u in users])))]
    rows = []
    for name, (text, pattern) in themes.items():
        items = _theme_items(ds, pattern)
        pos = set(
            window.filter(pl.col("item_id").is_in(items.tolist()))["user_id"].unique().to_list()
        ) & set(users.tolist())
        hist = past.filter(pl.col("item_id").is_in(items.tolist())).group_by("user_id").len()
        hc = dict(zip(hist["user_id"].to_list(), hist["len"].to_list()))
        kw_order = users[np.lexsort((users, -np.array([hc.get(int(u), 0) for u in users])))]
        q = embed_text([text])[0]
        emb_order, _ = search.search(q, len(users))
        # affinity x activity: standardised cosine plus standardised log activity
        cos = search.scores(q)
        la = np.log1p(np.array([act.get(int(u), 0) for u in users], dtype=np.float64))
        mix = (cos - cos.mean()) / (cos.std() + 1e-9) + (la - la.mean()) / (la.std() + 1e-9)
        mix_order = users[np.lexsort((users, -mix))]
        # theme history x affinity x activity: the keyword rule broken by the embedding
        kw = np.log1p(np.array([hc.get(int(u), 0) for u in users], dtype=np.float64))
        hx = 2.0 * (kw - kw.mean()) / (kw.std() + 1e-9) + mix
        hx_order = users[np.lexsort((users, -hx))]
        rows.append(
            {
                "theme": name,
                "query": text,
                "n_theme_items": len(items),
                "base_rate": len(pos) / max(len(users), 1),
                "embedding": precision_at(emb_order, pos, n),
                "embedding_x_activity": precision_at(mix_order, pos, n),
                "rfm_segment": precision_at(rfm_order, pos, n),
                "popularity": precision_at(pop_order, pos, n),
                "keyword_history": precision_at(kw_order, pos, n),
                "history_x_embedding": precision_at(hx_order, pos, n),
            }
        )
    return pl.DataFrame(rows)


AUDIENCE_METHODS: tuple[str, ...] = (
    "embedding",
    "embedding_x_activity",
    "rfm_segment",
    "popularity",
    "keyword_history",
    "history_x_embedding",
)


def choose_method(valid: pl.DataFrame) -> str:
    """The audience method with the best mean precision over the themes of a VALIDATION
    window (:func:`theme_precision` at an earlier cutoff); ties go to the earlier method
    in :data:`AUDIENCE_METHODS`."""
    means = {m: float(valid[m].mean()) for m in AUDIENCE_METHODS if m in valid.columns}  # type: ignore[arg-type]
    if not means:
        raise DataError("no audience method columns in the validation table")
    return max(means, key=lambda m: (means[m], -AUDIENCE_METHODS.index(m)))
