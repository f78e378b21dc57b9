"""Complementary products ("frequently bought together", "complete the basket").

:class:`ComplementModel` scores every catalogue item for a basket (the items in a cart or
on a product page) from co-purchase statistics of the shop's invoices, optionally
personalised by the customer's purchase history.  One model, one scoring function
(:meth:`ComplementModel.score`) for ``benchmarks/complements.py`` and the gRPC
``CompleteBasket`` call (``serving/complete.py``); the model is fitted from the canonical
events frame in a second or two (Online Retail: 3,676 items), so the service builds it at
start-up.

The score of item ``j`` for basket ``B`` and customer history ``H``::

    s(j) = sum_{i in B} W[i, j]                       co-purchase (EASE, recency-weighted)
         + conf_weight * max_{i in B} conf(i -> j)     the strongest association rule
         + personal_weight * sum_{h in H} W[h, j] / sqrt(|H|)   the customer's own baskets
         + own_weight * [j in H]                       items the customer buys

* ``W`` is EASE's closed-form item-item matrix (Steck 2019, :func:`towers.ease.ease_weights`)
  over invoices (a basket = one customer's purchases at one timestamp), each invoice
  weighted ``0.5 ** (age / half_life_days)`` (seasonal shops drift), kept dense (its
  negative weights matter).  Above ``ease_max_items`` items (the inversion is O(N^3),
  the matrix (N+1)^2) ``W`` is the cosine of the invoice co-occurrence counts instead,
  sparse: the 200 largest of each row.
* ``conf(i -> j) = c(i, j) / c(i)`` (invoice counts, same recency weights) with at least
  ``min_support`` invoices holding both.
* Ties (items no basket item co-occurs with) are broken by recency-weighted popularity.

Near-duplicates (the same product in another colour or size) are never complements:
:func:`title_stem` normalises a title (lower case, punctuation, colour and size words,
numbers and units removed) and items whose stem equals a basket item's stem are excluded,
like the basket's own items.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from ecomrec.config import from_dict, to_dict
from ecomrec.errors import ConfigError, ModelError
from towers.ease import ease_weights

log = logging.getLogger(__name__)

#: Words dropped from a title before comparing stems (colours, sizes, pack words).
_VARIANT_TEXT = """
    red blue green yellow pink purple violet black white grey gray silver gold golden
    orange brown beige cream ivory navy teal turquoise aqua lilac lavender mint khaki
    natural clear multi multicolour multicolor colour color colours colors assorted pastel
    small medium large mini jumbo giant big little tiny xs s m l xl xxl xxxl size sizes
    regular petite tall slim wide
    set pack packs of piece pieces pc pcs count ct pair pairs
    oz fl ml ounce ounces litre liter
"""
VARIANT_WORDS = frozenset(_VARIANT_TEXT.split())
#: Units that follow a number in a size ("16 fl oz", "250ml", "2 x 50 g").
_UNITS = r"(?:fl|oz|ounce|ounces|ml|l|litre|liter|g|gram|grams|kg|lb|lbs|cm|mm|m|inch|in|x)"
_NUMBER_UNIT = re.compile(rf"\b\d+(?:[.,]\d+)?(?:\s*{_UNITS}\b)*")
_WORD = re.compile(r"[a-z]+")


def title_stem(title: str | None) -> str | None:
    """The near-duplicate key of a title: lower case, numbers with their units, colour,
    size and pack words removed, the remaining words in order; None when nothing is left
    (such items are never near-duplicates of anything).

    ``"WHITE HANGING HEART T-LIGHT HOLDER"`` and ``"RED HANGING HEART T-LIGHT HOLDER"``
    share ``"hanging heart t light holder"``; ``"JUMBO BAG RED RETROSPOT"`` and
    ``"JUMBO BAG PINK POLKADOT"`` do not.
    """
    if not title:
        return None
    t = _NUMBER_UNIT.sub(" ", title.lower())
    words = [w for w in _WORD.findall(t) if w not in VARIANT_WORDS]
    return " ".join(words) or None


@dataclass(frozen=True)
class ComplementConfig:
    """Hyper-parameters of :class:`ComplementModel` (chosen on a validation month by
    ``benchmarks/complements.py``; the defaults are its choice on Online Retail)."""

    ease_l2: float = 25.0
    half_life_days: float = 0.0  # invoice weight 0.5 ** (age / half-life); 0 = no decay
    # co-purchase weights kept per item; 0 = all (EASE: a dense (N+1)^2 float32 matrix,
    # 54 MB at 3,676 items: EASE's negative weights matter, the top 200 positive ones
    # alone lost 0.009 validation NDCG@10 on Online Retail); the cosine kind keeps 200
    neighbours: int = 0
    conf_weight: float = 0.3
    min_support: int = 2  # invoices holding both items, for an association rule
    personal_weight: float = 0.1
    own_weight: float = 0.2
    ease_max_items: int = 8000  # above: cosine co-occurrence instead of EASE

    def __post_init__(self) -> None:
        if self.ease_l2 <= 0 or self.half_life_days < 0 or self.neighbours < 0:
            raise ConfigError("ComplementConfig: ease_l2 > 0, half_life_days >= 0, neighbours >= 0")
        for name in ("conf_weight", "personal_weight", "own_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ComplementConfig.{name} must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ComplementConfig:
        return from_dict(cls, dict(data))


def invoices(events: pl.DataFrame) -> pl.DataFrame:
    """Distinct ``(basket, user_id, ts, item_id)`` of the purchases: a basket is one
    customer's purchases at one timestamp (an invoice; a review day on Beauty)."""
    p = events.filter(pl.col("event_type") == "purchase").select("user_id", "ts", "item_id")
    p = p.unique().sort("user_id", "ts", "item_id")
    return p.with_columns(
        (pl.struct("user_id", "ts").rank("dense") - 1).cast(pl.Int64).alias("basket")
    )


_SPARSE_NEIGHBOURS = 200  # kept per row where a dense matrix is not used


def _top_per_row(m: sp.csr_matrix | np.ndarray, k: int) -> sp.csr_matrix:
    """The ``k`` largest positive entries of each row, as CSR float32."""
    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float32)
        rows, cols, vals = [], [], []
        for r in range(m.shape[0]):
            a, b = m.indptr[r], m.indptr[r + 1]
            d, c = m.data[a:b], m.indices[a:b]
            keep = d > 0
            d, c = d[keep], c[keep]
            if len(d) > k:
                top = np.argpartition(-d, k - 1)[:k]
                d, c = d[top], c[top]
            rows.append(np.full(len(d), r, np.int64))
            cols.append(c)
            vals.append(d)
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=m.shape,
            dtype=np.float32,
        )
    dm = np.asarray(m, np.float32)  # (N+1, N+1)
    n = dm.shape[0]
    k = min(k, n)
    topk = np.argpartition(-dm, k - 1, axis=1)[:, :k]  # (N+1, k)
    tv = np.take_along_axis(dm, topk, axis=1)
    pos = tv > 0
    rr = np.repeat(np.arange(n), k).reshape(n, k)
    return sp.csr_matrix((tv[pos], (rr[pos], topk[pos])), shape=(n, n), dtype=np.float32)


def _gather(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column ids, values) of the stored entries of ``rows`` (scipy's row slicing costs
    ~0.1 ms per call in overhead; a request needs three)."""
    a, b = m.indptr[rows], m.indptr[rows + 1]
    if len(rows) == 1:
        return m.indices[a[0] : b[0]], m.data[a[0] : b[0]]
    return (
        np.concatenate([m.indices[i:j] for i, j in zip(a, b, strict=True)]),
        np.concatenate([m.data[i:j] for i, j in zip(a, b, strict=True)]),
    )


def row_sum(m: sp.csr_matrix | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(N+1,) float64 sum of ``rows`` of ``m``."""
    if isinstance(m, np.ndarray):
        return m[rows].sum(axis=0, dtype=np.float64)
    idx, val = _gather(m, rows)
    return np.bincount(idx, weights=val, minlength=m.shape[1])


def row_max(m: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """(N+1,) float64 maximum of ``rows`` of a non-negative sparse ``m`` (0 where empty)."""
    idx, val = _gather(m, rows)
    out = np.zeros(m.shape[1])
    np.maximum.at(out, idx, val)
    return out


def entries(m: sp.csr_matrix | np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(R, C) float64 ``m[rows][:, cols]`` (sparse: sorted column indices required)."""
    if isinstance(m, np.ndarray):
        return np.asarray(m[np.ix_(rows, cols)], np.float64)
    out = np.zeros((len(rows), len(cols)))
    for r, row in enumerate(rows.tolist()):
        idx = m.indices[m.indptr[row] : m.indptr[row + 1]]
        if not len(idx):
            continue
        pos = np.minimum(np.searchsorted(idx, cols), len(idx) - 1)
        hit = idx[pos] == cols
        out[r, hit] = m.data[m.indptr[row] + pos[hit]]
    return out


@dataclass
class ComplementModel:
    """Sparse co-purchase weights, association-rule confidences and popularity over the
    catalogue's dense ids (row/column 0 is padding)."""

    cfg: ComplementConfig
    weights: sp.csr_matrix | np.ndarray  # (N+1, N+1) W: dense, or top ``neighbours`` per row
    confidence: sp.csr_matrix  # (N+1, N+1) conf(i -> j), top ``neighbours`` per row
    popularity: np.ndarray  # (N+1,) float64 in [0, 1], recency-weighted invoice counts
    stems: tuple[str | None, ...]  # (N+1,) near-duplicate key of each item
    kind: str = "ease"  # "ease" | "cosine"
    _stem_groups: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n_items(self) -> int:
        return int(self.weights.shape[0]) - 1

    @classmethod
    def fit(
        cls,
        events: pl.DataFrame,
        items: pl.DataFrame,
        n_items: int,
        cfg: ComplementConfig | None = None,
        now: int | None = None,
    ) -> ComplementModel:
        """Fit on the purchases of ``events`` (dense ids ``1..n_items``); ``now`` (unix
        seconds) is the reference time of the recency weights (default: the last event)."""
        cfg = cfg or ComplementConfig()
        inv = invoices(events)
        n = n_items + 1
        if inv.height == 0:
            raise ModelError("no purchases to fit complements on")
        b = inv["basket"].to_numpy()
        it = inv["item_id"].to_numpy().astype(np.int64)
        ts_of = inv.group_by("basket").agg(pl.col("ts").first()).sort("basket")["ts"].to_numpy()
        ref = int(ts_of.max()) if now is None else int(now)
        if cfg.half_life_days > 0:
            age = np.maximum(ref - ts_of, 0) / 86400.0
            w = np.power(0.5, age / cfg.half_life_days)  # (n_baskets,)
        else:
            w = np.ones(len(ts_of))
        x = sp.csr_matrix(
            (np.ones(len(b), np.float32), (b, it)), shape=(len(ts_of), n), dtype=np.float32
        )  # (baskets, N+1) binary
        x.sum_duplicates()
        x.data[:] = 1.0
        xw = sp.diags(np.sqrt(w).astype(np.float32)) @ x  # rows scaled: X^T X is weighted
        co = (xw.T @ xw).tocsr()  # (N+1, N+1) weighted co-occurrence
        count = np.asarray(co.diagonal()).astype(np.float64)  # (N+1,) weighted invoices
        raw = (x.T @ x).tocsr()  # unweighted counts, for the support threshold
        co_off = co - sp.diags(co.diagonal())
        co_off.eliminate_zeros()
        # association rules: conf(i -> j) = c(i, j) / c(i), support >= min_support invoices
        support = raw.multiply(co_off > 0).tocsr()
        conf = sp.diags(1.0 / np.maximum(count, 1e-12)) @ co_off.multiply(
            support >= cfg.min_support
        )
        keep = cfg.neighbours or _SPARSE_NEIGHBOURS
        conf = _top_per_row(sp.csr_matrix(conf), keep)
        ww: sp.csr_matrix | np.ndarray
        if n_items <= cfg.ease_max_items:
            kind = "ease"
            dense = ease_weights(xw, cfg.ease_l2)  # (N+1, N+1)
            ww = _top_per_row(dense, cfg.neighbours) if cfg.neighbours else dense
        else:
            kind = "cosine"
            inv_norm = 1.0 / np.sqrt(np.maximum(count, 1e-12))
            ww = _top_per_row(sp.diags(inv_norm) @ co_off @ sp.diags(inv_norm), keep)
        pop = count / max(float(count.max()), 1e-12)
        pop[0] = 0.0
        stems: list[str | None] = [None] * n
        for i, t in zip(items["item_id"].to_list(), items["title"].to_list(), strict=True):
            if 1 <= int(i) <= n_items:
                stems[int(i)] = title_stem(t)
        log.info(
            "complements: %s weights, %d invoices, %d items, %s",
            kind,
            len(ts_of),
            n_items,
            "dense" if isinstance(ww, np.ndarray) else f"{ww.nnz / max(n_items, 1):.1f} per item",
        )
        conf.sort_indices()
        if not isinstance(ww, np.ndarray):
            ww.sort_indices()
        return cls(cfg, ww, conf, pop, tuple(stems), kind)

    # -- near-duplicates --------------------------------------------------------------
    def near_duplicates(self, basket: Sequence[int]) -> np.ndarray:
        """(M,) int64 ids whose :func:`title_stem` equals a basket item's (the basket's
        own items included)."""
        if not self._stem_groups:
            groups: dict[str, list[int]] = {}
            for i, s in enumerate(self.stems):
                if s is not None:
                    groups.setdefault(s, []).append(i)
            self._stem_groups.update(
                {s: np.asarray(v, np.int64) for s, v in groups.items() if len(v) > 1}
            )
        out = [np.asarray(list(basket), np.int64)]
        for i in basket:
            s = self.stems[i] if 0 <= i < len(self.stems) else None
            g = self._stem_groups.get(s) if s is not None else None
            if g is not None:
                out.append(g)
        return np.unique(np.concatenate(out))

    # -- scoring ----------------------------------------------------------------------
    def parts(
        self, basket: Sequence[int], history: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(co-purchase (N+1,), association (N+1,), personal (N+1,)) score parts, before
        exclusions; ``history`` = the customer's distinct purchased items."""
        b = np.asarray(list(basket), np.int64)
        co = row_sum(self.weights, b)  # (N+1,)
        assoc = row_max(self.confidence, b)  # (N+1,)
        personal = np.zeros(self.n_items + 1)
        h = np.asarray(list(history), np.int64)
        if len(h):
            personal += self.cfg.personal_weight * row_sum(self.weights, h) / math.sqrt(len(h))
            personal[h] += self.cfg.own_weight
        return co, assoc, personal

    def score(self, basket: Sequence[int], history: Sequence[int] = ()) -> np.ndarray:
        """(N+1,) float64 scores of every item for ``basket`` (and the customer's
        purchased items ``history``); the basket, its near-duplicates and padding get
        -inf.  Ties are broken by popularity (a 1e-6 share)."""
        co, assoc, personal = self.parts(basket, history)
        s = co + self.cfg.conf_weight * assoc + personal + 1e-6 * self.popularity
        s[self.near_duplicates(basket)] = -np.inf
        s[0] = -np.inf
        return s

    # -- persistence ------------------------------------------------------------------
    def save(self, out: str | Path) -> None:
        """``complements.npz`` + ``complements.json`` (config, kind, stems) in ``out``."""
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        w, c = self.weights, self.confidence
        arrays = {"c_data": c.data, "c_indices": c.indices, "c_indptr": c.indptr}
        if sp.issparse(w):
            ws = sp.csr_matrix(w)
            arrays |= {"w_data": ws.data, "w_indices": ws.indices, "w_indptr": ws.indptr}
        else:
            arrays["w_dense"] = np.asarray(w)
        np.savez_compressed(d / "complements.npz", popularity=self.popularity, **arrays)
        meta = {"config": to_dict(self.cfg), "kind": self.kind, "stems": list(self.stems)}
        (d / "complements.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> ComplementModel:
        d = Path(path)
        try:
            meta = json.loads((d / "complements.json").read_text())
            z = np.load(d / "complements.npz")
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read a complements model in {d}: {e}") from e
        n = len(meta["stems"])
        w: sp.csr_matrix | np.ndarray = (
            z["w_dense"]
            if "w_dense" in z
            else sp.csr_matrix((z["w_data"], z["w_indices"], z["w_indptr"]), shape=(n, n))
        )
        c = sp.csr_matrix((z["c_data"], z["c_indices"], z["c_indptr"]), shape=(n, n))
        c.sort_indices()
        if not isinstance(w, np.ndarray):
            w.sort_indices()
        cfg = ComplementConfig.from_dict(meta["config"])
        return cls(cfg, w, c, z["popularity"], tuple(meta["stems"]), meta["kind"])
