"""Behavioural segments: k-means on user embeddings (+ optional RFM), stable ids, profiles.

* :func:`user_embeddings` gives one vector per customer at a cutoff, from the trained
  user tower (``source="tower"``, via ``towers.inference.load_run``) or, when no tower run
  is available, the value-weighted mean of the MiniLM text vectors of the products the
  customer bought (``source="text"``; the item tower's text path, no sequence model).
* :func:`fit_segments` runs k-means (k given, or chosen by silhouette over a range on a
  sample) and, given the previous :class:`SegmentModel`, warm-starts from its centroids
  and matches new centroids to old ones with the Hungarian algorithm, so a customer's
  segment id survives a refresh when the structure has not changed. New clusters get
  fresh ids; ids of vanished clusters are retired, never reused.
* :func:`profile_segments` describes each segment (size, spend, churn, top categories,
  products and words, price tier) and generates a name from that profile.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from ecomrec.errors import ConfigError, DataError, ModelError
from intake.dataset import Dataset

log = logging.getLogger(__name__)

EmbeddingSource = Literal["tower", "text", "basket"]


# --------------------------------------------------------------------------- embeddings
def text_user_embeddings(
    ds: Dataset, cutoff_ts: int, users: np.ndarray, *, cache_dir: str | Path | None = None
) -> np.ndarray:
    """(n, 384) L2-normalised value-weighted mean MiniLM vector of each user's purchases
    before the cutoff (zero rows for users without any)."""
    import scipy.sparse as sp

    from towers.text_encoder import catalogue_text_embeddings

    items = ds.items.sort("item_id")
    txt = catalogue_text_embeddings(items, cache_dir=cache_dir)  # (n_items_rows, 384)
    table = np.zeros((ds.n_items + 1, txt.shape[1]), np.float32)
    table[items["item_id"].to_numpy()] = txt
    buys = ds.events.filter(
        (pl.col("ts") < int(cutoff_ts)) & (pl.col("event_type") == "purchase")
    ).with_columns(
        (pl.col("quantity").cast(pl.Float64) * pl.col("price").fill_null(1.0)).alias("w")
    )
    row = {int(u): i for i, u in enumerate(np.asarray(users).tolist())}
    b = buys.filter(pl.col("user_id").is_in(list(row)))
    r = np.array([row[int(u)] for u in b["user_id"].to_list()], dtype=np.int64)
    m = sp.csr_matrix(
        (np.log1p(np.maximum(b["w"].to_numpy(), 0.0)), (r, b["item_id"].to_numpy())),
        shape=(len(users), ds.n_items + 1),
    )
    emb = np.asarray(m @ table, dtype=np.float32)  # (n, 384)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norm, 1e-12)


def tower_interactions(tm: Any, ds: Dataset, cutoff_ts: int) -> Any:
    """Sequences before the cutoff in the trained model's item-id space (events of items
    the model does not know are dropped)."""
    from towers.sequences import Interactions

    ev = ds.events.filter(pl.col("ts") < int(cutoff_ts))
    if tm.item_ids.external_ids != ds.item_ids.external_ids:
        remap = np.array(
            [0] + [tm.item_ids.get(e) or 0 for e in ds.item_ids.external_ids], dtype=np.int32
        )
        ev = ev.with_columns(
            pl.Series("item_id", remap[ev["item_id"].to_numpy()], dtype=pl.Int32)
        ).filter(pl.col("item_id") > 0)
    return Interactions.from_events(ev, ds.n_users, len(tm.item_ids))


def tower_batches(tm: Any, ds: Dataset, cutoff_ts: int, users: np.ndarray) -> Any:
    """``idx -> SequenceBatch`` of ``users[idx]`` at the cutoff (for fine-tuning)."""
    from towers.sequences import batch_for_users

    inter = tower_interactions(tm, ds, cutoff_ts)
    users = np.asarray(users, dtype=np.int64)

    def batches(idx: np.ndarray) -> Any:
        return batch_for_users(inter, users[idx], tm.max_len)

    return batches


def tower_user_embeddings(
    run_dir: str | Path, ds: Dataset, cutoff_ts: int, users: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """(n, D) user-tower vectors of the users' sequences before the cutoff."""
    from towers.inference import load_run
    from towers.sequences import batch_for_users

    tm = load_run(run_dir)
    enc = tm.user_encoder()
    inter = tower_interactions(tm, ds, cutoff_ts)
    out = []
    users = np.asarray(users, dtype=np.int64)
    for s in range(0, len(users), batch_size):
        out.append(
            np.asarray(enc.encode(batch_for_users(inter, users[s : s + batch_size], tm.max_len)))
        )
    return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def user_embeddings(
    ds: Dataset,
    cutoff_ts: int,
    users: np.ndarray,
    *,
    source: EmbeddingSource = "text",
    run_dir: str | Path | None = None,
) -> np.ndarray:
    """(n, D) embeddings of ``users`` at the cutoff from the chosen source."""
    if source == "tower":
        if run_dir is None:
            raise ConfigError("source='tower' needs a trained run directory (--run)")
        return tower_user_embeddings(run_dir, ds, cutoff_ts, users)
    if source == "text":
        return text_user_embeddings(ds, cutoff_ts, users)
    if source == "basket":
        if run_dir is None:
            raise ConfigError("source='basket' needs a saved basket tower directory (--run)")
        return basket_user_embeddings(run_dir, ds, cutoff_ts, users)
    raise ConfigError(f"unknown embedding source {source!r}; expected tower, text or basket")


def basket_user_embeddings(
    run_dir: str | Path, ds: Dataset, cutoff_ts: int, users: np.ndarray
) -> np.ndarray:
    """(n, D + 1) transaction-log tower vectors of ``users`` from their purchases before
    the cutoff (:class:`training.basket.BasketRetriever` saved in ``run_dir``): the
    L2-normalised user vector and its log norm (how much co-purchase evidence it holds)."""
    import torch

    from towers.sequences import Interactions, bag_for_users
    from training.basket import BasketRetriever

    r = BasketRetriever.load(Path(run_dir))
    assert r.model is not None
    ev = ds.events.filter((pl.col("ts") < cutoff_ts) & (pl.col("event_type") == "purchase"))
    inter = Interactions.from_events(ev, len(ds.users), len(ds.item_ids))
    out = []
    with torch.no_grad():
        for start in range(0, len(users), 1024):
            bag = bag_for_users(inter, np.asarray(users[start : start + 1024]), now=cutoff_ts)
            u = r.model.user_vectors(r.model.bag_tensors(bag)).float()  # (B, D)
            norm = u.norm(dim=1, keepdim=True).clamp(min=1e-6)
            out.append(torch.cat([u / norm, norm.log()], 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, r.model.cfg.dim + 1), np.float32)


# --------------------------------------------------------------------------- clustering
@dataclass(frozen=True)
class SegmentConfig:
    """k-means settings; ``k=None`` picks k by silhouette in ``[k_min, k_max]``."""

    k: int | None = None
    k_min: int = 4
    k_max: int = 10
    with_rfm: bool = False
    rfm_weight: float = 0.5
    seed: int = 0
    n_init: int = 4
    silhouette_sample: int = 2000

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 2:
            raise ConfigError("segments.k must be >= 2")
        if not 2 <= self.k_min <= self.k_max:
            raise ConfigError("need 2 <= k_min <= k_max")


@dataclass
class SegmentModel:
    """Centroids in the clustering space and their stable segment ids."""

    cfg: SegmentConfig
    centroids: np.ndarray  # (k, D') in the clustering space
    ids: np.ndarray  # (k,) int64 stable segment id of each centroid
    next_id: int  # the next never-used id
    rfm_stats: tuple[list[float], list[float]] | None = None  # mean/std of the RFM block
    silhouette: dict[int, float] = field(default_factory=dict)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """(n,) stable segment id of the nearest centroid for clustering inputs ``x`` (n, D')."""
        d = ((x[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)  # (n, k)
        return np.asarray(self.ids[np.argmin(d, axis=1)])

    def to_dict(self) -> dict[str, Any]:
        from ecomrec.config import to_dict

        return {
            "cfg": to_dict(self.cfg),
            "centroids": self.centroids.tolist(),
            "ids": self.ids.tolist(),
            "next_id": self.next_id,
            "rfm_stats": self.rfm_stats,
            "silhouette": {str(k): v for k, v in self.silhouette.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentModel:
        from ecomrec.config import from_dict

        rs = d.get("rfm_stats")
        return cls(
            cfg=from_dict(SegmentConfig, d["cfg"]),
            centroids=np.asarray(d["centroids"], dtype=np.float64),
            ids=np.asarray(d["ids"], dtype=np.int64),
            next_id=int(d["next_id"]),
            rfm_stats=(list(rs[0]), list(rs[1])) if rs else None,
            silhouette={int(k): float(v) for k, v in d.get("silhouette", {}).items()},
        )


RFM_CLUSTER_COLUMNS = ("recency_days", "frequency", "monetary")


def cluster_inputs(
    emb: np.ndarray,
    rfm: pl.DataFrame | None,
    cfg: SegmentConfig,
    stats: tuple[list[float], list[float]] | None = None,
) -> tuple[np.ndarray, tuple[list[float], list[float]] | None]:
    """(n, D') clustering space: L2-normalised embeddings, plus (``with_rfm``) the log
    recency/frequency/monetary standardised and scaled so the block weighs ``rfm_weight``."""
    e = emb.astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    if not cfg.with_rfm:
        return e, None
    if rfm is None:
        raise ConfigError("with_rfm=True needs the RFM table")
    z = np.log1p(np.maximum(rfm.select(RFM_CLUSTER_COLUMNS).to_numpy().astype(np.float64), 0.0))
    if stats is None:
        stats = (z.mean(0).tolist(), (z.std(0) + 1e-9).tolist())
    z = (z - np.asarray(stats[0])) / np.asarray(stats[1])
    # each standardised column has unit variance; scale the block to ~rfm_weight norm
    z = z * cfg.rfm_weight / math.sqrt(len(RFM_CLUSTER_COLUMNS))
    return np.concatenate([e, z], 1), stats


def match_ids(prev: SegmentModel, centroids: np.ndarray) -> tuple[np.ndarray, int]:
    """Stable ids for ``centroids`` (k, D'): Hungarian matching on squared distance to the
    previous centroids; unmatched new centroids get fresh ids. Returns (ids, next_id)."""
    from scipy.optimize import linear_sum_assignment

    if prev.centroids.shape[1] != centroids.shape[1]:
        raise ModelError("previous segments live in a different space (dimension changed)")
    cost = ((centroids[:, None, :] - prev.centroids[None, :, :]) ** 2).sum(-1)  # (k_new, k_old)
    rows, cols = linear_sum_assignment(cost)
    ids = np.full(len(centroids), -1, dtype=np.int64)
    ids[rows] = prev.ids[cols]
    nxt = prev.next_id
    for i in np.flatnonzero(ids < 0):
        ids[i] = nxt
        nxt += 1
    return ids, nxt


def choose_k(x: np.ndarray, cfg: SegmentConfig) -> tuple[int, dict[int, float]]:
    """k in [k_min, k_max] with the best silhouette (on a fixed sample of ``x``)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(cfg.seed)
    sample = (
        x
        if len(x) <= cfg.silhouette_sample
        else x[rng.choice(len(x), cfg.silhouette_sample, replace=False)]
    )
    scores: dict[int, float] = {}
    for k in range(cfg.k_min, min(cfg.k_max, len(sample) - 1) + 1):
        lab = KMeans(k, n_init=cfg.n_init, random_state=cfg.seed).fit_predict(sample)
        scores[k] = float(silhouette_score(sample, lab)) if len(set(lab)) > 1 else -1.0
    if not scores:
        raise DataError(f"too few customers ({len(x)}) to choose k")
    best = max(scores, key=lambda k: (scores[k], -k))
    log.info("silhouette by k: %s -> k=%d", {k: round(v, 4) for k, v in scores.items()}, best)
    return best, scores


def fit_segments(
    x: np.ndarray,
    cfg: SegmentConfig,
    previous: SegmentModel | None = None,
    rfm_stats: tuple[list[float], list[float]] | None = None,
) -> SegmentModel:
    """k-means on clustering inputs ``x`` (n, D'); ids stable w.r.t. ``previous``."""
    from sklearn.cluster import KMeans

    if len(x) < 2:
        raise DataError("need at least 2 customers to segment")
    sil: dict[int, float] = {}
    if cfg.k is not None:
        k = cfg.k
    elif previous is not None:
        k = len(previous.ids)
    else:
        k, sil = choose_k(x, cfg)
    k = min(k, len(x))
    if (
        previous is not None
        and len(previous.ids) == k
        and previous.centroids.shape[1] == x.shape[1]
    ):
        km = KMeans(k, init=previous.centroids, n_init=1, random_state=cfg.seed).fit(x)
    else:
        km = KMeans(k, n_init=cfg.n_init, random_state=cfg.seed).fit(x)
    cents = np.asarray(km.cluster_centers_, dtype=np.float64)
    if previous is None:
        # first fit: number segments by size (largest = 0) so ids read naturally
        sizes = np.bincount(km.labels_, minlength=k)
        order = np.argsort(-sizes, kind="stable")
        ids = np.empty(k, np.int64)
        ids[order] = np.arange(k)
        nxt = k
    else:
        ids, nxt = match_ids(previous, cents)
    return SegmentModel(cfg, cents, ids, nxt, rfm_stats, sil)


# --------------------------------------------------------------------------- profiles
_STOP = {
    "of",
    "and",
    "the",
    "set",
    "in",
    "with",
    "a",
    "for",
    "de",
    "to",
    "on",
    "s",
    "pack",
    "size",
    "design",
    "assorted",
    "colour",
    "colours",
    "small",
    "large",
    "mini",
    "big",
    "medium",
    "box",
}
_TIER_NAMES = ("Budget", "Mid-range", "Premium")


def _words(title: str | None) -> list[str]:
    if not title:
        return []
    return [w for w in re.findall(r"[a-z]+", title.lower()) if len(w) > 2 and w not in _STOP]


def profile_segments(
    ds: Dataset,
    cutoff_ts: int,
    users: np.ndarray,
    seg: np.ndarray,
    rfm: pl.DataFrame | None = None,
    churn: np.ndarray | None = None,
    top_n: int = 5,
) -> list[dict[str, Any]]:
    """One profile dict per segment id (sorted by id): size, share, mean spend and recency,
    churn rate (observed labels or mean predicted probability), dominant RFM segment, top
    categories, products and distinctive words, price tier and a generated ``name``."""
    users = np.asarray(users, dtype=np.int64)
    seg = np.asarray(seg, dtype=np.int64)
    who = pl.DataFrame({"user_id": users.astype(np.int32), "segment": seg})
    buys = (
        ds.events.filter((pl.col("ts") < int(cutoff_ts)) & (pl.col("event_type") == "purchase"))
        .join(who, on="user_id", how="inner")
        .join(ds.items.select("item_id", "title", "category"), on="item_id", how="left")
    )
    # price tier from the median unit price paid, tertiles over all customers
    med = buys.group_by("user_id").agg(pl.col("price").median().alias("p")).join(who, on="user_id")
    edges = np.quantile(med["p"].to_numpy(), [1 / 3, 2 / 3]) if med.height else np.array([0.0, 0.0])
    # word frequency over distinct (user, word) pairs -> distinctiveness vs all customers
    uw: dict[int, set[str]] = {}
    for u, t in buys.select("user_id", "title").unique().iter_rows():
        uw.setdefault(int(u), set()).update(_words(t))
    seg_of = dict(zip(users.tolist(), seg.tolist()))
    all_count: Counter[str] = Counter()
    seg_count: dict[int, Counter[str]] = {}
    for u, ws in uw.items():
        all_count.update(ws)
        seg_count.setdefault(seg_of[u], Counter()).update(ws)
    n_all = max(len(uw), 1)
    rfm_j = who.join(rfm, on="user_id", how="left") if rfm is not None else None
    profiles: list[dict[str, Any]] = []
    for s in sorted(set(seg.tolist())):
        mask = seg == s
        n = int(mask.sum())
        b = buys.filter(pl.col("segment") == s)
        p: dict[str, Any] = {"segment": int(s), "size": n, "share": n / len(users)}
        if rfm_j is not None:
            r = rfm_j.filter(pl.col("segment") == s)
            p["mean_monetary"] = float(r["monetary"].mean() or 0.0)  # type: ignore[arg-type]
            p["mean_recency_days"] = float(r["recency_days"].mean() or 0.0)  # type: ignore[arg-type]
            p["mean_frequency"] = float(r["frequency"].mean() or 0.0)  # type: ignore[arg-type]
            top_rfm = (
                r.group_by("rfm_segment")
                .len()
                .sort(["len", "rfm_segment"], descending=[True, False])
            )
            p["top_rfm_segment"] = str(top_rfm["rfm_segment"][0]) if top_rfm.height else None
        if churn is not None:
            p["churn_rate"] = float(np.mean(churn[mask]))
        cats = (
            b.filter(pl.col("category").is_not_null())
            .group_by("category")
            .len()
            .sort(["len", "category"], descending=[True, False])
            .head(top_n)
        )
        p["top_categories"] = cats["category"].to_list()
        prods = (
            b.filter(pl.col("title").is_not_null())
            .group_by("title")
            .agg(pl.col("user_id").n_unique().alias("n"))
            .sort(["n", "title"], descending=[True, False])
            .head(top_n)
        )
        p["top_products"] = prods["title"].to_list()
        sc = seg_count.get(int(s), Counter())
        n_seg = max(sum(1 for u in uw if seg_of[u] == s), 1)
        # lift of the share of customers using the word, smoothed; frequent words only
        # share of the segment using the word x log of its lift over everyone (smoothed):
        # frequent in the segment AND more frequent there than elsewhere
        lifted = sorted(
            (
                (w, (c / n_seg) * math.log((c / n_seg) / ((all_count[w] + 5) / (n_all + 5))))
                for w, c in sc.items()
                if c >= max(5, 0.1 * n_seg)
            ),
            key=lambda t: (-t[1], t[0]),
        )
        p["top_words"] = [w for w, _ in lifted[:top_n]]
        pm = med.filter(pl.col("segment") == s)["p"].to_numpy()
        p["median_unit_price"] = float(np.median(pm)) if len(pm) else None
        p["price_tier"] = (
            _TIER_NAMES[int(np.searchsorted(edges, np.median(pm)))] if len(pm) else None
        )
        profiles.append(p)
    overall = float(np.mean(churn)) if churn is not None else None
    for p in profiles:
        p["name"] = _name(p, overall)
    _dedupe_names(profiles)
    return profiles


def _name(p: dict[str, Any], overall_churn: float | None = None) -> str:
    """A short descriptive name: '<tier> <theme> <activity>' from the profile; the activity
    compares the segment's churn rate with the overall one (else its main RFM segment)."""
    tier = p.get("price_tier") or ""
    theme_src = p.get("top_categories") or p.get("top_words") or []
    # category paths ("Beauty > Makeup > Nails") are named by their leaf
    theme = " & ".join(str(w).split(">")[-1].strip().title() for w in theme_src[:2]) or "Mixed"
    rs = p.get("top_rfm_segment")
    cr = p.get("churn_rate")
    if overall_churn is not None and cr is not None and overall_churn > 0:
        if cr > 1.15 * overall_churn:
            act = "lapsing buyers"
        elif cr < 0.85 * overall_churn:
            act = "loyalists"
        else:
            act = "regulars"
    elif rs in ("Champions", "Loyal"):
        act = "loyalists"
    elif rs in ("At Risk", "Can't Lose", "Hibernating", "About to Sleep"):
        act = "lapsing buyers"
    elif rs in ("New", "Promising", "Potential Loyalists"):
        act = "newcomers"
    else:
        act = "buyers"
    return " ".join(x for x in (tier, theme, act) if x)


def _dedupe_names(profiles: list[dict[str, Any]]) -> None:
    seen: Counter[str] = Counter(p["name"] for p in profiles)
    for p in profiles:
        if seen[p["name"]] > 1:
            p["name"] = f"{p['name']} #{p['segment']}"


# --------------------------------------------------------------------------- neighbours
def nearest_customers(
    emb: np.ndarray,
    users: np.ndarray,
    query: np.ndarray,
    k: int = 10,
    exclude: np.ndarray | None = None,
) -> pl.DataFrame:
    """The ``k`` customers whose embeddings (``emb`` (n, D), rows aligned with ``users``) are
    nearest by cosine to ``query`` (D,): a customer's own vector or a segment centroid.
    ``exclude`` drops user ids (e.g. the query customer). Columns ``rank, user_id, cosine``."""
    if emb.shape[0] != len(users):
        raise DataError(f"embeddings have {emb.shape[0]} rows for {len(users)} customers")
    if query.shape != (emb.shape[1],):
        raise DataError(f"query has shape {query.shape}, want ({emb.shape[1]},)")
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # (n, D)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    cos = e @ q  # (n,)
    if exclude is not None and len(exclude):
        cos = np.where(np.isin(users, exclude), -np.inf, cos)
    top = np.argsort(-cos, kind="stable")[: min(k, int(np.isfinite(cos).sum()))]
    return pl.DataFrame(
        {
            "rank": np.arange(1, len(top) + 1, dtype=np.int32),
            "user_id": users[top].astype(np.int64),
            "cosine": cos[top].astype(np.float64),
        }
    )


def segment_neighbours(
    emb: np.ndarray, users: np.ndarray, segment: np.ndarray, k: int = 10
) -> pl.DataFrame:
    """Per segment (``segment`` (n,) label of each customer): the ``k`` customers nearest
    to the segment's centroid (mean of its members' normalised embeddings), the most
    typical members for an analyst. Columns ``segment, rank, user_id, cosine``; write it
    with ``DataFrame.write_csv`` to export."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    frames = []
    for s in np.unique(segment):
        c = e[segment == s].mean(0)
        nn = nearest_customers(e, users, c, k)
        frames.append(nn.with_columns(pl.lit(str(s)).alias("segment")))
    if not frames:
        return pl.DataFrame(
            schema={"segment": pl.Utf8, "rank": pl.Int32, "user_id": pl.Int64, "cosine": pl.Float64}
        )
    return pl.concat(frames).select("segment", "rank", "user_id", "cosine")
