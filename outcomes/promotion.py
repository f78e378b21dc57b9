"""Promotion by online result: the rule that turns an A/B test into promote / reject / wait.

Input: the online report (:func:`outcomes.report.online_report`, the JSON of ``ecomrec
report online``): per variant its impressions, and per (candidate, baseline, metric) the
difference ``candidate - baseline`` with its interval ``[lo, hi]``.

The rule (:func:`decide`, documented in docs/outcomes.md, "Promotion by online result"),
checked in this order for each candidate against the baseline (the control):

1. **wait** while either variant has fewer than ``min_impressions`` impressions (too
   little traffic to judge), unless the test is older than ``max_age_days`` -> **reject**
   (it never collected enough: the live model stays);
2. **reject** when the interval shows a loss: ``hi < 0`` (the candidate is worse on the
   primary metric with the report's confidence);
3. **promote** when the interval excludes a loss beyond the margin: ``lo > -margin``.
   With the default ``margin = 0`` that means the candidate is measurably better; a
   positive margin (in the metric's own units, e.g. 0.002 of CTR) accepts a candidate
   that is at worst that much worse (non-inferiority, e.g. for a fresher model);
4. otherwise **wait**, and **reject** once the test is older than ``max_age_days``
   (inconclusive: the live model stays).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ecomrec.errors import ConfigError, DataError

Action = Literal["promote", "reject", "wait"]
METRICS = ("ctr", "add_to_cart_rate", "conversion", "revenue_per_1000")
DAY = 86400.0


@dataclass(frozen=True)
class PromotionRule:
    """The online promotion rule (``[refresh]`` ``online_*`` keys)."""

    metric: str = "ctr"  # primary metric: one of METRICS
    min_impressions: int = 1000  # per variant, before any verdict but a timeout
    margin: float = 0.0  # promote when lo > -margin (metric units); 0 = must be better
    max_age_days: float = 14.0  # older and not promoted -> reject (the live model stays)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"online metric must be one of {METRICS}, got {self.metric!r}")
        if self.min_impressions < 1:
            raise ConfigError(f"online min_impressions must be >= 1, got {self.min_impressions}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ConfigError(f"online margin must be >= 0, got {self.margin}")
        if not self.max_age_days > 0:
            raise ConfigError(f"online max_age_days must be > 0, got {self.max_age_days}")


@dataclass(frozen=True)
class Verdict:
    """What the rule says about one candidate."""

    variant: str
    baseline: str
    action: Action
    reason: str
    metric: str
    value: float | None = None  # candidate - baseline
    lo: float | None = None
    hi: float | None = None
    impressions: int = 0
    baseline_impressions: int = 0

    @property
    def promoted(self) -> bool:
        return self.action == "promote"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "promoted": self.promoted}


def _variant(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The variant's totals (``variant_totals``, else its ``variants`` rows summed: one row
    per model version)."""
    for v in report.get("variant_totals", []):
        if v.get("variant") == name:
            return dict(v)
    rows = [v for v in report.get("variants", []) if v.get("variant") == name]
    return {"variant": name, "impressions": sum(int(v.get("impressions", 0)) for v in rows)}


def _difference(report: dict[str, Any], cand: str, base: str, metric: str) -> dict[str, Any]:
    for d in report.get("differences", []):
        if (d.get("variant"), d.get("baseline"), d.get("metric")) == (cand, base, metric):
            return dict(d)
    return {}


def decide(
    report: dict[str, Any],
    rule: PromotionRule,
    *,
    candidate: str,
    baseline: str = "control",
    age_s: float = 0.0,
) -> Verdict:
    """Apply the rule (module docstring) to ``candidate`` vs ``baseline`` in ``report``;
    ``age_s``: seconds since the test started."""
    if not isinstance(report, dict) or "variants" not in report:
        raise DataError("online report: want the JSON of `ecomrec report online` (no variants)")
    c, b = _variant(report, candidate), _variant(report, baseline)
    n_c, n_b = int(c.get("impressions", 0)), int(b.get("impressions", 0))
    old = age_s > rule.max_age_days * DAY

    def verdict(
        action: Action, reason: str, d: tuple[float, float, float] | None = None
    ) -> Verdict:
        value, lo, hi = d if d is not None else (None, None, None)
        return Verdict(
            variant=candidate,
            baseline=baseline,
            action=action,
            reason=reason,
            metric=rule.metric,
            value=value,
            lo=lo,
            hi=hi,
            impressions=n_c,
            baseline_impressions=n_b,
        )

    age = f"{age_s / DAY:.1f} of {rule.max_age_days:g} days"
    if min(n_c, n_b) < rule.min_impressions:
        short = f"{n_c:,} / {n_b:,} impressions (candidate / {baseline}) < {rule.min_impressions:,}"
        if old:
            return verdict("reject", f"timed out ({age}): {short}")
        return verdict("wait", f"{short}; {age}")
    d = _difference(report, candidate, baseline, rule.metric)
    if not d or d.get("lo") is None or d.get("hi") is None:
        return verdict("reject" if old else "wait", f"no {rule.metric} difference; {age}")
    nums = (float(d["value"]), float(d["lo"]), float(d["hi"]))
    value, lo, hi = nums
    text = f"{rule.metric} {candidate} - {baseline} = {value:+.5f} [{lo:+.5f}, {hi:+.5f}]"
    if hi < 0:
        return verdict("reject", f"{text}: a loss", nums)
    if lo > -rule.margin:
        return verdict("promote", f"{text}: excludes a loss beyond {rule.margin:g}", nums)
    if old:
        return verdict("reject", f"{text}: inconclusive after {age}", nums)
    return verdict("wait", f"{text}: inconclusive; {age}", nums)


def decide_all(
    report: dict[str, Any], rule: PromotionRule, *, baseline: str = "control", age_s: float = 0.0
) -> list[Verdict]:
    """A verdict for every variant of ``report`` other than ``baseline``."""
    rows = report.get("variant_totals") or report.get("variants", [])
    names = [n for n in dict.fromkeys(v.get("variant") for v in rows) if n and n != baseline]
    return [decide(report, rule, candidate=n, baseline=baseline, age_s=age_s) for n in names]
