"""Online metrics per variant and model version, with confidence intervals.

The unit is an **answer** (one served recommendation list: what an A/B test randomises and
the served log counts exactly). Per group (variant, model version):

* ``recommendations``: answers served;
* ``impressions``: answers shown: with an attributed impression, or an attributed click,
  cart or purchase (an answer acted on was shown). When the shop sends no impression events
  at all in the period, every answer served counts as shown (``impressions_tracked`` false);
* ``clicks`` / ``carts`` / ``purchases``: answers with at least one attributed event of the
  type; ``revenue``: the sum of price x quantity of the attributed purchases;
* ``ctr`` = clicks / impressions, ``add_to_cart_rate`` = carts / impressions,
  ``conversion`` = purchases / impressions: Wilson score intervals;
* ``revenue_per_1000`` = 1000 x revenue / recommendations: percentile bootstrap over
  answers (an answer's revenue is mostly 0 and heavy-tailed, where a normal interval is
  poor).

Differences (variant - baseline): Newcombe's hybrid score interval for rates (from the two
Wilson intervals), an independent bootstrap of both arms for revenue per 1,000.

The intervals treat answers as independent. Answers of one customer are correlated (the
same person), so with many answers per customer the true intervals are somewhat wider.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from outcomes.attribution import Attributed
from outcomes.served_log import Served

RATES: tuple[tuple[str, str], ...] = (
    ("ctr", "clicks"),
    ("add_to_cart_rate", "carts"),
    ("conversion", "purchases"),
)
METRICS: tuple[str, ...] = (*(m for m, _ in RATES), "revenue_per_1000")
BOOTSTRAP_RESAMPLES = 2000


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Proportion k/n and its Wilson score interval (n = 0: 0 in [0, 1])."""
    if n <= 0:
        return 0.0, 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"successes {k} not in 0..{n}")
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def newcombe(
    k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """p1 - p2 and Newcombe's hybrid score interval (method 10, from Wilson intervals)."""
    p1, l1, u1 = wilson(k1, n1, confidence)
    p2, l2, u2 = wilson(k2, n2, confidence)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lo, hi


def _bootstrap_means(
    nonzero: np.ndarray, n: int, rng: np.random.Generator, resamples: int
) -> np.ndarray:
    """Bootstrap distribution of the mean of n values of which only ``nonzero`` are not 0.

    Resampling n values with replacement draws Binomial(n, k/n) of the k nonzero ones, each
    uniform among them: O(k) per resample instead of O(n).
    """
    k = len(nonzero)
    if n == 0:
        return np.zeros(resamples)
    if k == 0:
        return np.zeros(resamples)
    counts = rng.binomial(n, k / n, size=resamples)
    out = np.empty(resamples)
    for b, c in enumerate(counts):
        out[b] = nonzero[rng.integers(0, k, size=c)].sum() / n if c else 0.0
    return out


def revenue_interval(
    nonzero: np.ndarray,
    n: int,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """1000 x mean revenue per answer and its percentile bootstrap interval."""
    if n == 0:
        return 0.0, 0.0, 0.0
    value = 1000.0 * float(nonzero.sum()) / n
    means = _bootstrap_means(nonzero, n, np.random.default_rng(seed), resamples)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return value, 1000.0 * float(lo), 1000.0 * float(hi)


def revenue_difference(
    nz1: np.ndarray,
    n1: int,
    nz2: np.ndarray,
    n2: int,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Difference of revenue per 1,000 answers (arm 1 - arm 2), bootstrap of both arms."""
    if n1 == 0 or n2 == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    m1 = _bootstrap_means(nz1, n1, rng, resamples)
    m2 = _bootstrap_means(nz2, n2, rng, resamples)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(m1 - m2, [a, 1 - a])
    d = float(nz1.sum()) / n1 - float(nz2.sum()) / n2
    return 1000.0 * d, 1000.0 * float(lo), 1000.0 * float(hi)


@dataclass
class Tally:
    """Counts of one group (variant, model version, or a variant over all versions)."""

    recommendations: int = 0
    shown: set[str] = field(default_factory=set)
    clicked: set[str] = field(default_factory=set)
    carted: set[str] = field(default_factory=set)
    purchased: set[str] = field(default_factory=set)
    revenue_by_answer: dict[str, float] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)

    def add_served(self, s: Served) -> None:
        self.recommendations += 1

    def add_event(self, a: Attributed) -> None:
        rid = a.served.recommendation_id
        et = a.event.event_type
        self.events[et] += 1
        self.shown.add(rid)  # an answer acted on was shown
        if et == "click":
            self.clicked.add(rid)
        elif et == "cart":
            self.carted.add(rid)
        elif et == "purchase":
            self.purchased.add(rid)
            rev = (a.event.price or 0.0) * a.event.quantity
            self.revenue_by_answer[rid] = self.revenue_by_answer.get(rid, 0.0) + rev

    def counts(self, impressions_tracked: bool) -> dict[str, Any]:
        return {
            "recommendations": self.recommendations,
            "impressions": len(self.shown) if impressions_tracked else self.recommendations,
            "clicks": len(self.clicked),
            "carts": len(self.carted),
            "purchases": len(self.purchased),
            "revenue": round(sum(self.revenue_by_answer.values()), 6),
            "events": {
                t: self.events.get(t, 0) for t in ("impression", "click", "cart", "purchase")
            },
        }

    def revenue_nonzero(self) -> np.ndarray:
        return np.array([v for v in self.revenue_by_answer.values() if v != 0.0], dtype=float)

    def metrics(self, impressions_tracked: bool, confidence: float) -> dict[str, dict[str, float]]:
        c = self.counts(impressions_tracked)
        n = c["impressions"]
        out: dict[str, dict[str, float]] = {}
        for name, key in RATES:
            v, lo, hi = wilson(min(c[key], n), n, confidence)
            out[name] = {"value": v, "lo": lo, "hi": hi, "n": n}
        v, lo, hi = revenue_interval(self.revenue_nonzero(), self.recommendations, confidence)
        out["revenue_per_1000"] = {"value": v, "lo": lo, "hi": hi, "n": self.recommendations}
        return out


def differences(
    arm: Tally,
    base: Tally,
    impressions_tracked: bool,
    confidence: float,
) -> dict[str, tuple[float, float, float]]:
    """Each metric's difference (arm - base) with its interval."""
    a = arm.counts(impressions_tracked)
    b = base.counts(impressions_tracked)
    out: dict[str, tuple[float, float, float]] = {}
    for name, key in RATES:
        out[name] = newcombe(
            min(a[key], a["impressions"]),
            a["impressions"],
            min(b[key], b["impressions"]),
            b["impressions"],
            confidence,
        )
    out["revenue_per_1000"] = revenue_difference(
        arm.revenue_nonzero(),
        arm.recommendations,
        base.revenue_nonzero(),
        base.recommendations,
        confidence,
    )
    return out


def tally(
    answers: Iterable[Served], attributed: Iterable[Attributed]
) -> tuple[dict[tuple[str, str], Tally], bool]:
    """Tallies per (variant, model version) and whether any impression was attributed."""
    groups: dict[tuple[str, str], Tally] = {}
    for s in answers:
        groups.setdefault((s.variant, s.model_version), Tally()).add_served(s)
    impressions = False
    for a in attributed:
        key = (a.served.variant, a.served.model_version)
        groups.setdefault(key, Tally()).add_event(a)
        impressions = impressions or a.event.event_type == "impression"
    return groups, impressions


def pooled(groups: dict[tuple[str, str], Tally]) -> dict[str, Tally]:
    """Per variant, over its model versions."""
    out: dict[str, Tally] = {}
    for (variant, _), t in sorted(groups.items()):
        p = out.setdefault(variant, Tally())
        p.recommendations += t.recommendations
        p.shown |= t.shown
        p.clicked |= t.clicked
        p.carted |= t.carted
        p.purchased |= t.purchased
        for rid, r in t.revenue_by_answer.items():
            p.revenue_by_answer[rid] = p.revenue_by_answer.get(rid, 0.0) + r
        p.events.update(t.events)
    return out
