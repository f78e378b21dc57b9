"""Interval formulas against published values and a brute-force bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from outcomes.metrics import newcombe, revenue_difference, revenue_interval, wilson


def test_wilson_matches_published_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553 to 0.3662
    p, lo, hi = wilson(81, 263)
    assert p == pytest.approx(81 / 263)
    assert (lo, hi) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    # 0/10 -> 0 to 0.2775 (the interval never leaves [0, 1])
    assert wilson(0, 10)[1:] == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson(0, 0) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson(5, 4)


def test_newcombe_matches_published_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80,
    # method 10 -> 0.0524 to 0.3339
    d, lo, hi = newcombe(56, 70, 48, 80)
    assert d == pytest.approx(56 / 70 - 48 / 80)
    assert (lo, hi) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    # equal arms: the interval is symmetric around 0
    d, lo, hi = newcombe(30, 300, 30, 300)
    assert d == 0 and lo == pytest.approx(-hi)


def test_sparse_bootstrap_equals_a_brute_force_bootstrap() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    values = np.zeros(n)
    values[rng.choice(n, 40, replace=False)] = rng.lognormal(3, 1, 40)
    nonzero = values[values != 0]
    v, lo, hi = revenue_interval(nonzero, n, resamples=4000, seed=1)
    assert v == pytest.approx(1000 * values.mean())
    brute = np.array([rng.choice(values, n).mean() for _ in range(4000)]) * 1000
    blo, bhi = np.quantile(brute, [0.025, 0.975])
    spread = bhi - blo
    assert abs(lo - blo) < 0.06 * spread and abs(hi - bhi) < 0.06 * spread
    # a difference of an arm with itself is centred on 0; a real gap is found
    d, dlo, dhi = revenue_difference(nonzero, n, nonzero, n)
    assert d == 0 and dlo < 0 < dhi
    d, dlo, dhi = revenue_difference(nonzero * 3, n, nonzero, n)
    assert dlo > 0 and d == pytest.approx(2000 * values.mean())
