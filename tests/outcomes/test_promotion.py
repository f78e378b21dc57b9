"""The online promotion rule on planted reports (outcomes.promotion)."""

from __future__ import annotations

from typing import Any

import pytest

from ecomrec.errors import ConfigError, DataError
from outcomes.promotion import DAY, PromotionRule, decide, decide_all


def report(n_c: int, n_b: int, diff: tuple[float, float, float] | None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "variants": [
            {"variant": "control", "impressions": n_b},
            {"variant": "candidate", "impressions": n_c},
        ],
        "differences": [],
    }
    if diff is not None:
        v, lo, hi = diff
        r["differences"].append(
            {"variant": "candidate", "baseline": "control", "metric": "ctr", "value": v,
             "lo": lo, "hi": hi}
        )  # fmt: skip
    return r


RULE = PromotionRule(metric="ctr", min_impressions=1000, margin=0.0, max_age_days=14)


@pytest.mark.parametrize(
    ("n_c", "n_b", "diff", "age_days", "action"),
    [
        (5000, 5000, (0.02, 0.01, 0.03), 1, "promote"),  # interval excludes a loss
        (5000, 5000, (-0.02, -0.03, -0.01), 1, "reject"),  # interval shows a loss
        (5000, 5000, (0.005, -0.002, 0.012), 1, "wait"),  # inconclusive
        (5000, 5000, (0.005, -0.002, 0.012), 15, "reject"),  # inconclusive past max age
        (999, 5000, (0.02, 0.01, 0.03), 1, "wait"),  # candidate too few impressions
        (5000, 999, (0.02, 0.01, 0.03), 1, "wait"),  # control too few impressions
        (999, 5000, (0.02, 0.01, 0.03), 15, "reject"),  # never enough traffic
        (5000, 5000, None, 1, "wait"),  # no difference for the metric
        (1000, 1000, (0.001, 0.0, 0.002), 1, "wait"),  # lo == 0 is not > 0
    ],
)
def test_rule(
    n_c: int, n_b: int, diff: tuple[float, float, float] | None, age_days: float, action: str
) -> None:
    v = decide(report(n_c, n_b, diff), RULE, candidate="candidate", age_s=age_days * DAY)
    assert v.action == action, v.reason
    assert v.promoted == (action == "promote")
    assert v.to_dict()["promoted"] == (action == "promote")
    assert (v.impressions, v.baseline_impressions) == (n_c, n_b)


def test_margin_accepts_a_bounded_loss_but_not_a_shown_one() -> None:
    rule = PromotionRule(min_impressions=10, margin=0.005)
    small = decide(report(100, 100, (0.0, -0.004, 0.004)), rule, candidate="candidate")
    assert small.action == "promote" and small.lo == -0.004
    big = decide(report(100, 100, (0.0, -0.006, 0.004)), rule, candidate="candidate")
    assert big.action == "wait"
    loss = decide(report(100, 100, (-0.003, -0.004, -0.001)), rule, candidate="candidate")
    assert loss.action == "reject"  # a shown loss is never promoted, margin or not


def test_decide_all_covers_every_candidate() -> None:
    r = report(5000, 5000, (0.02, 0.01, 0.03))
    r["variants"].append({"variant": "worse", "impressions": 5000})
    r["differences"].append(
        {"variant": "worse", "baseline": "control", "metric": "ctr", "value": -0.02,
         "lo": -0.03, "hi": -0.01}
    )  # fmt: skip
    got = {v.variant: v.action for v in decide_all(r, RULE)}
    assert got == {"candidate": "promote", "worse": "reject"}


def test_bad_rule_and_report() -> None:
    with pytest.raises(ConfigError, match="metric"):
        PromotionRule(metric="clicks")
    with pytest.raises(ConfigError, match="min_impressions"):
        PromotionRule(min_impressions=0)
    with pytest.raises(ConfigError, match="margin"):
        PromotionRule(margin=-1)
    with pytest.raises(DataError, match="variants"):
        decide({"x": 1}, RULE, candidate="candidate")
