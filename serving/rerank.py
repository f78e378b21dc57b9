"""Segment-aware re-ranking: pure functions over arrays, with reason codes.

A policy (per segment, from TOML) weighs five signals of each ANN candidate:

``relevance``       cosine of the user and item vectors (the ANN score)
``popularity``      the item's popularity among the customer's segment, in [0, 1]
``price_affinity``  closeness of the item price to the customer's usual price (log scale)
``novelty``         1 when the item's category is new to the customer
``boosts``          business boosts for category prefixes or items

and then picks the list greedily with maximal marginal relevance (MMR) over
categories: ``(1 - diversity) * score - diversity * [category already picked]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecomrec.config import from_dict, load_toml
from ecomrec.errors import ConfigError

# Reason codes (stable strings: clients may key UI copy on them).
RELEVANT = "RELEVANT"
POPULAR_IN_SEGMENT = "POPULAR_IN_SEGMENT"
PRICE_FIT = "PRICE_FIT"
NEW_FOR_YOU = "NEW_FOR_YOU"
DIVERSITY = "DIVERSITY"
BOOSTED = "BOOSTED"
POPULAR_FALLBACK = "POPULAR_FALLBACK"
SIMILAR = "SIMILAR"


@dataclass(frozen=True)
class Boost:
    """Add ``weight`` to items whose category starts with ``category`` or that are listed."""

    category: str = ""
    item_ids: tuple[str, ...] = ()
    weight: float = 0.0


@dataclass(frozen=True)
class RerankPolicy:
    """Weights of one segment's re-ranking (see the module docstring)."""

    relevance: float = 1.0
    popularity: float = 0.0
    price_affinity: float = 0.0
    novelty: float = 0.0
    diversity: float = 0.0
    category_depth: int = 3
    boosts: tuple[Boost, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.diversity < 1.0:
            raise ConfigError(f"RerankPolicy.diversity must be in [0, 1), got {self.diversity}")
        if self.category_depth < 1:
            raise ConfigError("RerankPolicy.category_depth must be >= 1")
        for name in ("relevance", "popularity", "price_affinity", "novelty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"RerankPolicy.{name} must be >= 0")


@dataclass(frozen=True)
class RerankPolicies:
    """The default policy and per-segment overrides."""

    default: RerankPolicy = field(default_factory=RerankPolicy)
    segments: Mapping[str, RerankPolicy] = field(default_factory=dict)

    def for_segments(self, *segments: str | None) -> tuple[str | None, RerankPolicy]:
        """The first of ``segments`` that has a policy, else the default."""
        for s in segments:
            if s and s in self.segments:
                return s, self.segments[s]
        return None, self.default

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RerankPolicies:
        unknown = set(data) - {"default", "segments"}
        if unknown:
            raise ConfigError(f"unknown key(s) {sorted(unknown)} in re-ranking policies")
        default = from_dict(RerankPolicy, data.get("default", {}), prefix="default.")
        segs = {
            str(name): from_dict(RerankPolicy, tbl, prefix=f"segments.{name}.")
            for name, tbl in data.get("segments", {}).items()
        }
        return cls(default, segs)

    @classmethod
    def load(cls, path: str | Path) -> RerankPolicies:
        return cls.from_dict(load_toml(path))


@dataclass(frozen=True)
class Candidates:
    """ANN candidates of one request (N rows, best relevance first)."""

    item_ids: np.ndarray  # (N,) int64 internal ids
    relevance: np.ndarray  # (N,) float32 cosine
    categories: Sequence[str | None]  # (N,) category text (" | "-joined " > " paths)
    price: np.ndarray  # (N,) float64, NaN when unknown
    popularity: np.ndarray  # (N,) float32 in [0, 1], within the segment
    external_ids: Sequence[str] = ()
    # Precomputed by the serving catalogue (optional; computed from the strings when None):
    # category key codes at the policy's depth (-1 = unknown) and summed boosts.
    category_codes: np.ndarray | None = None  # (N,) int64
    boost: np.ndarray | None = None  # (N,) float64


@dataclass(frozen=True)
class UserContext:
    """What re-ranking knows about the customer."""

    seen_categories: frozenset[str] = frozenset()  # category keys at the policy depth
    price_center: float | None = None  # median log1p price of the customer's purchases
    # the same categories as codes of the catalogue's key table (with Candidates.category_codes)
    seen_codes: frozenset[int] | None = None


@dataclass(frozen=True)
class Ranked:
    """One re-ranked item."""

    item_id: int
    score: float
    relevance: float
    reasons: tuple[str, ...]


def category_key(category: str | None, depth: int) -> str:
    """The first path of ``category`` cut to ``depth`` levels (``""`` when unknown)."""
    if not category:
        return ""
    first = category.split(" | ")[0]
    return " > ".join(p.strip() for p in first.split(">")[:depth])


def price_fit(price: np.ndarray, center: float | None) -> np.ndarray:
    """``exp(-|log1p(price) - center|)`` in [0, 1]; 0 when either is unknown."""
    p = np.asarray(price, dtype=np.float64)  # (N,)
    if center is None:
        return np.zeros(len(p), np.float64)
    with np.errstate(invalid="ignore"):
        fit = np.exp(-np.abs(np.log1p(np.maximum(p, 0)) - center))
    return np.where(np.isfinite(fit), fit, 0.0)


def boost_vector(
    categories: Sequence[str | None], external_ids: Sequence[str], boosts: Sequence[Boost]
) -> np.ndarray:
    """(N,) summed boost weight of each candidate."""
    out = np.zeros(len(categories), np.float64)
    for b in boosts:
        ids = set(b.item_ids)
        for i, cat in enumerate(categories):
            hit = (
                bool(b.category)
                and bool(cat)
                and any(path.strip().startswith(b.category) for path in str(cat).split(" | "))
            )
            if hit or (ids and i < len(external_ids) and external_ids[i] in ids):
                out[i] += b.weight
    return out


def median(x: np.ndarray) -> float:
    """``float(np.median(x))`` for a short 1-d float array without NaNs, at a fraction of
    numpy's per-call overhead (same value: the middle element, or the mean of the two)."""
    s = np.sort(x)  # (N,)
    m = len(s) // 2
    return float(s[m]) if len(s) % 2 else float((s[m - 1] + s[m]) / 2)


def rerank(c: Candidates, user: UserContext, policy: RerankPolicy, k: int) -> list[Ranked]:
    """Top ``k`` of the candidates under ``policy``, each with its reason codes."""
    n = len(c.item_ids)
    if n == 0 or k <= 0:
        return []
    rel = np.asarray(c.relevance, np.float64)  # (N,)
    pop = np.asarray(c.popularity, np.float64)  # (N,)
    fit = price_fit(c.price, user.price_center)  # (N,)
    if c.category_codes is not None and user.seen_codes is not None:
        # fast path: category keys as the catalogue's integer codes (same decisions)
        codes = np.asarray(c.category_codes, np.int64)  # (N,) -1 = unknown
        seen = user.seen_codes
        novel = np.fromiter(
            (c >= 0 and c not in seen for c in codes.tolist()), np.float64, len(codes)
        )  # (N,)
    else:
        keys = [category_key(cat, policy.category_depth) for cat in c.categories]
        novel = np.array(
            [bool(key) and key not in user.seen_categories for key in keys], np.float64
        )
        code_of: dict[str, int] = {}
        codes = np.array(
            [code_of.setdefault(key, len(code_of)) if key else -1 for key in keys], np.int64
        )
    if c.boost is not None:
        boost = np.asarray(c.boost, np.float64)  # (N,)
    elif policy.boosts:
        boost = boost_vector(c.categories, c.external_ids, policy.boosts)  # (N,)
    else:
        boost = np.zeros(n)
    base = (
        policy.relevance * rel
        + policy.popularity * pop
        + policy.price_affinity * fit
        + policy.novelty * novel
        + boost
    )  # (N,)
    # MMR on the base score scaled to [0, 1] so `diversity` means the same for every user.
    span = float(base.max() - base.min())
    norm = (base - base.min()) / span if span > 0 else np.ones(n)
    lam = policy.diversity
    rel_cut = median(rel)
    # Greedy MMR: mmr_j = (1 - lam) * norm_j - lam * [category of j already picked], the
    # first index among equal maxima (numpy argmax semantics).  Scanning candidates in
    # score order finds the best unpenalised and the best penalised one without touching
    # every candidate per pick: Python floats, no per-pick array work.
    v0 = ((1 - lam) * norm).tolist()  # value when the category is free
    v1 = ((1 - lam) * norm - lam).tolist()  # value when it is already taken
    order = sorted(range(n), key=lambda i: (-v0[i], i))
    base_l = base.tolist()
    border = sorted(range(n), key=lambda i: (-base_l[i], i))
    cl = codes.tolist()  # -1 = unknown category (never penalised)
    picked: set[int] = set()
    left = [True] * n
    out: list[Ranked] = []
    for _ in range(min(k, n)):
        a_free = -1  # best candidate whose category is free
        b_taken = -1  # best candidate whose category is taken
        for i in order:
            if not left[i]:
                continue
            taken = cl[i] in picked
            if b_taken >= 0 and v1[i] < v1[b_taken]:
                # every later candidate that is taken scores below b_taken
                if a_free >= 0:
                    break
                if taken:
                    continue
            if taken:
                if b_taken < 0 or (v1[i] == v1[b_taken] and i < b_taken):
                    b_taken = i
            elif a_free < 0:
                a_free = i
                if b_taken < 0:
                    break  # later taken ones have v1 <= v0 of this one (and a higher index)
        if b_taken < 0:
            j = a_free
        elif a_free < 0:
            j = b_taken
        elif v0[a_free] != v1[b_taken]:
            j = a_free if v0[a_free] > v1[b_taken] else b_taken
        else:
            j = min(a_free, b_taken)
        best_base = next(i for i in border if left[i])
        reasons = []
        if rel[j] >= rel_cut or policy.relevance >= max(policy.popularity, policy.price_affinity):
            reasons.append(RELEVANT)
        if policy.popularity > 0 and pop[j] >= 0.7:
            reasons.append(POPULAR_IN_SEGMENT)
        if policy.price_affinity > 0 and fit[j] >= 0.7:
            reasons.append(PRICE_FIT)
        if policy.novelty > 0 and novel[j] > 0:
            reasons.append(NEW_FOR_YOU)
        if boost[j] > 0:
            reasons.append(BOOSTED)
        if lam > 0 and j != best_base and base_l[j] < base_l[best_base]:
            reasons.append(DIVERSITY)
        if not reasons:
            reasons.append(RELEVANT)
        out.append(Ranked(int(c.item_ids[j]), base_l[j], float(rel[j]), tuple(reasons)))
        if cl[j] >= 0:
            picked.add(cl[j])
        left[j] = False
    return out


def relevance_only(c: Candidates, k: int, reason: str = RELEVANT) -> list[Ranked]:
    """The raw ANN order (no re-ranking), for ``skip_rerank`` and evaluation."""
    order = np.argsort(-np.asarray(c.relevance), kind="stable")[:k]
    return [
        Ranked(int(c.item_ids[i]), float(c.relevance[i]), float(c.relevance[i]), (reason,))
        for i in order
    ]


def popularity_scores(counts: np.ndarray) -> np.ndarray:
    """Counts -> ``log1p(count) / log1p(max)`` in [0, 1] (index 0, padding, is 0)."""
    c = np.asarray(counts, np.float64)
    top = float(c.max(initial=0))
    return (
        (np.log1p(c) / np.log1p(top)).astype(np.float32)
        if top > 0
        else np.zeros(len(c), np.float32)
    )
